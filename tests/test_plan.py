"""The capacity planner (``recsys_dist.sparse.planner``, CLI ``python -m launcher plan``):
TorchRec's planner on the trainer's own table description (meta tensors), per-rank memory,
refusals.

What the 10% checks compare (100M items x d=128, fp32, row-wise Adagrad, 8 simulated 80 GiB
GPUs, row-wise sharding):

* weights: each rank's ``rows * d * 4`` from the plan's shards vs the ideal ``N * d * 4 / W``
  (N = items + 1 rows, the padding row included);
* total: each rank's HBM estimate *as TorchRec's storage estimator reports it* (the shard's
  ``Storage.hbm``: weights + optimizer state + lookup input/output buffers) vs the ideal
  ``(N * d * 4 + N * 4) / W`` (weights + one fp32 Adagrad value per row).

Both are in fact within 1% (the plan is an even split; the buffers are ~13 MB per rank), so
an uneven plan, a missing shard, an unaccounted optimizer or a unit slip fails them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_dist.sparse import planner as P

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


@pytest.fixture(scope="module")
def plan_100m() -> P.CapacityPlan:
    return P.plan_capacity(100_000_000, 128, 8, 80 * GIB, batch_size=512, ids_per_sample=50)


def test_per_rank_memory_matches_even_split(plan_100m: P.CapacityPlan) -> None:
    plan = plan_100m
    n, d, w = 100_000_001, 128, 8
    ideal_weights = n * d * 4 / w
    ideal_total = (n * d * 4 + n * 4) / w
    assert plan.num_rows == n and len(plan.ranks) == w
    # every row is placed exactly once, each rank holds one full-width row block
    assert sum(s.rows for s in plan.shards) == n
    assert sorted(s.rank for s in plan.shards) == list(range(w))
    assert all(s.cols == d and s.col_offset == 0 for s in plan.shards)
    for r in plan.ranks:
        assert r.weights_bytes == r.rows * d * 4
        assert abs(r.weights_bytes - ideal_weights) <= 0.10 * ideal_weights, r
        assert abs(r.hbm_bytes - ideal_total) <= 0.10 * ideal_total, r
        # the breakdown adds up to the planner's estimate; rowwise adagrad = one fp32 per row
        assert r.optimizer_bytes == r.rows * 4
        assert 0 <= r.other_bytes < 0.01 * r.hbm_bytes
        assert r.weights_bytes + r.optimizer_bytes + r.other_bytes == r.hbm_bytes + r.ddr_bytes
        assert r.hbm_fraction == pytest.approx(r.hbm_bytes / (80 * GIB))
        assert r.fwd_compute_ms > 0 and r.fwd_comms_ms > 0 and r.bwd_comms_ms > 0
    assert plan.ideal_weights_per_rank == pytest.approx(ideal_weights, rel=1e-6)
    text = P.format_plan(plan)
    assert "ideal = N*d*bytes/W" in text and "weights GiB" in text and "fwd a2a" in text


def test_optimizer_and_dtype_change_the_estimate() -> None:
    sgd = P.plan_capacity(10_000_000, 64, 4, 80 * GIB, optimizer="sgd", dtype="fp16")
    adagrad = P.plan_capacity(10_000_000, 64, 4, 80 * GIB, dtype="fp16")
    for r, a in zip(sgd.ranks, adagrad.ranks):
        assert r.weights_bytes == a.weights_bytes == r.rows * 64 * 2
        assert r.optimizer_bytes == 0 and sgd.table_optimizer_bytes == 0
        assert a.optimizer_bytes == a.rows * 2  # one fp16 value per row, as TorchRec counts it
        assert a.hbm_bytes - r.hbm_bytes == a.optimizer_bytes


def test_planner_plans_the_trainers_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner builds and plans the table with the trainer's own functions (table.py),
    and refuses what the trainer refuses with the trainer's error."""
    import torch

    from recsys_dist.config import SparseConfig
    from recsys_dist.sparse import ShardedItemTable, check_sparse_config, spec, table

    built, planned = [], []
    item_collection, sharding_planner = table.item_collection, table.sharding_planner

    def spy_collection(num_rows, dim, cfg, **kw):
        ec = item_collection(num_rows, dim, cfg, **kw)
        built.append((num_rows, dim, cfg.sharding, cfg.optimizer, ec.embedding_configs()))
        return ec

    def spy_planner(cfg, *args, **kw):
        planned.append((cfg.sharding, cfg.optimizer))
        return sharding_planner(cfg, *args, **kw)

    monkeypatch.setattr(table, "item_collection", spy_collection)
    monkeypatch.setattr(table, "sharding_planner", spy_planner)
    plan = P.plan_capacity(1000, 16, 2, 80 * GIB, optimizer="sgd")

    class Built(Exception):  # the trainer's table, planned: stop before sharding (no process group)
        pass

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(table, "DistributedModelParallel", stop)
    with pytest.raises(Built):
        ShardedItemTable.create(1001, 16, SparseConfig(optimizer="sgd"), torch.device("cpu"), 8, seed=0)
    (p_rows, p_dim, *p_cfg, p_tables), (t_rows, t_dim, *t_cfg, t_tables) = built
    assert (p_rows, p_dim, p_cfg) == (t_rows, t_dim, t_cfg) == (plan.num_rows, 16, ["row_wise", "sgd"])
    assert planned == [("row_wise", "sgd")] * 2
    assert [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim, c.data_type) for c in p_tables] \
        == [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim, c.data_type) for c in t_tables] \
        == [(table.TABLE, [table.FEATURE], 1001, 16, c.data_type) for c in t_tables]
    assert {ln.split("|")[0].strip() for ln in plan.plan_text.splitlines() if "rank:" in ln} == {table.TABLE}

    # an optimizer (or combination) the trainer rejects: the same error, word for word
    for sharding, optimizer in (("row_wise", "adam"), ("row_wise", "adamw"), ("table_wise", "adam"),
                                ("replicated", "sgd")):
        with pytest.raises(ValueError) as trainer:
            check_sparse_config(SparseConfig(sharding=sharding, optimizer=optimizer))
        with pytest.raises(ValueError) as planner:
            P.plan_capacity(1000, 16, 2, 80 * GIB, sharding=sharding, optimizer=optimizer)
        assert str(planner.value) == str(trainer.value)
    with pytest.raises(ValueError, match="replicates the whole table"):  # accepted, not sharded
        P.plan_capacity(1000, 16, 2, 80 * GIB, sharding="data_parallel", optimizer="adamw")

    # the CLI offers exactly the trainer's sharded types and fused optimizers
    from launcher.__main__ import build_parser

    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices["plan"]._actions
               if a.dest == "optimizer")
    assert tuple(sub.choices) == spec.FUSED_OPTIMIZERS and "adam" not in sub.choices
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--items", "10", "--dim", "8", "--gpus", "1",
                                   "--gpu-mem", "1GiB", "--optimizer", "adam"])


