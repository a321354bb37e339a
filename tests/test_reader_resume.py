"""Exact mid-epoch resume of ShardReader (``start_batch``, ``data_position``) on tiny local shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from webdataset import TarWriter

from shards.reader import ShardReader, plan_batches, shard_order, worker_batch_caps, worker_resume
from shards.schema import ShardError, encode_sample, shard_name

B = 5
# unequal shards: with 2 workers, worker 0 gets 37+37+11 = 85 samples (17 batches), worker 1
# 37+23 = 60 (12): the round-robin order changes once worker 1 is exhausted
TRAIN_SIZES = [37, 37, 37, 23, 11]


def write_shards(root, train_sizes, other=(7,), num_items=50, max_len=6, seed=0, compress=False):
    """A tiny ``recsys-dist/seq-v1`` shard set (leave-one-out layout) with train shards of the
    given sizes; sample ``i`` of a split has user ``i`` (unique keys)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, sizes in (("train", train_sizes), ("val", other), ("test", other)):
        shards, user = [], 0
        for idx, n in enumerate(sizes):
            name = shard_name(split, idx, compress)
            buf = io.BytesIO()
            with TarWriter(buf, encoder=False, mtime=0, compress=compress) as tw:
                for _ in range(n):
                    h = rng.integers(1, num_items + 1, size=int(rng.integers(1, max_len + 1)))
                    tw.write(encode_sample(split, user, h.size + 1, h, int(rng.integers(1, num_items + 1))))
                    user += 1
            data = buf.getvalue()
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
            shards.append({"name": name, "num_samples": n, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"num_samples": sum(sizes), "shards": shards}
    m = {"format": "recsys-dist/seq-v1", "num_items": num_items, "max_len": max_len, "protocol": "leave_one_out",
         "min_history_len": 1, "splits": splits}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(m, f)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume") / "tiny")
    return root, write_shards(root, TRAIN_SIZES)


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """Two shards for 2 ranks x 2 workers: the sample-level split."""
    root = str(tmp_path_factory.mktemp("resume") / "few")
    return root, write_shards(root, [29, 18])


def same(a, b):
    """Two lists of batches hold the same tensors in the same order."""
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def loader(rd, nw, persistent=False):
    return DataLoader(rd, batch_size=None, num_workers=nw, persistent_workers=persistent and nw > 0)


# --------------------------------------------------------------------------- the mapping, by brute force


def dataloader_order(per_worker):
    """What DataLoader(batch_size=None, in_order=True) yields from an IterableDataset whose
    worker i yields ``per_worker[i]`` (a list): round-robin from worker 0, skipping exhausted ones."""
    out, its, alive = [], [iter(x) for x in per_worker], [True] * len(per_worker)
    while any(alive):
        for i, it in enumerate(its):
            if alive[i]:
                try:
                    out.append(next(it))
                except StopIteration:
                    alive[i] = False
    return out


def test_worker_resume_matches_round_robin_brute_force():
    rnd = random.Random(0)
    cases = [[3, 3], [3, 2], [2, 3], [0, 4], [5, 0, 2], [1, 4, 4, 2], [17, 12], [4]]
    cases += [[rnd.randint(0, 6) for _ in range(rnd.randint(1, 4))] for _ in range(200)]
    for caps in cases:
        full = dataloader_order([[(w, j) for j in range(c)] for w, c in enumerate(caps)])
        assert len(full) == sum(caps)
        for k in range(sum(caps) + 2):
            skip, shift = worker_resume(caps, k)
            assert skip == [sum(1 for w, _ in full[:k] if w == v) for v in range(len(caps))]
            roles = [(i + shift) % len(caps) for i in range(len(caps))]
            resumed = dataloader_order([[(r, j) for j in range(skip[r], caps[r])] for r in roles])
            assert resumed == full[k:], (caps, k, skip, shift)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_worker_resume_through_a_real_dataloader():
    """The model of the DataLoader above is the real one (3 workers, unequal lengths)."""

    class Roles(torch.utils.data.IterableDataset):
        def __init__(self, caps, k):
            self.caps, self.k = caps, k

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            skip, shift = worker_resume(self.caps, self.k)
            r = (info.id + shift) % info.num_workers
            return iter([(r, j) for j in range(skip[r], self.caps[r])])

    caps = [4, 1, 3]
    full = [tuple(x) for x in DataLoader(Roles(caps, 0), batch_size=None, num_workers=3)]
    assert full == dataloader_order([[(w, j) for j in range(c)] for w, c in enumerate(caps)])
    for k in (1, 2, 4, 5, 7):
        assert [tuple(x) for x in DataLoader(Roles(caps, k), batch_size=None, num_workers=3)] == full[k:]


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("nw", [0, 1, 2])
@pytest.mark.parametrize("capped", [False, True])
def test_resume_is_the_exact_suffix(tiny, nw, capped):
    root, m = tiny
    kw = dict(shuffle=True, seed=7, shuffle_buffer=8, drop_last=False)
    if capped:
        kw["max_batches"] = 20  # worker caps [10, 10] of [17, 12] for 2 workers
    rd = ShardReader(root, "train", B, **kw)
    dl = loader(rd, nw, persistent=True)
    full = list(dl)
    assert len(full) == (20 if capped else plan_batches(m, "train", B, 1, max(nw, 1), False)[0])
    assert same(list(dl), full)
    ks = sorted({1, 2, 3, 11, 12, 13, len(full) - 1, len(full), len(full) + 3} | set(range(20, 27)))
    for k in ks:
        rd.set_position(0, k)  # persistent workers see it through shared memory
        assert same(list(dl), full[k:]), k
    # a fresh reader constructed with start_batch (non-persistent workers)
    for k in (5, 24 if not capped else 15):
        assert same(list(loader(ShardReader(root, "train", B, start_batch=k, **kw), nw)), full[k:]), k


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_two_ranks_few_shards_and_drop_last(few, nw):
    root, m = few  # 2 shards < 4 readers: every reader keeps every 4th sample
    for rank in (0, 1):
        kw = dict(rank=rank, world_size=2, shuffle=True, seed=1, shuffle_buffer=4, drop_last=True)
        rd = ShardReader(root, "train", 3, **kw)
        dl = loader(rd, nw, persistent=True)
        full = list(dl)
        assert len(full) == plan_batches(m, "train", 3, 2, max(nw, 1), True)[rank]
        for k in range(len(full) + 1):
            rd.set_position(0, k)
            assert same(list(dl), full[k:]), (rank, k)


def test_resume_applies_to_its_epoch_only(tiny):
    root, _ = tiny
    kw = dict(shuffle=True, seed=3, shuffle_buffer=10)
    e3 = list(loader(ShardReader(root, "train", B, epoch=3, **kw), 2))
    e4 = list(loader(ShardReader(root, "train", B, epoch=4, **kw), 2))
    assert not same(e3, e4)
    rd = ShardReader(root, "train", B, epoch=3, start_batch=9, **kw)
    dl = loader(rd, 2, persistent=True)
    rd.set_epoch(3)  # a trainer's usual set_epoch at the top of the loop keeps the resume point
    assert same(list(dl), e3[9:])
    rd.set_epoch(4)
    assert same(list(dl), e4)
    rd.set_epoch(3)  # only the resumed epoch (3) starts late
    assert same(list(dl), e3[9:])


def test_resume_does_not_reread_consumed_shards(tiny, tmp_path):
    """A resumed reader opens only the shards it still needs: without a shuffle buffer those
    after the resume point; with one, also those whose samples are still buffered."""
    root, m = tiny
    names = [sh["name"] for sh in m["splits"]["train"]["shards"]]
    full = list(ShardReader(root, "train", B))  # one reader: shards in order 0..4
    k = (37 + 37) // B + 1  # the first batch that lies entirely in shard 2
    copy = str(tmp_path / "copy")
    write_shards(copy, TRAIN_SIZES)
    for name in names[:2]:
        os.remove(os.path.join(copy, name))
    assert same(list(ShardReader(copy, "train", B, start_batch=k)), full[k:])
    with pytest.raises(ShardError, match=names[0]):
        list(ShardReader(copy, "train", B, start_batch=1))
    # shuffled with a buffer of 4: at batch 20 (sample 100) the buffer holds no sample of the
    # shards at epoch positions 0 and 1 (a permutation of the three 37-sample shards)
    kw = dict(shuffle=True, seed=0, shuffle_buffer=4)
    full = list(ShardReader(root, "train", B, **kw))
    perm = shard_order(TRAIN_SIZES, True, 0, 0)
    copy2 = str(tmp_path / "copy2")
    write_shards(copy2, TRAIN_SIZES)
    for p in perm[:2]:
        os.remove(os.path.join(copy2, names[p]))
    assert same(list(ShardReader(copy2, "train", B, start_batch=20, **kw)), full[20:])
    with pytest.raises(ShardError):
        list(ShardReader(copy2, "train", B, start_batch=5, **kw))


def test_resume_with_on_error_skip_replays(tiny):
    root, _ = tiny
    kw = dict(shuffle=True, seed=5, shuffle_buffer=6, on_error="skip")
    full = list(loader(ShardReader(root, "train", B, **kw), 2))
    for k in (3, 24):
        assert same(list(loader(ShardReader(root, "train", B, start_batch=k, **kw), 2)), full[k:])


def test_data_position_round_trip(tiny):
    root, m = tiny
    kw = dict(shuffle=True, seed=11, shuffle_buffer=10, max_batches=25)
    rd = ShardReader(root, "train", B, epoch=2, **kw)
    full = list(loader(rd, 2))
    pos = rd.data_position(13, num_workers=2)
    pos = json.loads(json.dumps(pos))  # what a checkpoint stores
    assert pos["epoch"] == 2 and pos["start_batch"] == 13 and pos["epoch_batches"] == 25
    assert not pos["epoch_done"]
    assert [w["batches"] for w in pos["workers"]] == worker_batch_caps([13, 12], 13) == [7, 6]
    assert [w["samples"] for w in pos["workers"]] == [35, 30]
    fresh = ShardReader(root, "train", B, **kw)
    fresh.restore_position(pos, num_workers=2)
    assert fresh.epoch == 2 and fresh.start_batch == 13
    assert same(list(loader(fresh, 2)), full[13:])
    # a position is only valid for the same layout
    with pytest.raises(ValueError, match="readers_per_rank"):
        fresh.check_position(pos, num_workers=3)
    with pytest.raises(ValueError, match="batch_size"):
        ShardReader(root, "train", B + 1, **kw).check_position(pos, num_workers=2)
    with pytest.raises(ValueError, match="seed"):
        ShardReader(root, "train", B, **dict(kw, seed=12)).check_position(pos, num_workers=2)
    ShardReader(root, "train", B, **kw).check_position(pos, num_workers=2)  # ok
    # 0 and 1 workers are the same layout
    assert rd.data_position(4, 0)["workers"] == rd.data_position(4, 1)["workers"]
    # a finished epoch resumes at the start of the next one
    done = rd.data_position(25, num_workers=2)
    assert done["epoch_done"]
    fresh.restore_position(done, num_workers=2)
    assert (fresh.epoch, fresh.start_batch) == (3, 0)
    assert same(list(loader(fresh, 2)), list(loader(ShardReader(root, "train", B, epoch=3, **kw), 2)))


def test_start_batch_validation(tiny):
    root, _ = tiny
    with pytest.raises(ValueError, match="start_batch"):
        ShardReader(root, "train", B, start_batch=-1)
    with pytest.raises(ValueError, match="io_attempts"):
        ShardReader(root, "train", B, io_attempts=0)
    assert list(ShardReader(root, "train", B, start_batch=10**6)) == []
