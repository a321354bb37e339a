"""``python -m launcher retest RUN_DIR eval.key=value ...``: test a finished run's selected state
again under other evaluation settings, training nothing.

What it is for: a number to put beside a paper's, when the paper's protocol differs from the
run's in evaluation only. Example: HSTU's repo removes the items of the model's input from each
user's candidates (its ``eval.py``, ``filter_invalid_ids=True``); our default ranks them. This
gives the same state's test under that candidate set::

    python -m launcher retest runs/repro-ml1m-sasrec-allpos-s0 eval.mask_history=true eval.mask_scope=input
    # -> runs/repro-ml1m-sasrec-allpos-s0-retest/metrics.json (+ retest.json)

How: the run's stored config (its ``metrics.json``) plus the ``eval.*`` overrides becomes a job
named ``--name`` (default ``<run>-retest``, a folder beside the run's) that resumes from the run's own checkpoints. The
job resumes at the run's last step, where training is done, so it trains nothing and writes
no checkpoint. It restores the state the run selected on validation and tests it. The run's
directory is not written to.

Guarantees, checked before anything launches (one-line errors):
- The run finished: its ``metrics.json`` exists.
- Its newest complete checkpoint is the step it finished at. Otherwise the job would train on,
  and write there.
- Only ``eval.*`` changes, so the tested state is the run's own. ``eval.select_metric`` and
  ``eval.val_max_users`` are refused too: they decide the selection, which stays the run's.
- A stored config from an older version is read as that version ran
  (``stored_config_as_now``), e.g. its tie rule.

It runs on this node, with the run's world size: the per-rank batch stays the run's, so the
checkpoint's global batch matches. DiffRec jobs write no checkpoints and cannot be retested.

The selection stays the run's. The retest's ``metrics.json`` keeps the run's validation history,
measured under the run's own protocol, and ``retest.json`` says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml

from recsys_dist.config import ConfigError, config_from_dict, parse_overrides, stored_config_as_now

#: eval settings that decide the selection, not the test: the selection stays the run's
SELECTION_ONLY = ("eval.select_metric", "eval.val_max_users")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run's directory, e.g. runs/repro-ml1m-sasrec-allpos-s0")
    p.add_argument("overrides", nargs="*", metavar="eval.key=value",
                   help="evaluation settings to test under, e.g. eval.mask_history=true (eval.* only)")
    p.add_argument("--name", default=None, help="the retest's run name (default <run>-retest)")


def check_overrides(overrides: list[str]) -> None:
    """ConfigError unless every override is an ``eval.*`` setting that leaves the selection alone."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    bad = [k for k in keys if not k.startswith("eval.")]
    if bad:
        raise ConfigError(f"retest changes the evaluation only (eval.*): {' '.join(bad)}")
    if selection := [k for k in keys if k in SELECTION_ONLY]:
        raise ConfigError(f"{' '.join(selection)} decides the selection, which a retest keeps: retrain to change it")


def check_retestable(cfg, what: str) -> None:
    """ConfigError unless a job of config ``cfg`` leaves a state to retest (``what`` names it)."""
    if cfg.model.name == "diffrec":
        raise ConfigError(f"{what}: a DiffRec job writes no checkpoints (recsys_dist/train/diffrec_job.py): nothing to retest")
    if not cfg.checkpoint.enabled:
        raise ConfigError(f"{what}: trained with checkpoint.enabled=false: no state to retest")


def metrics_digest(run: Path) -> str:
    """sha256 of the run's ``metrics.json``: which finished run a retest tested (a run trained
    again at the same path has another)."""
    return hashlib.sha256((run / "metrics.json").read_bytes()).hexdigest()


def retest_job(run: Path, overrides: list[str], name: str | None) -> tuple[dict, dict]:
    """(the retest's config dict, what retest.json records) for a finished run; ConfigError when
    it is not one or an override is not an eval setting. The retest's folder is ``<name>`` beside
    the run's (wherever the run's stored output_dir was)."""
    from recsys_dist.train.checkpoint import complete_steps

    check_overrides(overrides)
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{run}: no metrics.json: retest takes a finished run (it trains nothing)")
    metrics = json.loads(metrics_path.read_text())
    now = stored_config_as_now(metrics["config"])  # fields added since: the behaviour the run had
    if now is None:
        raise ConfigError(f"{run}: its stored config has fields this version removed or retyped: cannot retest it")
    stored = config_from_dict(now)
    check_retestable(stored, str(run))
    url = stored.checkpoint.url
    ckpt_url = str(Path(url).resolve()) if url and "://" not in url else url or str((run / "checkpoints").resolve())
    steps = complete_steps(ckpt_url)
    if not steps or steps[-1] != metrics["steps"]:
        raise ConfigError(f"{run}: its newest complete checkpoint under {ckpt_url} is "
                          f"{steps[-1] if steps else 'none'}, not the step it finished at ({metrics['steps']}): "
                          "resuming would train (retest needs the run's last checkpoint)")
    name = name or f"{run.name}-retest"
    if (run.parent / name).resolve() in (run.resolve(), (run.parent / stored.name).resolve()):
        raise ConfigError(f"--name {name} is the run's own directory: a retest writes its own")
    cfg = stored.to_dict()
    cfg.update(name=name, output_dir=str(run.parent),
               checkpoint={**cfg["checkpoint"], "url": ckpt_url, "resume": True})
    cfg["eval"].update(parse_overrides(overrides).get("eval", {}))
    config_from_dict(cfg)  # type-check the overrides now (one-line ConfigError)
    record = {"retest_of": str(run), "checkpoint": ckpt_url, "step": metrics["steps"],
              "overrides": list(overrides), "selected_step": metrics.get("selected_step"),
              "run_metrics_sha256": metrics_digest(run),
              "note": "the selected state and the validation history are the run's, under its own "
                      "eval settings; only the test is recomputed under the overrides"}
    return cfg, record


def prepare(run_dir: Path, overrides: list[str], name: str | None) -> tuple[Path, int]:
    """Check (``retest_job``) and write the retest's ``retest-config.yaml`` and ``retest.json``
    into its folder beside the run's; returns (the config's path, the run's world size) to
    launch it with. The retest's ``metrics.json`` lands in the same folder."""
    cfg, record = retest_job(run_dir, overrides, name)
    out = Path(cfg["output_dir"]) / cfg["name"]
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "retest-config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "retest.json").write_text(json.dumps(record, indent=1) + "\n")
    return config_path, json.loads((run_dir / "metrics.json").read_text()).get("world_size", 2)


def run(args) -> int:
    """Launch the retest (``prepare``) as ``train`` on this node with the run's world size (the
    per-rank batch is the run's, so the checkpoint's global batch matches)."""
    from launcher import commands

    config_path, world = prepare(Path(args.run), list(args.overrides), args.name)
    train_args = argparse.Namespace(config=str(config_path), overrides=[], launcher="torchrun",
                                    nproc_per_node=world, nnodes="1", node_rank=None,
                                    rdzv_endpoint=None, rdzv_id="recsys-dist", max_restarts=0, hostfile=None,
                                    no_ssh=False, master_addr=None, master_port=None)
    return commands.train(train_args)
