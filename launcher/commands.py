"""Implementations of the launcher's commands (kept apart from argument parsing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recsys_dist.config import REPO_ROOT, ConfigError, load_config

METRIC_COLUMNS = ["HR@5", "HR@10", "HR@20", "HR@50", "NDCG@5", "NDCG@10", "NDCG@20", "NDCG@50"]


def prepare(args) -> int:
    """Build the shards of a job's dataset (idempotent)."""
    from recsys_dist.train.data import build_job_shards
    from shards import summarize

    cfg = load_config(args.config, args.overrides)
    print(summarize(build_job_shards(cfg)))
    return 0


def torchrun_command(args, config: str | None, overrides: list[str]) -> list[str]:
    """The torchrun (or deepspeed launcher) command line that runs ``recsys_dist.train``."""
    worker = ["-m", "recsys_dist.train"] + (["--config", config] if config else []) + list(overrides)
    if args.launcher == "deepspeed":
        # the `deepspeed` console script is this module's main(); run it with this interpreter
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if args.hostfile:
            cmd += ["--hostfile", args.hostfile]  # ranks per node: the hostfile's slots
        elif _has_cuda():
            cmd += [f"--num_gpus={args.nproc_per_node}"]
        else:  # DeepSpeed's CPU accelerator counts 1 device: name the ranks in a one-line hostfile,
            # launched here without the ssh reachability check a hostfile otherwise triggers
            cmd += ["--hostfile", _local_hostfile(args.nproc_per_node), "--no_ssh", "--node_rank=0",
                    "--master_addr=127.0.0.1"]
        if getattr(args, "no_ssh", False) and "--no_ssh" not in cmd:
            cmd += ["--no_ssh", f"--node_rank={args.node_rank}"]
        if getattr(args, "master_addr", None):
            cmd += [f"--master_addr={args.master_addr}"]
        if getattr(args, "master_port", None):
            cmd += [f"--master_port={args.master_port}"]
        return cmd + ["--module", "recsys_dist.train"] + worker[2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    else:
        cmd += ["--standalone"]
    if args.node_rank is not None:
        cmd += [f"--node-rank={args.node_rank}"]
    return cmd + worker


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _local_hostfile(slots: int) -> str:
    """A hostfile ``localhost slots=N`` under runs/ (one node, N CPU ranks)."""
    path = REPO_ROOT / "runs" / ".deepspeed" / f"hostfile-localhost-{slots}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"localhost slots={slots}\n")
    return str(path)


def check_deepspeed_args(args) -> None:
    """One-line errors for deepspeed launcher options that cannot work (before launching)."""
    if args.launcher != "deepspeed":
        for flag, value in (("--hostfile", args.hostfile), ("--no-ssh", getattr(args, "no_ssh", False)),
                            ("--master-addr", getattr(args, "master_addr", None))):
            if value:
                raise ConfigError(f"{flag} is an option of --launcher deepspeed (this run uses {args.launcher})")
        return
    if args.hostfile:
        path = Path(args.hostfile)
        if not path.is_file():
            raise ConfigError(f"--hostfile {args.hostfile}: no such file")
        hosts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            slots = [p for p in parts[1:] if p.startswith("slots=")]
            if len(parts) != 2 or len(slots) != 1 or not slots[0][6:].isdigit() or int(slots[0][6:]) < 1:
                raise ConfigError(f"--hostfile {args.hostfile} line {n}: expected 'HOST slots=N' (N >= 1), got {line!r}")
            hosts.append(parts[0])
        if not hosts:
            raise ConfigError(f"--hostfile {args.hostfile}: no hosts")
        if len(set(hosts)) != len(hosts):
            raise ConfigError(f"--hostfile {args.hostfile}: a host is listed twice ({hosts})")
    if getattr(args, "no_ssh", False):
        if not args.hostfile or args.node_rank is None or not getattr(args, "master_addr", None):
            raise ConfigError("--no-ssh needs --hostfile (every node's slots), --node-rank and --master-addr")
        if not 0 <= args.node_rank < len(hosts):
            raise ConfigError(f"--node-rank {args.node_rank} is not a node of --hostfile {args.hostfile} "
                              f"({len(hosts)} hosts: 0..{len(hosts) - 1})")


def train(args) -> int:
    """Launch one job and wait for it; the exit code is the job's."""
    load_config(args.config, args.overrides)  # fail fast on a bad config, before any launch
    check_deepspeed_args(args)
    if args.launcher == "local":
        from recsys_dist.train.__main__ import main as worker_main
        return worker_main((["--config", args.config] if args.config else []) + list(args.overrides))
    cmd = torchrun_command(args, args.config, args.overrides)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(args.nproc_per_node, 1))))
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    # replace this process: SIGTERM from a scheduler (k8s pod deletion) reaches torchrun directly
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


