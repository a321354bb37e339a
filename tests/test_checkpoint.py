"""Checkpoints: re-sharding across world sizes, refusal of bad checkpoints, the hang watchdog.

Re-sharding must be exact (bitwise): a checkpoint is a copy of numbers, no arithmetic happens
between save and load, so 2 ranks -> 1 rank -> 2 ranks gives back the same table rows, the same
fused (row-wise Adagrad) optimizer state, the same dense weights and the same dense (ZeRO-1
partitioned) Adam moments.
"""

import os
import time

import numpy as np
import pytest
import torch

from distributed_harness import run_distributed
from model_checks import small_model_config

ROWS, DIM, L, GLOBAL_B = 203, 16, 8, 8


def _setup(overrides=()):
    from recsys_dist.config import JobConfig, load_config  # noqa: F401
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import init_distributed, seed_everything
    from recsys_dist.train.engine import build_engine

    device = torch.device("cpu")
    rank, world = init_distributed(device)
    cfg = JobConfig()
    cfg.model = small_model_config("sasrec", dim=DIM, num_heads=2, num_blocks=1)
    cfg.train.batch_size = GLOBAL_B // world
    for key, value in overrides:
        obj = cfg
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    seed_everything(0)
    model = build_model(cfg.model, L)
    table = ShardedItemTable.create(ROWS, DIM, cfg.sparse, device, cfg.train.batch_size, seed=1)
    engine = build_engine(model, cfg.train, device)
    return cfg, rank, world, table, engine


