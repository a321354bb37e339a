"""Epoch-based runs: train.max_epochs sets the run length from the real per-rank batch plan,
train.eval_every_epochs the validation cadence, train.patience stops early; the validation
records carry epoch and training wall time, and the learning-curve PNG is written. Also the
reproduction table's aggregation over training seeds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from distributed_harness import run_distributed
from recsys_dist.config import REPO_ROOT, default_data_dir

DATA = Path(default_data_dir()) / "ml-1m" / "raw" / "diffurec" / "interactions.tsv.gz"


def _fit(overrides: list[str]):
    from recsys_dist.config import load_config
    from recsys_dist.train.trainer import fit

    out = fit(load_config(str(REPO_ROOT / "configs/models/sasrec.yaml"), overrides))
    return {k: out[k] for k in ("steps", "steps_per_epoch", "epochs", "stopped_early", "validation", "selected_step")}


def _frozen_job(tmp_path: Path, name: str, max_epochs: int, checkpoints: bool = False) -> list[str]:
    """A SASRec job on 60 ML-1M users with lr 0 on both parts: validation never improves, so
    patience 1 stops at the 2nd epoch."""
    return ["data.dataset=ml-1m", "data.max_len=10", "data.source.max_users=60", "data.train_prefixes_per_user=4",
            f"data.shards_url={tmp_path / 'shards'}", f"output_dir={tmp_path}", f"name={name}",
            "train.batch_size=32", "train.max_steps=100000", f"train.max_epochs={max_epochs}", "train.eval_every_epochs=1",
            "train.patience=1", "train.lr=0.0", "sparse.optimizer=sgd", "sparse.lr=0.0", "model.dropout=0.0",
            "model.emb_dropout=0.0", "eval.val_max_users=null", *([] if checkpoints else ["checkpoint.enabled=false"])]


@pytest.mark.skipif(not DATA.exists(), reason=f"ML-1M not found at {DATA}")
def test_epochs_patience_and_curves(tmp_path) -> None:
    # lr 0 on both parts: validation can never improve, so patience 1 stops at the 2nd epoch
    overrides = _frozen_job(tmp_path, "epochs", 5)
    out = run_distributed(_fit, 2, overrides)[0]
    spe = out["steps_per_epoch"]
    assert spe == 240 // 64  # 60 users x 4 prefixes, global batch 2 x 32, drop_last
    assert out["stopped_early"] is True and out["steps"] == 2 * spe and math.isclose(out["epochs"], 2.0)
    val = out["validation"]
    assert [s for s, _ in val] == [spe, 2 * spe]
    assert [m["epoch"] for _, m in val] == [1.0, 2.0]
    assert 0 < val[0][1]["train_seconds"] < val[1][1]["train_seconds"]
    assert out["selected_step"] == spe  # the first of equal values is kept
    assert (tmp_path / "epochs" / "curve.png").stat().st_size > 0


@pytest.mark.skipif(not DATA.exists(), reason=f"ML-1M not found at {DATA}")
def test_patience_running_out_at_the_last_validation_is_not_an_early_stop(tmp_path) -> None:
    # lr 0, patience 1, 2 epochs: the 2nd validation is not better, at the run's planned end
    overrides = _frozen_job(tmp_path, "to-the-end", 2)
    out = run_distributed(_fit, 2, overrides)[0]
    assert out["steps"] == 2 * out["steps_per_epoch"] and out["selected_step"] == out["steps_per_epoch"]
    assert out["stopped_early"] is False


def _fit_three_times(overrides: list[str]):
    """The same early-stopped job run again (it resumes its last checkpoint), then again with
    a larger patience."""
    return [_fit(overrides), _fit(overrides), _fit([*overrides, "train.patience=2"])]


@pytest.mark.skipif(not DATA.exists(), reason=f"ML-1M not found at {DATA}")
def test_a_resumed_early_stopped_run_does_not_train_past_its_stop(tmp_path) -> None:
    # lr 0: validation never improves; patience 1 stops at the 2nd epoch. Run again, the job
    # resumes that checkpoint and must only select and test; patience 2 lets it train one more
    overrides = _frozen_job(tmp_path, "resumed-stop", 5, checkpoints=True)
    first, again, longer = run_distributed(_fit_three_times, 2, overrides)[0]
    spe = first["steps_per_epoch"]
    assert first["stopped_early"] and first["steps"] == 2 * spe
    assert again["stopped_early"] and again["steps"] == 2 * spe and again["validation"] == first["validation"]
    assert again["selected_step"] == first["selected_step"] == spe
    assert longer["stopped_early"] and longer["steps"] == 3 * spe
    assert [s for s, _ in longer["validation"]] == [spe, 2 * spe, 3 * spe]


def _selection_memory(overrides: list[str]):
    """A state selected before training moves on is copied then (not at its validation) and
    restored for the test; a state selected at the run's end is never copied."""
    import torch

    from recsys_dist.config import load_config
    from recsys_dist.train.trainer import Trainer

    t = Trainer(load_config(str(REPO_ROOT / "configs/models/sasrec.yaml"), overrides))
    t.validate()  # step 0: the first validation is the best so far
    dense0 = {k: v.clone() for k, v in t.engine.module.state_dict().items()}
    rows0 = t.table.full_table()
    copied_at_validation = t.best is not None
    t.train_epoch()  # no validation inside (eval_every 0): the step-0 state stays selected
    moved = not torch.equal(rows0, t.table.full_table())
    copied_before_training = t.best is not None and t.best.step == 0
    t.select_and_test()
    restored = torch.equal(rows0, t.table.full_table()) and all(
        torch.equal(dense0[k], v) for k, v in t.engine.module.state_dict().items())
    end = Trainer(load_config(str(REPO_ROOT / "configs/models/sasrec.yaml"), [*overrides, "name=at-end"]))
    payload = end.fit()  # validated once, at the end: that state is tested as it is
    return {"copied_at_validation": copied_at_validation, "moved": moved,
            "copied_before_training": copied_before_training, "restored": restored,
            "end_copied": end.best is not None, "end_selected": payload["selected_step"] == payload["steps"]}