def metric_cell(mean: float, std: dict | None, key: str) -> str:
    """``mean`` in percent, with ``± sd`` when the run has a spread over eval seeds."""
    if std and std.get(key, 0.0) > 0:
        return f"{100 * mean:.2f} ± {100 * std[key]:.2f}"
    return f"{100 * mean:.2f}"


def metrics_table(rows: list[tuple[str, dict]], stds: list[dict | None] | None = None) -> str:
    """Markdown table of full-catalog test metrics (percent) for (label, metrics) rows; ``stds``
    (per row, or None) adds the spread over eval-noise seeds."""
    head = "| model | " + " | ".join(METRIC_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(METRIC_COLUMNS)
    lines = [head, sep]
    for i, (label, m) in enumerate(rows):
        std = stds[i] if stds else None
        lines.append(f"| {label} | " + " | ".join(metric_cell(m[c], std, c) for c in METRIC_COLUMNS) + " |")
    return "\n".join(lines)


def demo(args) -> int:
    """Train every demo model on 2 ranks and print one comparison table."""
    t_start = time.perf_counter()
    rows: list[tuple[str, dict]] = []
    stds: list[dict | None] = []
    details = []
    popularity = None
    for model in args.models:
        config = str(REPO_ROOT / "configs" / f"{args.dataset_config}_{model}.yaml")
        cfg = load_config(config, args.overrides)
        code = run_job(config, args.overrides, args.nproc_per_node)
        if code != 0:
            print(f"[demo] training {model} failed with exit code {code}", file=sys.stderr)
            return code
        metrics = json.loads((cfg.run_dir() / "metrics.json").read_text())
        rows.append((model, metrics["test"]))
        stds.append(metrics.get("test_std"))
        popularity = metrics["popularity_test"]
        details.append(f"| {model} | {metrics['steps']} | {metrics['selected_step']} | "
                       f"{metrics['seconds_per_step']:.3f} | {metrics['samples_per_second']:.0f} | "
                       f"{metrics['test']['seconds']:.1f} | {len(metrics.get('test_seeds', [0]))} | "
                       f"{cfg.run_dir()} |")
    if popularity is not None:
        rows.append(("popularity", popularity))
        stds.append(None)
    wall = time.perf_counter() - t_start
    n_users = int(rows[0][1]["num_users"]) if rows else 0
    text = "\n".join([
        f"Full-catalog test metrics (%), {n_users} users, {args.nproc_per_node} ranks, "
        f"selected on validation, test evaluated once per eval-noise seed (mean ± sd over seeds "
        f"where the model samples), ties: expected rank:", "",
        metrics_table(rows, stds), "",
        "| model | steps | selected step | s/step | samples/s | test eval s (per seed) | eval seeds | run dir |",
        "|---|---:|---:|---:|---:|---:|---:|---|", *details, "",
        f"demo wall time: {wall / 60:.1f} min"])
    print("\n" + text)
    out = REPO_ROOT / "runs" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    return 0


def run_job(config: str, overrides, nproc: int) -> int:
    """Run one job on ``nproc`` local ranks with torchrun; returns its exit code."""
    import argparse
    ns = argparse.Namespace(nproc_per_node=nproc, nnodes="1", node_rank=None, rdzv_endpoint=None,
                            rdzv_id="recsys-dist", max_restarts=0, launcher="torchrun", hostfile=None)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(torchrun_command(ns, config, list(overrides)), env=env)


COMPARE_COLUMNS = ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "HR@50", "NDCG@50"]
README_BEGIN, README_END = "<!-- compare:begin -->", "<!-- compare:end -->"


