"""The replicated item table (``sparse.sharding=data_parallel``): TorchRec DATA_PARALLEL sharding,
dense kernel, DDP-averaged gradients, stepped by a torch optimizer (AdamW, as the official
DreamRec code trains its item table) after the backward.

What must hold, and how closely:
- init: the replica's rows equal the row-wise sharded table's, bit for bit (one seeded stream),
  on 1 and 2 ranks;
- the replicas stay bitwise identical across ranks (DDP hands every rank the same all-reduced
  gradient, every rank applies the same optimizer step);
- 2 ranks vs 1 rank on the same global batches: plain SGD (scale-sensitive: a summed instead of
  averaged gradient doubles the step) to 1e-5, as tests/test_sharded_training.py (measured:
  2.1e-7); AdamW: its update m / (sqrt(v) + eps) has, per element, a magnitude of about lr
  whatever the gradient's size, so float-order noise in a near-zero gradient element (1 rank vs
  the 2-rank all-reduce) could move that element by up to lr (1e-2 here) the other way. Here no
  element is that close to zero (full softmax: every real row has a sizeable gradient) and the
  difference stays at float-order size: measured max |T1 - T2| = 1.2e-6 and ||T1 - T2|| = 1.2e-6 of
  the travel ||T1 - T0|| after 10 steps of lr 1e-2 (rows move up to 0.1). Bounds: max 2e-5 (16x
  the measured; a single flipped element would show as ~1e-2) and ||T1 - T2|| <= 1e-4 x travel
  (test_sharded_training.py allows 1% for the dense Adam weights, which do have near-zero
  gradients); losses to 1e-5;
- the replicated table trains as the sharded one does: data_parallel vs row_wise on 2 ranks, SGD
  and row-wise Adagrad (TorchRec's dense RowWiseAdagrad vs fbgemm's fused kernel, the same
  algorithm), to 1e-5 -- an independent check of the dense kernel's gradient (fbgemm's CPU dense
  kernel pools under PoolingMode.NONE, pytorch/FBGEMM#4586: the table looks ids up one per bag);
- row 0 (padding) is never looked up: it stays exactly zero (AdamW weight decay 0.01 on, which
  only scales it), as do its AdamW moments;
- checkpoints: save -> load restores the rows and the AdamW state (exp_avg, exp_avg_sq, step)
  bit for bit, and training on from the loaded state equals training on without the restart
  (bitwise); the best-weights copy (save_best / load_best) restores the replica too;
- adamw with a sharded table (and unknown combinations) is refused before anything is built.

train_step calls ``table.step_optimizer()`` itself; ``_step`` calls it once more, which finds no
gradient and does nothing (so the results show the second call is a no-op).
"""

import numpy as np
import pytest
import torch

from distributed_harness import run_distributed
from model_checks import left_padded_batches, small_model_config

ROWS, DIM, L, GLOBAL_B, STEPS = 301, 16, 10, 16, 10

# name: (sparse.sharding, sparse.optimizer, sparse.lr, sparse.weight_decay, dense optimizer, dense lr)
CONFIGS = {
    "dp-sgd": ("data_parallel", "sgd", 0.5, 0.0, "sgd", 0.1),
    "rw-sgd": ("row_wise", "sgd", 0.5, 0.0, "sgd", 0.1),
    "dp-adamw": ("data_parallel", "adamw", 1e-2, 0.01, "adamw", 1e-3),
    "dp-adagrad": ("data_parallel", "rowwise_adagrad", 0.05, 0.0, "adamw", 1e-3),
    "rw-adagrad": ("row_wise", "rowwise_adagrad", 0.05, 0.0, "adamw", 1e-3),
}


def _batches(steps=STEPS, seed=3):
    return left_padded_batches(seed, steps, GLOBAL_B, ROWS, L)


def _setup(name, world):
    from recsys_dist.config import JobConfig
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import seed_everything
    from recsys_dist.train.engine import build_engine

    sharding, optimizer, lr, wd, dense_opt, dense_lr = CONFIGS[name]
    cfg = JobConfig()
    cfg.model = small_model_config("sasrec", dim=DIM, num_heads=2, num_blocks=1, dropout=0.0, emb_dropout=0.0)
    cfg.sparse.sharding, cfg.sparse.optimizer, cfg.sparse.lr = sharding, optimizer, lr
    cfg.sparse.weight_decay = wd
    cfg.sparse.init_block_rows = 64  # several init blocks
    cfg.train.optimizer, cfg.train.lr, cfg.train.grad_clip = dense_opt, dense_lr, 0.0
    cfg.train.batch_size = GLOBAL_B // world
    seed_everything(0)
    model = build_model(cfg.model, L)
    table = ShardedItemTable.create(ROWS, DIM, cfg.sparse, torch.device("cpu"), cfg.train.batch_size, seed=5)
    return cfg, table, build_engine(model, cfg.train, torch.device("cpu"))