@pytest.mark.skipif(not DATA.exists(), reason=f"ML-1M not found at {DATA}")
@pytest.mark.parametrize("where", ["memory", "storage"])
def test_the_selected_state_is_copied_only_when_training_moves_on(tmp_path, where: str) -> None:
    # memory: no checkpoints, the copy is the only one; storage: checkpoints on and a table above
    # checkpoint.best_in_memory_max_gib (0), so the test reloads best/ instead of copying it
    keep = ["checkpoint.enabled=false"] if where == "memory" else ["checkpoint.best_in_memory_max_gib=0"]
    overrides = ["data.dataset=ml-1m", "data.max_len=10", "data.source.max_users=60", "data.train_prefixes_per_user=4",
                 f"data.shards_url={tmp_path / 'shards'}", f"output_dir={tmp_path}", "name=select",
                 "train.batch_size=32", "train.max_steps=3", "train.eval_every=0", "train.lr=0.01",
                 "sparse.lr=0.5", "eval.val_max_users=null", *keep]
    for out in run_distributed(_selection_memory, 2, overrides):
        assert out == {"copied_at_validation": False, "moved": True, "copied_before_training": where == "memory",
                       "restored": True, "end_copied": False, "end_selected": True}, out


def test_reproduce_table_aggregates_over_training_seeds() -> None:
    from launcher.reproduce import Row, Table, summarize

    def run(hr10: float) -> dict:
        test = {"HR@10": hr10, "NDCG@10": hr10 / 2, "HR@20": hr10 * 2, "NDCG@20": hr10}
        return {"test": test, "popularity_test": {k: 0.01 for k in test}, "epochs": 3.0, "train_seconds": 120.0,
                "config": {"train": {"seed": round(hr10 * 10) + 3}}}

    table = Table("t", [0, 1, 2], [Row("m", "configs/x.yaml", paper={"HR@10": 7.9})])
    text = summarize(table, {"m": [run(0.10), run(0.20), run(0.30)]}, "cmd")
    row = next(line for line in text.splitlines() if line.startswith("| m |"))
    cells = [c.strip() for c in row.split("|")[2:6]]
    assert cells[0] == "20.00 ± 10.00"  # mean and sample sd of 10, 20, 30 %
    assert cells[1] == "10.00 ± 5.00"
    assert row.split("|")[9].strip() == "3 (4, 5, 6)"  # how many seeds, and which
    assert "| popularity | 1.00 |" in text
    # one training seed has no spread: its value alone, never a "± 0.00" that reads as a measured one
    text = summarize(table, {"m": [run(0.10)]}, "cmd")
    row = next(line for line in text.splitlines() if line.startswith("| m |"))
    assert [c.strip() for c in row.split("|")[2:4]] == ["10.00", "5.00"]


