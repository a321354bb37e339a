"""Exact mid-epoch resume of ``SequenceDataset`` (``start_batch``, ``set_position``,
``data_position`` / ``restore_position`` / ``check_position``) on tiny hand-made shards.

The reference is always the uninterrupted epoch read in-process; a resumed reader must yield
exactly its batches ``k, k + 1, ...`` (every tensor equal), whatever the number of DataLoader
workers, with ``max_batches`` caps and ``drop_last``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import shards.dataset as dataset_mod
from shards.build import write_shards
from shards.dataset import SequenceDataset
from shards.format import ShardError
from shards.plan import epoch_windows, plan_batches, rank_plan, split_sizes, steps_per_epoch
from shards.records import Records

B = 5
NUM_ITEMS = 40
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def make_records(seed=0, n=30):
    """``n`` leave-one-out records of lengths 3..22: blocks of 4 records hold 4..76 train samples."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 23, size=n)
    off = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    items = rng.integers(1, NUM_ITEMS + 1, size=int(off[-1])).astype(np.int32)
    return Records(off, items, np.stack([lens - 2, lens - 1], 1), NUM_ITEMS, "leave_one_out")


def build(out, seed=0):
    return write_shards([make_records(seed)], out, dataset="resume", protocol="leave_one_out", num_items=NUM_ITEMS,
                        build={"seed": seed}, records_per_block=4, blocks_per_shard=2, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "tiny")
    return out, build(out)


def same(a, b):
    """Two lists of batches hold the same tensors in the same order."""
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def run(ds, nw):
    return list(ds) if nw == 0 else list(DataLoader(ds, batch_size=None, num_workers=nw))


# (split, reader kwargs): shuffled training (one rank; two ranks with the trainer's drop_last
# and max_batches cap), evaluation of one rank of three (plan order, seen sets)
CONFIGS = {
    "train": ("train", dict(shuffle=True, seed=7, epoch=1, window_blocks=2)),
    "train-capped": ("train", dict(rank=1, world_size=2, shuffle=True, seed=3, window_blocks=3, drop_last=True,
                                   max_batches="steps-2")),
    "valid": ("valid", dict(rank=2, world_size=3)),
}
BATCH = {"train": B, "train-capped": B, "valid": 3}  # valid: 10 samples of rank 2 -> batches 3, 3, 3, 1


def config(tiny, name):
    out, m = tiny
    split, kw = CONFIGS[name]
    kw = dict(kw)
    if kw.get("max_batches") == "steps-2":
        kw["max_batches"] = steps_per_epoch(m, B, 2) - 2
    return out, split, kw, BATCH[name]