def _step(engine, table, hist, target, step, rank, b):
    from recsys_dist.train.step import train_step

    loss = train_step(engine, table, hist[rank * b:(rank + 1) * b], target[rank * b:(rank + 1) * b], step, seed=0)
    table.step_optimizer()  # a no-op once train_step calls it (no gradient left)
    return loss.item()


def _adam_state(table):
    if not table.replicated or table.dense_optimizer._optimizer.__class__.__name__ != "AdamW":
        return {}
    st = table.optimizer_state_dict()["state"]["embeddings.item.weight"]
    return {k: v.detach().clone() for k, v in st.items()}


def _train(names):
    from recsys_dist.distributed import row_range
    from recsys_dist.distributed import init_distributed

    rank, world = init_distributed(torch.device("cpu"))
    out = {}
    for name in names:
        cfg, table, engine = _setup(name, world)
        initial = table.full_table()
        b = cfg.train.batch_size
        losses = [_step(engine, table, hist, target, step, rank, b)
                  for step, (hist, target) in enumerate(_batches())]
        res = {"initial": initial, "final": table.full_table(), "losses": torch.tensor(losses),
               "adam": _adam_state(table)}
        if table.replicated:
            # a second step_optimizer without a backward in between changes nothing
            before = table.full_table()
            table.step_optimizer()
            res["idempotent"] = bool(torch.equal(before, table.full_table()))
            # placement and evaluation views of the replica
            shards = table.local_shards()
            res["shards"] = [(r, c, tuple(t.shape)) for r, c, t in shards]
            lo, hi = table.score_block()
            res["block_ok"] = (lo, hi) == row_range(ROWS, world, rank) and \
                bool(torch.equal(table.rows(lo, hi), res["final"][lo:hi]))
            res["lookup_ok"] = bool(torch.equal(table.lookup([torch.arange(ROWS)])[0].detach(), res["final"]))
        # the evaluator's score block: the rank's rows as a view of the table (no copy), which
        # therefore follows the table when it trains on
        lo, hi = table.score_block()
        view = table.score_rows()
        res["score_rows_equal"] = bool(torch.equal(view, res["final"][lo:hi]))
        hist, target = next(iter(_batches(1, seed=11)))
        _step(engine, table, hist, target, STEPS, rank, b)
        res["score_rows_follow"] = bool(torch.equal(view, table.full_table()[lo:hi])) and \
            not bool(torch.equal(view, res["final"][lo:hi]))
        out[name] = res
    return out


@pytest.fixture(scope="module")
def runs():
    one = run_distributed(_train, 1, ["dp-sgd", "dp-adamw"])[0]
    two = run_distributed(_train, 2, list(CONFIGS))
    return one, two


def test_replicas_identical_and_views_consistent(runs):
    one, two = runs
    for name in ("dp-sgd", "dp-adamw", "dp-adagrad"):
        r0, r1 = two[0][name], two[1][name]
        assert np.array_equal(r0["final"], r1["final"]), name
        for k in r0["adam"]:
            assert np.array_equal(r0["adam"][k], r1["adam"][k]), (name, k)
        for r in (r0, r1):
            assert r["shards"] == [(0, 0, (ROWS, DIM))], r["shards"]
            assert r["block_ok"] and r["lookup_ok"] and r["idempotent"], name
    assert one["dp-adamw"]["idempotent"] and one["dp-adamw"]["block_ok"] and one["dp-adamw"]["lookup_ok"]


def test_the_score_block_is_a_view_of_the_rows(runs):
    """``score_rows`` (what evaluation ranks against) equals the rank's rows and shares their
    storage (a later step shows through it) for the replica and for row-wise shards."""
    one, two = runs
    for results in (two[0], two[1], one):
        for name, r in results.items():
            assert r["score_rows_equal"] and r["score_rows_follow"], name