#: what a finished run may differ in from the job asked for now and still be reused (``--reuse``):
#: where it ran and how it checkpointed, not what it trained or evaluated
RUN_MAY_DIFFER = ("name", "output_dir", "data.shards_url", "data.data_dir", "data.num_workers", "train.device",
                  "checkpoint.")


def reusable_run(metrics_path: Path, cfg) -> bool:
    """``--reuse`` (``compare``, ``reproduce``): whether the finished run whose ``metrics.json`` is
    ``metrics_path`` trained what ``cfg`` asks for now (outside ``RUN_MAY_DIFFER``); fields added
    to the config since it ran count as their defaults, the behaviour the run had
    (``config_mismatch``). False when there is no such file or it stores no config."""
    from recsys_dist.train.checkpoint import config_mismatch

    if not metrics_path.exists():
        return False
    stored = json.loads(metrics_path.read_text()).get("config")
    return stored is not None and not config_mismatch(stored, cfg.to_dict(), RUN_MAY_DIFFER, ("stored", "now"))


def compare(args) -> int:
    """Train every model on every dataset under one protocol; write one markdown table."""
    rows = []
    for dataset in args.datasets:
        popularity = None
        for model in args.models:
            config = REPO_ROOT / "configs" / f"{dataset}_{model}.yaml"
            cfg = load_config(config, args.overrides)
            metrics_path = cfg.run_dir() / "metrics.json"
            if not (args.reuse and reusable_run(metrics_path, cfg)):
                code = run_job(str(config), args.overrides, args.nproc_per_node)
                if code != 0:
                    print(f"[compare] {dataset} x {model} failed with exit code {code}", file=sys.stderr)
                    rows.append((dataset, model, None))
                    continue
            m = json.loads(metrics_path.read_text())
            rows.append((dataset, model, m))
            popularity = m["popularity_test"]
        if popularity is not None:
            rows.append((dataset, "popularity", {"test": popularity}))
    text = compare_table(rows, args.nproc_per_node)
    print("\n" + text)
    out = REPO_ROOT / "runs" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    if args.readme:
        readme = REPO_ROOT / "docs" / "results.md"
        body = readme.read_text()
        if README_BEGIN in body and README_END in body:
            head, rest = body.split(README_BEGIN, 1)
            readme.write_text(head + README_BEGIN + "\n" + text + "\n" + README_END + rest.split(README_END, 1)[1])
    return 0 if all(m is not None for _, _, m in rows) else 1


SET_COMPARE_COLUMNS = ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "Recall@50", "NDCG@50"]


def compare_table(rows: list[tuple[str, str, dict | None]], nproc: int) -> str:
    """Markdown: test metrics (%) of the validation-selected state, train time, sampling time.
    Rows of set models (several held-out items per user: Recall@K) get their own table."""
    def is_set(m: dict | None) -> bool:
        return m is not None and "Recall@10" in m["test"]

    groups = [(COMPARE_COLUMNS, [r for r in rows if not is_set(r[2])]),
              (SET_COMPARE_COLUMNS, [r for r in rows if is_set(r[2])])]
    return "\n\n".join(_compare_block(cols, part) for cols, part in groups if part)


def _compare_block(columns: list[str], rows: list[tuple[str, str, dict | None]]) -> str:
    head = ("| dataset | model | " + " | ".join(columns) +
            " | steps | train min | eval s / 1k users | test users |")
    lines = [head, "|---|---|" + "---:|" * (len(columns) + 4)]
    for dataset, model, m in rows:
        if m is None:
            lines.append(f"| {dataset} | {model} | failed |" + " |" * (len(columns) + 3))
            continue
        test = m["test"]
        cells = " | ".join(metric_cell(test[c], m.get("test_std"), c) for c in columns)
        if "steps" in m:
            train_min = m["steps"] * m["seconds_per_step"] / 60
            per_k = 1000 * test["seconds"] / max(test["num_users"], 1)
            extra = f"{m['steps']} | {train_min:.1f} | {per_k:.1f} | {test['num_users']}"
        else:
            extra = f"- | - | - | {test['num_users']}"
        lines.append(f"| {dataset} | {model} | {cells} | {extra} |")
    return "\n".join(lines)