def test_reproduce_footer_command_reruns_the_same_selection() -> None:
    # the table's footer names the command that made it: parsed again, it selects the same
    # rows, seeds, reuse and overrides (a footer without --rows/--reuse once misdescribed a table)
    import shlex

    from launcher.__main__ import parse_args
    from launcher.reproduce import command_line

    for argv in (["ml1m"], ["ml1m", "--rows", "diffurec", "sasrec", "--seeds", "0", "2", "--reuse",
                            "--nproc-per-node", "1", "--merge-from", "x.json", "train.max_epochs=3"]):
        args = parse_args(["reproduce", *argv])
        again = parse_args(shlex.split(command_line(args))[3:])
        assert vars(again) == vars(args), command_line(args)


def test_reproduce_keeps_the_runs_not_run_now(tmp_path) -> None:
    # a table filled row by row and seed by seed: a (row, seed) run now replaces its earlier run,
    # a seed without a result now (not run, or failed) keeps it, rows no longer in the table are
    # dropped, the merged rows list their runs by seed, a broken file is one error
    import json

    from launcher.reproduce import Row, Table, kept_results, merge_results, read_results
    from recsys_dist.config import ConfigError

    def run(seed: int, tag: str) -> dict:
        return {"config": {"train": {"seed": seed}}, "tag": tag}

    table = Table("t", [0], [Row(n, "configs/x.yaml") for n in ("a", "b", "c")])
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"a": [run(0, "a0"), run(2, "a2")], "b": [run(0, "b0")], "gone": [run(0, "g")], "c": []}))
    previous = read_results(path)
    assert kept_results(table, {"a": {0, 2}}, previous) == {"b": [run(0, "b0")]}
    assert kept_results(table, {}, previous) == {"a": [run(0, "a0"), run(2, "a2")], "b": [run(0, "b0")]}
    assert kept_results(table, {"a": {0, 2}, "b": {0}, "c": {0}}, previous) == {}
    kept = kept_results(table, {"a": {1, 2}}, previous)  # seeds 1 and 2 ran now: seed 0's earlier run stays
    assert kept == {"a": [run(0, "a0")], "b": [run(0, "b0")]}
    now = {"a": [run(2, "new2"), run(1, "new1")]}
    assert merge_results(table, now, kept) == {"a": [run(0, "a0"), run(1, "new1"), run(2, "new2")], "b": [run(0, "b0")]}
    assert read_results(None) == {} and read_results(tmp_path / "missing.json") == {}
    with pytest.raises(ConfigError, match="missing.json"):  # an explicit --merge-from must exist
        read_results(tmp_path / "missing.json", required=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="t.json"):
        read_results(path)