def test_names_are_declared_once() -> None:
    """No second copy of the table/feature names, sharding types or optimizer lists: neither
    the CLI nor the planner spells them; the launcher's parser does not import torchrec."""
    import ast

    from recsys_dist.sparse import spec

    names = {"item", "adam", *spec.SHARDINGS, *spec.FUSED_OPTIMIZERS, *spec.DENSE_OPTIMIZERS}
    for path, allowed in ((ROOT / "launcher" / "plan.py", set()),
                          (ROOT / "recsys_dist" / "sparse" / "planner.py", set(spec.SHARDED))):
        consts = {n.value for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not (consts & names) - allowed, (path, consts & names)
    out = subprocess.run([sys.executable, "-c", "import sys, launcher.__main__; "
                          "sys.exit('torchrec' in sys.modules)"], cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, "building the launcher's parser imported torchrec"


def test_refuses_plan_that_does_not_fit() -> None:
    with pytest.raises(P.PlanDoesNotFit) as info:
        P.plan_capacity(1_000_000_000, 128, 2, 16 * GIB)
    err = info.value
    msg = str(err)
    # 1e9 x 128 x 4 B + 4 B/row = 480.6 GiB -> 240.3 GiB per rank; 16 GiB HBM, 13.6 usable
    assert "240.3 GiB per rank" in msg and "16.0 GiB HBM" in msg and "13.6 GiB" in msg, msg
    assert err.need_per_rank > 240 * GIB and err.available_per_rank < 16 * GIB
    assert err.min_gpus == 36 and "Need >= 36 GPUs" in msg, msg
    # and it does fit on that many
    P.plan_capacity(1_000_000_000, 128, 40, 16 * GIB)


def test_refuses_single_shard_too_large_for_one_gpu() -> None:
    with pytest.raises(P.PlanDoesNotFit, match="use row_wise"):
        P.plan_capacity(1_000_000_000, 128, 8, 80 * GIB, sharding="table_wise")


@pytest.mark.parametrize("text,expected", [
    ("80GiB", 80 * GIB), ("80GB", 80 * 10**9), ("81920MiB", 80 * GIB), ("1.5TiB", 3 * (1 << 39)),
    ("16 gib", 16 * GIB)])
def test_parse_size(text: str, expected: int) -> None:
    assert P.parse_size(text) == expected


def test_parse_rejects_ambiguous() -> None:
    with pytest.raises(ValueError):
        P.parse_size("80")
    assert P.parse_count("1_000_000_000") == P.parse_count("1e9") == 10**9


def test_planning_a_billion_rows_allocates_nothing() -> None:
    P.plan_capacity(1000, 16, 2, 80 * GIB)  # warm up lazy imports and caches

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rss0, peak0 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = P.plan_capacity(1_000_000_000, 128, 64, 80 * GIB)
    rss1, peak1 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert plan.table_weights_bytes > 500 * 10**9  # the planned table is 512 GB...
    assert rss1 - rss0 < 500 * 2**20, (rss0, rss1)  # ...and the process grew < 500 MiB
    assert peak1 - peak0 < 500 * 2**20, (peak0, peak1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "launcher", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end() -> None:
    out = _cli("--items", "100_000_000", "--dim", "128", "--gpus", "8", "--gpu-mem", "80GiB")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("plan: row_wise, kernel fused, 8 shard(s)", "weights GiB", "optim GiB",
                   "% HBM", "fwd compute", "bwd a2a", "ideal = N*d*bytes/W", "slowest rank"):
        assert needle in text, text
    # the rank table: 7 identical ranks and the last one, then the ideal line
    assert any(line.split()[:2] == ["0-6", "12,500,001"] for line in text.splitlines()), text



def test_cli_refusal_exits_nonzero(capsys: pytest.CaptureFixture) -> None:
    from launcher.__main__ import main  # the real parser, in-process (a subprocess costs ~10 s)

    rc = main(["plan", "--items", "1e9", "--dim", "128", "--gpus", "2", "--gpu-mem", "16GiB",
               "--json"])
    out = capsys.readouterr()
    assert rc == 1
    assert "does not fit" in out.err and "16.0 GiB HBM" in out.err and "240.3 GiB" in out.err
    refused = json.loads(out.out)
    assert refused["fits"] is False and refused["min_gpus"] == 36

    assert main(["plan", "--items", "1_000_000", "--dim", "64", "--gpus", "4",
                 "--gpu-mem", "81920MiB", "--json"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["fits"] is True and len(ok["ranks"]) == 4 and ok["gpu_mem_bytes"] == 80 * GIB
