"""``python -m launcher retest``: a finished run's selected state tested again under other eval
settings, training nothing and writing nothing into the run.

Real 2-rank torchrun jobs on synthetic shards. A trains and tests with the default candidates;
B = ``retest A eval.mask_history=true``; C trains the same seed with ``eval.mask_history=true``
from the start. Each run validates once, at its end, so A and C select the same (last) state.
Training on CPU is bitwise deterministic (tests/test_resume.py), so B's test must equal C's
exactly. It must also differ from A's, which shows the override reached the evaluator. A's
checkpoint files must be unchanged: same names, sizes and modification times. D selects a state
before its last step; its retest without overrides must reproduce D's test (the selected state
is restored, not the last).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_harness import synth_shards as write_synth_shards
from launcher.retest import retest_job
from recsys_dist.config import REPO_ROOT, ConfigError

STEPS = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synth_shards(tmp_path_factory.mktemp("synth") / "shards", 300, 200, 40, 10)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def _launch(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train(out: Path, shards: Path, name: str, *extra: str) -> Path:
    _launch(["train", "--config", "configs/models/sasrec.yaml", "--nproc-per-node", "2", f"name={name}",
             f"output_dir={out}", "data.dataset=synthetic", f"data.shards_url={shards}",
             "data.build_if_missing=false", "data.max_len=10", "model.dim=16", "model.num_blocks=1",
             "train.batch_size=16", f"train.max_steps={STEPS}", "train.eval_every=0", "eval.batch_size=64",
             "eval.test_seeds=1", *extra])
    return out / name


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return out, _train(out, shards, "a")


def test_retest_equals_a_run_evaluated_that_way_from_the_start(finished, shards):
    out, run_a = finished
    before = _files(run_a / "checkpoints")
    _launch(["retest", str(run_a), "eval.mask_history=true", "--name", "b"])
    _train(out, shards, "c", "eval.mask_history=true")

    a, b, c = (json.loads((out / n / "metrics.json").read_text()) for n in ("a", "b", "c"))
    assert _files(run_a / "checkpoints") == before, "the retest wrote into the run's checkpoints"
    assert b["steps"] == a["steps"] == STEPS and b["selected_step"] == a["selected_step"] == c["selected_step"]
    assert b["protocol"]["mask_history"] is True and a["protocol"]["mask_history"] is False
    metrics = lambda run: {k: v for k, v in run["test"].items() if k != "seconds"}  # noqa: E731
    assert metrics(b) == metrics(c), (b["test"], c["test"])
    assert metrics(b) != metrics(a), "masking the seen items changed no metric: the override did not apply"
    record = json.loads((out / "b" / "retest.json").read_text())
    assert record["retest_of"] == str(run_a) and record["step"] == STEPS
    assert record["overrides"] == ["eval.mask_history=true"]


def test_retest_tests_the_selected_state_not_the_last(shards, tmp_path):
    # D validates every 5 steps and selects a state before its last step (asserted: the
    # precondition); a retest without overrides must then reproduce D's test exactly, which
    # testing the last state instead of the selected one (best/) would not
    run_d = _train(tmp_path, shards, "d", "train.eval_every=5", "train.lr=0.01", "sparse.lr=5.0")
    d = json.loads((run_d / "metrics.json").read_text())
    assert d["selected_step"] < d["steps"], f"precondition: D selected its last step {d['selected_step']}"
    _launch(["retest", str(run_d)])
    again = json.loads((tmp_path / "d-retest" / "metrics.json").read_text())
    assert again["selected_step"] == d["selected_step"]
    assert {k: v for k, v in again["test"].items() if k != "seconds"} == \
        {k: v for k, v in d["test"].items() if k != "seconds"}


def test_retest_refuses_what_it_cannot_test_unchanged(finished, tmp_path):
    out, run_a = finished
    with pytest.raises(ConfigError, match="the evaluation only"):
        retest_job(run_a, ["train.lr=0.1"], None)
    with pytest.raises(ConfigError, match="no metrics.json"):
        retest_job(tmp_path, ["eval.mask_history=true"], None)
    with pytest.raises(ConfigError, match="decides the selection"):
        retest_job(run_a, ["eval.select_metric=HR@10"], None)
    with pytest.raises(ConfigError, match="own directory"):
        retest_job(run_a, [], "a")
    with pytest.raises(ConfigError, match="eval.mask_history"):  # a wrongly typed value, before any launch
        retest_job(run_a, ["eval.mask_history=[1]"], None)
    with pytest.raises(ConfigError, match="eval.mask_scope"):
        retest_job(run_a, ["eval.mask_scope=window"], None)

    # a run whose last checkpoint is gone would resume from an earlier one and train on
    copy = tmp_path / "a"
    shutil.copytree(run_a, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["config"]["checkpoint"]["url"] = None
    (copy / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(copy / "checkpoints" / f"step-{STEPS:08d}")
    with pytest.raises(ConfigError, match=f"not the step it finished at \\({STEPS}\\)"):
        retest_job(copy, ["eval.mask_history=true"], None)

    metrics["config"]["checkpoint"]["enabled"] = False
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ConfigError, match="checkpoint.enabled=false"):
        retest_job(copy, ["eval.mask_history=true"], None)


def test_reproduce_retests_each_run_and_shows_the_retest_as_its_own_line(shards, tmp_path, monkeypatch):
    # a table row with a retest: reproduce trains the run (a real 2-rank job), retests its
    # selected state (a real job), and the table's "[masked]" line and the results json hold the
    # retest's own test, which differs from the row's; --reuse then reads both, running nothing;
    # --reuse with the retest's overrides changed runs the retest alone again, setting the old
    # one aside; a retest that cannot run is reported and the table still written
    import argparse

    import launcher.commands
    import launcher.reproduce as rp

    job = [f"output_dir={tmp_path / 'runs'}", "data.dataset=synthetic", f"data.shards_url={shards}",
           "data.build_if_missing=false", "data.max_len=10", "model.dim=16", "model.num_blocks=1",
           "train.batch_size=16", f"train.max_steps={STEPS}", "train.eval_every=0", "eval.batch_size=64",
           "eval.test_seeds=1"]
    row = rp.Row(name="a", config=str(REPO_ROOT / "configs/models/sasrec.yaml"), overrides=job,
                 retests={"masked": ["eval.mask_history=true"]})
    monkeypatch.setattr(rp.Table, "load", classmethod(lambda cls, name: rp.Table(name, [0], [row])))
    monkeypatch.setattr(rp, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = argparse.Namespace(table="t", rows=None, seeds=None, nproc_per_node=2, reuse=False, merge_from=None,
                              no_merge=True, overrides=[])
    assert rp.run(args) == 0
    runs = tmp_path / "runs"
    run = json.loads((runs / "repro-t-a-s0" / "metrics.json").read_text())
    retest = json.loads((runs / "repro-t-a-s0-masked" / "metrics.json").read_text())
    assert retest["protocol"]["mask_history"] is True and retest["selected_step"] == run["selected_step"]
    assert retest["test"]["NDCG@10"] != run["test"]["NDCG@10"]
    assert retest["popularity_test"]["HR@10"] != run["popularity_test"]["HR@10"]
    stored = json.loads((runs / "reproduce" / "t.json").read_text())["a"][0]
    assert stored["retests"]["masked"]["test"] == retest["test"]
    assert stored["retests"]["masked"]["popularity_test"] == retest["popularity_test"]
    text = (runs / "reproduce" / "t.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| a [masked] |"))
    assert line.split("|")[2].strip() == f"{100 * retest['test']['HR@10']:.2f}"
    assert f"| popularity [masked] | {100 * retest['popularity_test']['HR@10']:.2f} |" in text

    real_run_job = launcher.commands.run_job
    launched = []

    def counted(config, overrides, nproc):
        launched.append(Path(config).parent.name)
        return real_run_job(config, overrides, nproc)

    monkeypatch.setattr(launcher.commands, "run_job", counted)
    reuse = argparse.Namespace(**{**vars(args), "reuse": True})
    assert rp.run(reuse) == 0 and launched == []
    assert json.loads((runs / "reproduce" / "t.json").read_text())["a"][0]["retests"] == stored["retests"]

    row.retests = {"masked": ["eval.mask_history=true", "eval.mask_scope=input"]}
    assert rp.run(reuse) == 0 and launched == ["repro-t-a-s0-masked"]
    assert [p.name for p in runs.glob("repro-t-a-s0-masked.replaced-*")], "the earlier retest was not set aside"
    again = json.loads((runs / "repro-t-a-s0-masked" / "metrics.json").read_text())
    assert again["protocol"]["mask_scope"] == "input"

    (runs / "repro-t-a-s0" / "checkpoints").rename(runs / "moved")  # the retest cannot run now
    row.retests = {"masked": ["eval.mask_history=false"]}
    assert rp.run(reuse) == 1, "a retest that could not run must fail the command"
    stored = json.loads((runs / "reproduce" / "t.json").read_text())["a"][0]
    assert stored.get("retests", {}).get("masked", {}).get("overrides") != row.retests["masked"], \
        "the json holds a result for a retest that did not run"
    cells = {x.split("|")[1].strip(): [c.strip() for c in x.split("|")[2:-1]]
             for x in (runs / "reproduce" / "t.md").read_text().splitlines() if x.startswith("| a")}
    seeds = len(cells["a"]) - 3  # the columns: metrics..., paper, official code, target, seeds, epochs, minutes
    assert cells["a"][0] == f"{100 * run['test']['HR@10']:.2f}", "the row's own line must still be shown"
    assert cells["a [masked]"][seeds] == "0", "a retest that did not run is counted as a retested seed"
    assert f"{100 * again['test']['HR@10']:.2f}" not in cells["a [masked]"], "the earlier retest is shown as this one"