def _snapshot(table, engine, adam=True):
    """Everything a checkpoint must carry, gathered to full tensors (identical on every rank)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    momentum = table.dmp.fused_optimizer.state_dict()["state"]["embeddings.item.weight"]["item.momentum1"]
    full_m = torch.zeros(ROWS)
    for shard in momentum.local_shards():
        off = shard.metadata.shard_offsets[0]
        full_m[off:off + shard.tensor.shape[0]] = shard.tensor
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(full_m)
    dense = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    adam = {n: (safe_get_full_optimizer_state(p, "exp_avg").clone(), safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
            for n, p in engine.module.named_parameters()} if adam else {}
    return {"table": table.full_table(), "momentum": full_m, "dense": dense, "adam": adam}


def _train(cfg, rank, table, engine, steps=3):
    from recsys_dist.train.step import train_step

    g = torch.Generator().manual_seed(7)
    b = cfg.train.batch_size
    for step in range(steps):
        hist = torch.randint(1, ROWS, (GLOBAL_B, L), generator=g)
        target = torch.randint(1, ROWS, (GLOBAL_B,), generator=g)
        train_step(engine, table, hist[rank * b:(rank + 1) * b], target[rank * b:(rank + 1) * b], step, 0)


def _train_and_save(url):
    from recsys_dist.train.checkpoint import CheckpointManager, TrainState

    cfg, rank, world, table, engine = _setup()
    _train(cfg, rank, table, engine)
    CheckpointManager(url, cfg, ROWS).save(engine, table, TrainState(step=3, epoch=0, batch_in_epoch=3))
    return _snapshot(table, engine)


def _load_and_save(src, dst):
    from recsys_dist.train.checkpoint import CheckpointManager

    cfg, rank, world, table, engine = _setup()
    manager = CheckpointManager(src, cfg, ROWS)
    state = manager.load(manager.latest(), engine, table)
    CheckpointManager(dst, cfg, ROWS).save(engine, table, state)
    return {"state": (state.step, state.epoch, state.batch_in_epoch), **_snapshot(table, engine)}


def _assert_same(a, b):
    """Bitwise equality (the harness hands tensors back as numpy arrays)."""
    eq = np.array_equal
    assert eq(a["table"], b["table"])
    assert eq(a["momentum"], b["momentum"]) and np.abs(a["momentum"]).sum() > 0
    for k in a["dense"]:
        assert eq(a["dense"][k], b["dense"][k]), k
    for k in a["adam"]:
        assert eq(a["adam"][k][0], b["adam"][k][0]) and eq(a["adam"][k][1], b["adam"][k][1]), k
        assert np.abs(a["adam"][k][1]).sum() > 0, k  # the moments were trained, not zeros


@pytest.mark.slow
def test_reshard_two_one_two(tmp_path):
    two = run_distributed(_train_and_save, 2, str(tmp_path / "w2"))
    one = run_distributed(_load_and_save, 1, str(tmp_path / "w2"), str(tmp_path / "w1"))
    back = run_distributed(_load_and_save, 2, str(tmp_path / "w1"), str(tmp_path / "w2b"))
    assert one[0]["state"] == back[0]["state"] == (3, 0, 3)
    _assert_same(two[0], one[0])
    _assert_same(two[0], back[0])
    _assert_same(back[0], back[1])


# ---------------------------------------------------------------- bad checkpoints are refused

def _save_one_rank(url):
    from recsys_dist.train.checkpoint import CheckpointManager, TrainState

    cfg, _, _, table, engine = _setup()
    manager = CheckpointManager(url, cfg, ROWS)
    manager.save(engine, table, TrainState(step=2))
    manager.save(engine, table, TrainState(step=4))
    return True


def _try_load(url, overrides, rows):
    from recsys_dist.train.checkpoint import CheckpointError, CheckpointManager

    cfg, _, _, table, engine = _setup(overrides)
    before = table.full_table().clone()
    manager = CheckpointManager(url, cfg, rows if rows else ROWS)
    latest = manager.latest()
    try:
        manager.load(latest, engine, table)
    except CheckpointError as exc:
        assert torch.equal(table.full_table(), before)  # nothing was overwritten
        return {"latest": latest, "error": str(exc)}
    return {"latest": latest, "error": None}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ckpt") / "c")
    run_distributed(_save_one_rank, 1, url)
    return url


def _copy(saved, tmp_path):
    import shutil
    dst = tmp_path / "c"
    shutil.copytree(saved, dst)
    return dst


def test_good_checkpoint_loads(saved, tmp_path):
    out = run_distributed(_try_load, 1, str(_copy(saved, tmp_path)), [], None)[0]
    assert out["error"] is None and out["latest"].endswith("step-00000004")


def test_missing_file_is_refused(saved, tmp_path):
    root = _copy(saved, tmp_path)
    victim = next((root / "step-00000004" / "table").glob("*.distcp"))
    victim.unlink()
    out = run_distributed(_try_load, 1, str(root), [], None)[0]
    assert "missing" in out["error"] and victim.name in out["error"], out


def test_truncated_file_is_refused(saved, tmp_path):
    root = _copy(saved, tmp_path)
    victim = next((root / "step-00000004" / "dense").rglob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    out = run_distributed(_try_load, 1, str(root), [], None)[0]
    assert "truncated" in out["error"] and victim.name in out["error"], out


def test_corrupt_file_is_refused(saved, tmp_path):
    root = _copy(saved, tmp_path)
    victim = root / "step-00000004" / "rank-00000.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    out = run_distributed(_try_load, 1, str(root), [], None)[0]
    assert "sha256" in out["error"], out


def test_other_job_is_refused(saved, tmp_path):
    root = str(_copy(saved, tmp_path))
    rows = run_distributed(_try_load, 1, root, [], ROWS + 10)[0]
    assert "rows" in rows["error"], rows
    model = run_distributed(_try_load, 1, root, [("model.num_blocks", 2)], None)[0]
    assert "model.num_blocks" in model["error"], model


def test_interrupted_save_is_ignored(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / "step-00000004" / "checkpoint.json").unlink()  # as if killed before the marker
    out = run_distributed(_try_load, 1, str(root), [], None)[0]
    assert out["error"] is None and out["latest"].endswith("step-00000002"), out


# ---------------------------------------------------------------- watchdogs

def _hang(timeout_s):
    import torch.distributed as dist
    from recsys_dist.distributed import init_distributed

    rank, _ = init_distributed(torch.device("cpu"), timeout_s)
    if rank == 1:
        time.sleep(timeout_s * 6)  # a stuck rank: never joins the collective
        return "slept"
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as exc:  # noqa: BLE001 - the timeout is what we test
        return {"waited": time.monotonic() - t0, "error": f"{type(exc).__name__}: {exc}"}
    return {"waited": time.monotonic() - t0, "error": None}


@pytest.mark.slow
def test_hung_rank_is_reported_by_timeout():
    out = run_distributed(_hang, 2, 4.0)
    assert out[0]["error"] is not None and out[0]["waited"] < 20, out[0]


def _nan_after_checkpoint(url):
    from recsys_dist.train.checkpoint import CheckpointManager, TrainState
    from recsys_dist.train.step import NonFiniteLossError, train_step

    cfg, rank, world, table, engine = _setup()
    manager = CheckpointManager(url, cfg, ROWS)
    manager.save(engine, table, TrainState(step=1))
    good = table.full_table().clone()
    with torch.no_grad():
        next(engine.module.parameters()).fill_(float("nan"))
    hist = torch.randint(1, ROWS, (GLOBAL_B, L))
    try:
        train_step(engine, table, hist, torch.randint(1, ROWS, (GLOBAL_B,)), 1, 0)
    except NonFiniteLossError as exc:
        message = str(exc)
    else:
        message = None
    return {"message": message, "table_unchanged": torch.equal(table.full_table(), good),
            "latest": manager.latest()}


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    out = run_distributed(_nan_after_checkpoint, 1, str(tmp_path / "c"))[0]
    assert out["message"] is not None and "step 1" in out["message"], out
    assert out["table_unchanged"]  # raised before backward: no fused update from the bad step
    assert out["latest"].endswith("step-00000001")
    assert (tmp_path / "c" / "step-00000001" / "checkpoint.json").exists()


# ---------------------------------------------------------------- object storage

def _s3_round_trip(url):
    from recsys_dist.train.checkpoint import CheckpointManager, TrainState

    cfg, rank, _, table, engine = _setup()
    _train(cfg, rank, table, engine)
    manager = CheckpointManager(url, cfg, ROWS)
    manager.save(engine, table, TrainState(step=5, epoch=1, batch_in_epoch=2))
    saved = _snapshot(table, engine, adam=False)  # (DeepSpeed maps Adam fragments lazily after a load)
    _, _, _, table2, engine2 = _setup()  # a fresh job: untrained table and no optimizer state
    state = CheckpointManager(url, cfg, ROWS).load(manager.latest(), engine2, table2)
    return {"saved": saved, "loaded": _snapshot(table2, engine2, adam=False), "state": (state.step, state.epoch, state.batch_in_epoch),
            "latest": manager.latest()}


@pytest.mark.slow
def test_checkpoint_on_s3(s3_server):
    url = f"s3://{s3_server.bucket}/ckpt-test/run"
    out = run_distributed(_s3_round_trip, 1, url)[0]
    assert out["latest"] == f"{url}/step-00000005" and out["state"] == (5, 1, 2)
    _assert_same(out["saved"], out["loaded"])
    import fsspec
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{s3_server.bucket}/ckpt-test/run/step-00000005/checkpoint.json")


def test_only_run_length_eval_and_sampling_fields_may_change():
    from recsys_dist.config import load_config
    from recsys_dist.train.checkpoint import config_mismatch

    saved = load_config(None, ["model.name=dreamrec"]).to_dict()
    resample = load_config(None, ["model.name=dreamrec", "model.guidance_w=6", "model.sample_steps=50",
                                  "model.eta=1.0", "train.max_steps=900", "eval.batch_size=64"]).to_dict()
    assert config_mismatch(saved, resample) == []  # re-evaluating with another sampler is allowed
    retrain = load_config(None, ["model.name=dreamrec", "model.guidance_ce_weight=1.0", "sparse.lr=0.1"]).to_dict()
    diffs = config_mismatch(saved, retrain)
    assert len(diffs) == 2 and any("guidance_ce_weight" in d for d in diffs) and any("sparse.lr" in d for d in diffs)


def test_fields_added_since_the_checkpoint_count_as_defaults():
    from recsys_dist.config import load_config
    from recsys_dist.train.checkpoint import config_mismatch

    older = load_config(None, ["model.name=dreamrec"]).to_dict()
    del older["model"]["guidance_ce_weight"], older["model"]["rank_by"]  # written before these existed
    assert config_mismatch(older, load_config(None, ["model.name=dreamrec"]).to_dict()) == []
    diffs = config_mismatch(older, load_config(None, ["model.name=dreamrec", "model.guidance_ce_weight=0.5"]).to_dict())
    assert diffs == ["model.guidance_ce_weight: checkpoint 0.0 != job 0.5"]
    older["model"]["retired_field"] = 3  # a field since removed: reported, with nothing normalised
    diffs = config_mismatch(older, load_config(None, ["model.name=dreamrec"]).to_dict())
    assert any("retired_field" in d for d in diffs) and any("guidance_ce_weight" in d for d in diffs)