def ks_of(n):
    return sorted({0, 1, n // 2, n - 1, n, n + 3})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_in_process_all_ways(tiny, name):
    out, split, kw, B = config(tiny, name)
    m = tiny[1]
    ds = SequenceDataset(out, split, B, **kw)
    full = list(ds)
    planned = plan_batches(m, split, B, kw.get("world_size", 1), kw.get("drop_last", False))[kw.get("rank", 0)]
    assert len(full) == len(ds) == min(planned, kw.get("max_batches") or planned) >= 4
    if "max_batches" in kw:
        assert len(full) < planned  # the cap bites
    if kw.get("drop_last"):
        assert all(b["target"].shape[0] == B for b in full)
    elif name == "valid":
        assert full[-1]["target"].shape[0] < B  # a partial last batch is part of the stream
    assert same(list(ds), full)  # a second pass over the same reader
    epoch = kw.get("epoch", 0)
    for k in ks_of(len(full)):
        assert same(list(SequenceDataset(out, split, B, **dict(kw, start_batch=k))), full[k:]), ("start_batch", k)
        ds.set_position(epoch, k)
        assert same(list(ds), full[k:]), ("set_position", k)
        pos = json.loads(json.dumps(ds.data_position(k)))  # what a checkpoint stores
        fresh = SequenceDataset(out, split, B, **dict(kw, epoch=0))
        fresh.restore_position(pos)
        if k < len(full):
            assert (fresh.epoch, fresh.start_batch, pos["epoch_done"]) == (epoch, k, False)
            assert same(list(fresh), full[k:]), ("restore_position", k)
        else:  # a finished epoch resumes at the start of the next one
            assert pos["epoch_done"] and pos["start_batch"] == len(full) and (fresh.epoch, fresh.start_batch) == (
                epoch + 1, 0)
            assert same(list(fresh), list(SequenceDataset(out, split, B, **dict(kw, epoch=epoch + 1))))


@pytest.mark.parametrize("nw", [1, 2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_with_workers(tiny, name, nw):
    out, split, kw, B = config(tiny, name)
    ref = list(SequenceDataset(out, split, B, **kw))
    ds = SequenceDataset(out, split, B, **kw)
    assert same(run(ds, nw), ref)  # the workers' stream is the in-process one
    epoch = kw.get("epoch", 0)
    for i, k in enumerate(ks_of(len(ref))):  # the three ways in turn (each costs a DataLoader start)
        way = (i + nw) % 3
        if way == 0:
            r = SequenceDataset(out, split, B, **dict(kw, start_batch=k))
        elif way == 1:
            r = ds
            r.set_position(epoch, k)
        else:
            r = SequenceDataset(out, split, B, **dict(kw, epoch=0))
            r.restore_position(json.loads(json.dumps(ds.data_position(k, num_workers=nw))), num_workers=nw)
            if k >= len(ref):
                assert (r.epoch, r.start_batch) == (epoch + 1, 0)
                continue
        assert same(run(r, nw), ref[k:]), (nw, k, way)


def test_resume_applies_to_its_epoch_only(tiny):
    out, _ = tiny
    kw = dict(shuffle=True, seed=3, window_blocks=2)
    e3 = list(SequenceDataset(out, "train", B, epoch=3, **kw))
    e4 = list(SequenceDataset(out, "train", B, epoch=4, **kw))
    assert len(e3) == len(e4) and not same(e3, e4)
    ds = SequenceDataset(out, "train", B, epoch=3, start_batch=9, **kw)
    assert same(list(ds), e3[9:])
    ds.set_epoch(4)  # a new epoch starts at its beginning
    assert same(list(ds), e4)
    ds.set_position(3, 20)
    assert same(list(DataLoader(ds, batch_size=None, num_workers=2)), e3[20:])


def test_data_position_contents(tiny):
    out, m = tiny
    ds = SequenceDataset(out, "train", B, shuffle=True, seed=11, epoch=2, max_batches=25)
    pos = ds.data_position(13, num_workers=2)
    assert json.loads(json.dumps(pos)) == pos
    assert (pos["epoch"], pos["start_batch"], pos["epoch_batches"], pos["epoch_done"]) == (2, 13, 25, False)
    assert ds.data_position(13, num_workers=0) == ds.data_position(13, num_workers=3) == pos  # workers don't matter
    assert ds.data_position(10**6)["start_batch"] == 25 and ds.data_position(10**6)["epoch_done"]
    assert ds.data_position(4, epoch=5)["epoch"] == 5


@pytest.mark.parametrize("change,field", [
    (dict(batch_size=B + 1), "batch_size"),
    (dict(world_size=2), "world_size"),
    (dict(rank=1, world_size=2), "rank"),
    (dict(seed=12), "seed"),
    (dict(window_blocks=3), "window_blocks"),
    (dict(drop_last=False), "drop_last"),
    (dict(max_batches=24), "max_batches"),
    (dict(split="valid", shuffle=False), "split"),
])
def test_check_position_refuses_another_layout(tiny, change, field):
    out, _ = tiny
    kw = dict(split="train", batch_size=B, rank=0, world_size=1, shuffle=True, seed=11, window_blocks=2,
              drop_last=True, max_batches=25)
    pos = json.loads(json.dumps(SequenceDataset(out, **kw).data_position(13)))
    SequenceDataset(out, **kw).check_position(pos, num_workers=3)  # same layout: fine, any workers
    other = SequenceDataset(out, **{**kw, **change})
    with pytest.raises(ValueError, match=field + ": saved") as ei:
        other.check_position(pos)
    with pytest.raises(ValueError, match=field):
        other.restore_position(pos)
    assert "exact resume impossible" in str(ei.value)


def test_check_position_refuses_another_manifest(tiny, tmp_path):
    out, m = tiny
    pos = SequenceDataset(out, "train", B, shuffle=True, seed=1).data_position(3)
    other = str(tmp_path / "other")
    m2 = build(other, seed=1)  # other records, same shapes of everything else
    assert m2["num_records"] == m["num_records"]
    with pytest.raises(ValueError, match="blocks_digest: saved"):
        SequenceDataset(other, "train", B, shuffle=True, seed=1).check_position(pos)
    # a rebuild of the same records is the same data: the position stays valid
    same_again = str(tmp_path / "again")
    build(same_again, seed=0)
    SequenceDataset(same_again, "train", B, shuffle=True, seed=1).check_position(pos)


def test_resume_skips_consumed_blocks_unread(tiny, tmp_path):
    """In plan order a resumed reader never opens the shards wholly before its position."""
    out, m = tiny
    full = list(SequenceDataset(out, "train", B))
    sizes = split_sizes(m, "train")
    first_shard = sum(sizes[:2])  # train samples of shard 0 (blocks 0, 1)
    k = -(-first_shard // B)  # the first batch with no sample of shard 0
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    os.remove(os.path.join(copy, "seq-00000.tar"))
    assert same(list(SequenceDataset(copy, "train", B, start_batch=k)), full[k:])
    with pytest.raises(ShardError, match="seq-00000.tar"):
        list(SequenceDataset(copy, "train", B, start_batch=k - 1))


def test_resume_skips_consumed_windows_unread(tiny, monkeypatch):
    """Shuffled: exactly the blocks of the windows not wholly consumed are read, each once."""
    out, m = tiny
    kw = dict(shuffle=True, seed=5, epoch=2, window_blocks=2)
    full = list(SequenceDataset(out, "train", B, **kw))
    windows = epoch_windows(rank_plan(split_sizes(m, "train"), 0, 1),
                            [s for s, sh in enumerate(m["shards"]) for _ in sh["blocks"]], True, 5, 2, 0, 2)
    entries = [(s, p) for s, sh in enumerate(m["shards"]) for p in range(len(sh["blocks"]))]
    read_blocks = []
    real = dataset_mod.read_shard

    def spy(manifest, base_url, s, wanted, *a):
        read_blocks.extend(entries.index((s, p)) for p in wanted)
        return real(manifest, base_url, s, wanted, *a)

    monkeypatch.setattr(dataset_mod, "read_shard", spy)
    ends = np.cumsum([w.samples for w in windows])
    for k in (0, 7, len(full) // 2, len(full) - 1):
        read_blocks.clear()
        assert same(list(SequenceDataset(out, "train", B, start_batch=k, **kw)), full[k:])
        need = [b for w, e in zip(windows, ends) if e > k * B for b, _, _ in w.entries]
        assert sorted(read_blocks) == sorted(need), k
        if k == len(full) - 1:
            assert len(need) < len(entries)  # the last batch needs only the last window


def test_start_batch_past_the_end_and_validation(tiny):
    out, _ = tiny
    assert list(SequenceDataset(out, "train", B, start_batch=10**6)) == []
    # a negative position is an error (at construction or on iteration), never extra batches beyond len()
    capped = SequenceDataset(out, "train", B, max_batches=5)
    for make in (lambda: SequenceDataset(out, "train", B, max_batches=5, start_batch=-1),
                 lambda: (capped.set_position(0, -1), capped)[1]):
        try:
            ds = make()
            n = sum(1 for _ in ds)
        except ValueError as e:
            assert "start_batch" in str(e)
            continue
        assert n <= len(ds) == 5, n