def test_reproduce_flags_kept_runs_whose_row_changed() -> None:
    from launcher.reproduce import Row, Table, job_overrides, stale_runs
    from recsys_dist.config import load_config

    row = Row("sasrec", "configs/zhihu_sasrec.yaml", overrides=["train.max_epochs=20"])
    table = Table("t", [0], [row])
    stored = load_config(REPO_ROOT / row.config, job_overrides(table, row, 0, [])).to_dict()
    stored["output_dir"], stored["data"]["shards_url"] = "/elsewhere", "/elsewhere/shards"  # where it ran: fine
    assert stale_runs(table, {"sasrec": [{"config": stored}]}) == []
    row.overrides = ["train.max_epochs=30"]  # the table asks for another budget now
    assert stale_runs(table, {"sasrec": [{"config": stored}]}) == ["sasrec seed 0: train.max_epochs: stored 20 != now 30"]


def test_reproduce_trains_a_row_again_from_scratch(tmp_path) -> None:
    # a rerun must not resume the finished run's checkpoints (it would continue the old run
    # under the new row's settings): the old run dir is set aside, nothing is deleted; --reuse
    # takes a finished run only if its stored config is the row's now
    import json

    from launcher.commands import reusable_run
    from launcher.reproduce import set_aside
    from recsys_dist.config import load_config

    run_dir = tmp_path / "repro-t-a-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(REPO_ROOT / "configs/zhihu_sasrec.yaml", ["train.eval_every_epochs=2"])
    (run_dir / "metrics.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert reusable_run(run_dir / "metrics.json", cfg)
    assert reusable_run(run_dir / "metrics.json", load_config(REPO_ROOT / "configs/zhihu_sasrec.yaml",
                                                          ["train.eval_every_epochs=2", "output_dir=/elsewhere"]))
    assert not reusable_run(run_dir / "metrics.json", load_config(REPO_ROOT / "configs/zhihu_sasrec.yaml",
                                                              ["train.eval_every_epochs=1"]))
    assert not reusable_run(tmp_path / "missing" / "metrics.json", cfg)
    aside = set_aside(run_dir)
    assert not run_dir.exists() and (aside / "checkpoints").is_dir() and (aside / "metrics.json").exists()
    assert aside.name.startswith("repro-t-a-s0.replaced-")
    assert set_aside(run_dir) is None
    (run_dir / "checkpoints").mkdir(parents=True)  # interrupted (no metrics.json): kept, so it resumes
    assert set_aside(run_dir) is None and (run_dir / "checkpoints").is_dir()


def test_learning_curves_of_a_table_one_colour_per_row_one_style_per_seed(tmp_path, monkeypatch) -> None:
    # reproduce's PNG: (row, seed, validation) runs; a row name may itself contain " s<digits>"
    from matplotlib import pyplot as plt

    from recsys_dist.train.report import plot_learning_curves

    val = [(10, {"NDCG@10": 0.01, "epoch": 1, "train_seconds": 30.0}),
           (20, {"NDCG@10": 0.02, "epoch": 2, "train_seconds": 60.0})]
    runs = [("sasrec s2", 0, val), ("sasrec s2", 1, val), ("gru4rec", 0, val), ("empty", 0, [])]
    captured = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, path, **kw):
        captured["lines"] = [(line.get_color(), line.get_linestyle()) for line in fig.axes[0].lines]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    plot_learning_curves(runs, tmp_path / "t_curves.png")
    assert (tmp_path / "t_curves.png").stat().st_size > 0
    (c0, s0), (c1, s1), (c2, s2) = captured["lines"]  # the empty run draws nothing
    assert c0 == c1 != c2 and s0 == s2 != s1