def test_init_is_the_sharded_tables(runs):
    one, two = runs
    ref = two[0]["rw-sgd"]["initial"]
    for name in ("dp-sgd", "dp-adamw"):
        assert np.array_equal(one[name]["initial"], ref)
        assert np.array_equal(two[0][name]["initial"], ref) and np.array_equal(two[1][name]["initial"], ref)
    assert (ref[0] == 0).all()


def test_padding_row_stays_zero(runs):
    one, two = runs
    for res in (one["dp-adamw"], two[0]["dp-adamw"], two[0]["dp-sgd"], two[0]["dp-adagrad"]):
        assert (res["final"][0] == 0).all()
    adam = two[0]["dp-adamw"]["adam"]
    assert (adam["exp_avg"][0] == 0).all() and (adam["exp_avg_sq"][0] == 0).all()
    assert float(adam["step"]) == STEPS


def test_two_ranks_match_one_rank_sgd(runs):
    """Plain SGD pins the gradient scale: the DDP average of the ranks' per-sample means is the
    gradient of the global mean."""
    one, two = runs
    a, b = one["dp-sgd"], two[0]["dp-sgd"]
    assert abs(a["final"] - a["initial"]).max() > 1e-3, "the table did not train"
    assert abs(b["losses"] - a["losses"]).max() < 1e-5
    assert abs(b["final"] - a["final"]).max() < 1e-5


def test_two_ranks_match_one_rank_adamw(runs):
    one, two = runs
    a, b = one["dp-adamw"], two[0]["dp-adamw"]
    travel = np.linalg.norm(a["final"] - a["initial"])
    diff = np.linalg.norm(b["final"] - a["final"])
    assert abs(a["final"] - a["initial"]).max() > 1e-2, "the table did not train"
    assert diff <= 1e-4 * travel, (diff, travel)
    assert abs(b["final"] - a["final"]).max() <= 2e-5
    assert abs(b["losses"] - a["losses"]).max() < 1e-5
    # every real row received gradients (full softmax): its moments moved
    assert (np.abs(a["adam"]["exp_avg_sq"][1:]).sum(1) > 0).all()


def test_replicated_trains_as_sharded(runs):
    _, two = runs
    for opt in ("sgd", "adagrad"):
        dp, rw = two[0][f"dp-{opt}"], two[0][f"rw-{opt}"]
        assert abs(dp["final"] - dp["initial"]).max() > 1e-3, opt
        assert abs(dp["losses"] - rw["losses"]).max() < 1e-5, opt
        assert abs(dp["final"] - rw["final"]).max() < 1e-5, opt


# ---------------------------------------------------------------- checkpoints