def test_reproduce_writes_its_table_when_a_config_breaks_while_the_runs_train(tmp_path, monkeypatch) -> None:
    # a row's YAML edited while its runs train (a field this process's code does not know) must
    # not stop the table, its json and its curves being written from the finished runs
    import argparse
    import json

    import launcher.commands
    import launcher.reproduce as rp
    from recsys_dist.config import ConfigError, load_config

    config = str(REPO_ROOT / "configs/ml1m_sasrec-allpos.yaml")
    row = rp.Row(name="a", config=config, overrides=[f"output_dir={tmp_path / 'runs'}"])
    monkeypatch.setattr(rp.Table, "load", classmethod(lambda cls, name: rp.Table(name, [0], [row])))
    monkeypatch.setattr(rp, "REPO_ROOT", tmp_path)
    finished = json.loads((REPO_ROOT / "docs/results/ml1m.json").read_text())["sasrec-allpos"][0]

    def broken(*args, **kwargs):
        raise ConfigError(f"{config}: unknown config field 'model.new_field'")

    def run_job(path, overrides, nproc):  # the run finishes, then its YAML no longer loads here
        cfg = load_config(path, overrides)
        cfg.run_dir().mkdir(parents=True)
        (cfg.run_dir() / "metrics.json").write_text(json.dumps({**finished, "config": cfg.to_dict()}))
        monkeypatch.setattr(rp, "load_config", broken)
        return 0

    monkeypatch.setattr(launcher.commands, "run_job", run_job)
    args = argparse.Namespace(table="t", rows=None, seeds=None, nproc_per_node=2, reuse=False, merge_from=None,
                              no_merge=True, overrides=[])
    assert rp.run(args) == 0
    out = tmp_path / "runs" / "reproduce"
    assert "| a | 22.67 | 11.20 |" in (out / "t.md").read_text()
    assert json.loads((out / "t.json").read_text())["a"][0]["test"] == finished["test"]
    assert (out / "t_curves.png").stat().st_size > 0


@pytest.mark.parametrize("config, retest, message", [
    ("ml1m_sasrec-allpos", ["train.lr=0.1"], "the evaluation only"),
    ("ml1m_sasrec-allpos", ["eval.select_metric=HR@10"], "decides the selection"),
    ("ml1m_sasrec-allpos", ["eval.mask_scope=window"], "eval.mask_scope"),
    ("ml1m-diffrec_diffrec", ["eval.mask_history=true"], "writes no checkpoints")])
def test_reproduce_refuses_a_bad_retest_before_anything_trains(tmp_path, monkeypatch, config, retest, message) -> None:
    import argparse

    import launcher.commands
    import launcher.reproduce as rp
    from recsys_dist.config import ConfigError

    row = rp.Row(name="a", config=str(REPO_ROOT / f"configs/{config}.yaml"), retests={"x": retest})
    monkeypatch.setattr(rp.Table, "load", classmethod(lambda cls, name: rp.Table(name, [0], [row])))
    monkeypatch.setattr(rp, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(launcher.commands, "run_job", lambda *a, **k: pytest.fail("a job launched"))
    args = argparse.Namespace(table="t", rows=None, seeds=None, nproc_per_node=2, reuse=False, merge_from=None,
                              no_merge=True, overrides=[])
    with pytest.raises(ConfigError, match=f"row 'a' retest 'x': .*{message}"):
        rp.run(args)


def test_reproduce_table_refuses_malformed_retests(tmp_path, monkeypatch) -> None:
    import launcher.reproduce as rp
    from recsys_dist.config import ConfigError

    (tmp_path / "configs" / "reproduce").mkdir(parents=True)
    monkeypatch.setattr(rp, "REPO_ROOT", tmp_path)
    for retests in ("[eval.mask_history=true]", "{x: eval.mask_history=true}", "{a/b: [eval.mask_history=true]}"):
        (tmp_path / "configs" / "reproduce" / "t.yaml").write_text(
            f"rows:\n  - name: a\n    config: c.yaml\n    retests: {retests}\n")
        with pytest.raises(ConfigError, match="row 'a': retests must map a label"):
            rp.Table.load("t")