def _snapshot(table, engine):
    return {"table": table.full_table(), "adam": _adam_state(table),
            "dense": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


def _ckpt_run(url, phase):
    from recsys_dist.train.checkpoint import CheckpointManager, TrainState
    from recsys_dist.distributed import init_distributed

    rank, world = init_distributed(torch.device("cpu"))
    cfg, table, engine = _setup("dp-adamw", world)
    cfg.sparse.weight_decay = 0.0  # not a SparseConfig field yet: not in the saved config either
    table.dense_optimizer._optimizer.param_groups[0]["weight_decay"] = 0.0
    b = cfg.train.batch_size
    batches = _batches(5, seed=11)
    manager = CheckpointManager(url, cfg, ROWS)
    out = {}
    if phase == "save":
        for step in range(3):
            _step(engine, table, *batches[step], step, rank, b)
        manager.save(engine, table, TrainState(step=3, epoch=0, batch_in_epoch=3))
        manager.save_best(engine, table, 3, 0.5)
    else:
        state = manager.load(manager.latest(), engine, table)
        out["state_step"] = state.step
    out["at3"] = _snapshot(table, engine)
    for step in range(3, 5):
        _step(engine, table, *batches[step], step, rank, b)
    out["at5"] = _snapshot(table, engine)
    if phase == "save":
        manager.load_best(engine, table, 3)
        out["best_ok"] = bool(torch.equal(table.full_table(), torch.as_tensor(out["at3"]["table"])))
    return out


def _same(a, b):
    assert np.array_equal(a["table"], b["table"])
    assert set(a["adam"]) == {"step", "exp_avg", "exp_avg_sq"} and set(b["adam"]) == set(a["adam"])
    for k in a["adam"]:
        assert np.array_equal(a["adam"][k], b["adam"][k]), k
    for k in a["dense"]:
        assert np.array_equal(a["dense"][k], b["dense"][k]), k


def test_checkpoint_round_trip_is_exact(tmp_path):
    url = str(tmp_path / "ckpt")
    saved = run_distributed(_ckpt_run, 2, url, "save")
    resumed = run_distributed(_ckpt_run, 2, url, "resume")
    assert saved[0]["best_ok"] and saved[1]["best_ok"]
    assert float(saved[0]["at3"]["adam"]["step"]) == 3 and np.abs(saved[0]["at3"]["adam"]["exp_avg_sq"]).sum() > 0
    for r in range(2):
        assert resumed[r]["state_step"] == 3
        _same(saved[r]["at3"], resumed[r]["at3"])  # the loaded state is the saved one
        _same(saved[r]["at5"], resumed[r]["at5"])  # and training on from it is the uninterrupted run
    assert not np.array_equal(saved[0]["at3"]["table"], saved[0]["at5"]["table"])


# ---------------------------------------------------------------- refused configurations

@pytest.mark.parametrize("sharding", ["row_wise", "table_wise", "column_wise"])
def test_adamw_needs_data_parallel(sharding):
    from recsys_dist.config import SparseConfig
    from recsys_dist.sparse import ShardedItemTable, check_sparse_config

    cfg = SparseConfig(sharding=sharding, optimizer="adamw")
    with pytest.raises(ValueError, match="adamw needs sparse.sharding=data_parallel"):
        check_sparse_config(cfg)
    with pytest.raises(ValueError, match="adamw needs sparse.sharding=data_parallel"):  # before building anything
        ShardedItemTable.create(ROWS, DIM, cfg, torch.device("cpu"), 8, seed=0)


def test_other_bad_combinations_are_refused():
    from recsys_dist.config import SparseConfig
    from recsys_dist.sparse import check_sparse_config

    with pytest.raises(ValueError, match="unknown sparse.optimizer 'adam'.*data_parallel"):
        check_sparse_config(SparseConfig(sharding="data_parallel", optimizer="adam"))
    with pytest.raises(ValueError, match="unknown sparse.sharding 'replicated'"):
        check_sparse_config(SparseConfig(sharding="replicated"))
    bad = SparseConfig(sharding="data_parallel", optimizer="sgd")
    bad.weight_decay = 0.1
    with pytest.raises(ValueError, match="weight_decay"):
        check_sparse_config(bad)
    for sharding, opt in (("data_parallel", "adamw"), ("data_parallel", "sgd"), ("data_parallel", "rowwise_adagrad"),
                          ("row_wise", "rowwise_adagrad"), ("row_wise", "sgd")):
        check_sparse_config(SparseConfig(sharding=sharding, optimizer=opt))


def test_eager_adamw_state_equals_torch_lazy_init():
    """The table creates AdamW's state before the first step (so a checkpoint loads in place):
    it must be exactly the state torch would create lazily -- same steps, bitwise."""
    from recsys_dist.sparse.table import _init_optimizer_state

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 4, generator=g)
    grads = [torch.randn(7, 4, generator=g) for _ in range(4)]
    params = [torch.nn.Parameter(w0.clone()) for _ in range(2)]
    opts = [torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) for p in params]
    _init_optimizer_state(opts[1])
    for grad in grads:
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(params[0], params[1])
    for k in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(opts[0].state[params[0]][k], opts[1].state[params[1]][k]), k


def _forgotten_step():
    from recsys_dist.config import SparseConfig
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import init_distributed

    init_distributed(torch.device("cpu"))
    table = ShardedItemTable.create(ROWS, DIM, SparseConfig(sharding="data_parallel", optimizer="adamw"),
                                    torch.device("cpu"), 8, seed=0)
    table.lookup([torch.tensor([1, 2])])[0].sum().backward()
    with torch.no_grad():
        table.lookup([torch.tensor([3])])  # evaluation lookups do not mind
        empty = table.lookup([torch.zeros(0, dtype=torch.long)])[0]  # a rank out of eval users
        assert empty.shape == (0, DIM)
    try:
        table.lookup([torch.tensor([3])])
    except RuntimeError as exc:
        return str(exc)
    return None


def test_a_forgotten_step_is_an_error():
    """Without step_optimizer() after the backward the replica would silently never train."""
    msg = run_distributed(_forgotten_step, 1)[0]
    assert msg is not None and "step_optimizer()" in msg, msg
