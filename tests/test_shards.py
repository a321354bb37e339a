"""Tests of the shard builder and reader on small slices of the real ML-1M data."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from webdataset import TarWriter

from shards import (
    ShardError,
    ShardReader,
    build_shards,
    load_manifest,
    plan_batches,
    split_samples,
    steps_per_epoch,
    verify_shards,
)
from shards.sources import dataset_path

MAX_USERS = 200
K = 10  # train prefixes per user in the main fixture
MAX_LEN = 50
PER_SHARD = 300

DATA = dataset_path("ml-1m")
pytestmark = pytest.mark.skipif(not os.path.exists(DATA), reason=f"dataset not found: {DATA}")


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "ml-1m")
    m = build_shards("ml-1m", out, max_len=MAX_LEN, train_prefixes_per_user=K,
                     samples_per_shard=PER_SHARD, max_users=MAX_USERS, seed=0, progress=False)
    return out, m


@pytest.fixture
def copy_of(built, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(built[0], dst)
    return dst


@pytest.fixture(scope="module")
def raw_sequences():
    """Independent re-implementation: raw-id sequences of the first MAX_USERS users after the
    iterated 5-core filter (filter over the whole dataset)."""
    with gzip.open(DATA, "rt") as f:
        header = f.readline().rstrip("\n").split("\t")
        cols = [header.index(c) for c in ("pos", "raw_user_id", "raw_item_id")]
        pos, user, item = np.loadtxt(f, delimiter="\t", usecols=cols, dtype=np.int64, unpack=True)
    keep = np.ones(pos.size, dtype=bool)
    while True:
        n = keep.sum()
        items, cnt = np.unique(item[keep], return_counts=True)
        keep &= np.isin(item, items[cnt >= 5])
        users, cnt = np.unique(user[keep], return_counts=True)
        keep &= np.isin(user, users[cnt >= 5])
        if keep.sum() == n:
            break
    first = set(np.unique(user[keep])[:MAX_USERS].tolist())
    seqs = defaultdict(list)
    for p, u, i in zip(pos[keep].tolist(), user[keep].tolist(), item[keep].tolist()):
        if u in first:
            seqs[u].append((p, i))
    return {u: [i for _, i in sorted(v)] for u, v in seqs.items()}


def index_of(raw_items):
    return {r: i for i, r in enumerate(raw_items) if r is not None}


def read_all(url, split, batch_size=64, **kw):
    """All samples of a split as a list of (user, target, history tuple), in reader order."""
    out = []
    for b in ShardReader(url, split, batch_size, **kw):
        for h, t, u in zip(b["history"].tolist(), b["target"].tolist(), b["user"].tolist()):
            out.append((u, t, tuple(x for x in h if x != 0)))
    return out


def read_ranks(url, split, batch_size, world_size, num_workers, **kw):
    """Per rank: (number of batches, samples) using a DataLoader with worker processes."""
    res = []
    for rank in range(world_size):
        rd = ShardReader(url, split, batch_size, rank=rank, world_size=world_size, **kw)
        dl = DataLoader(rd, batch_size=None, num_workers=num_workers)
        nb, samples = 0, []
        for b in dl:
            nb += 1
            assert b["history"].shape[0] == b["target"].shape[0] == b["user"].shape[0] <= batch_size
            for h, t, u in zip(b["history"].tolist(), b["target"].tolist(), b["user"].tolist()):
                samples.append((u, t, tuple(x for x in h if x != 0)))
        res.append((nb, samples))
    return res


def tar_members(path):
    with tarfile.open(path, "r") as tf:
        return [(ti.name, tf.extractfile(ti).read()) for ti in tf]


def write_tar(path, members):
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as tf:
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


# --------------------------------------------------------------------------- build / manifest


def test_manifest_counts_match_samples_read(built):
    out, m = built
    assert m["format"] == "recsys-dist/seq-v1" and m["num_users"] == MAX_USERS
    assert m["filter"]["filtered_items"] == 3416  # DiffuRec paper's ML-1M item count
    assert m["filter"]["filtered_users"] == 6040
    for split in ("train", "val", "test"):
        s = m["splits"][split]
        assert s["num_samples"] == sum(sh["num_samples"] for sh in s["shards"])
        assert all(0 < sh["num_samples"] <= PER_SHARD for sh in s["shards"])
        got = read_all(out, split)
        assert len(got) == s["num_samples"]
        assert len(set(got)) == len(got)
    assert m["splits"]["val"]["num_samples"] == m["splits"]["test"]["num_samples"] == MAX_USERS
    assert m["splits"]["train"]["num_samples"] == MAX_USERS * K  # every ML-1M user has >= 18 items
    assert len(m["splits"]["train"]["shards"]) == 7 and len(m["splits"]["val"]["shards"]) == 1
    # keys and member layout
    names = [n for n, _ in tar_members(os.path.join(out, "val-00000.tar"))]
    cut = sum(1 for n in names if n.endswith(".seen.i32"))  # users whose history was cut to max_len
    assert 0 < cut < MAX_USERS and len(names) == 3 * MAX_USERS + cut
    assert all(re.fullmatch(r"val-\d{8}-\d{5}\.(history|seen|target|user)\.i32", n) for n in names)
    key = names[0].split(".")[0]
    assert [n for n in names if n.startswith(key + ".")] in (
        [key + ".history.i32", key + ".target.i32", key + ".user.i32"],
        [key + ".history.i32", key + ".seen.i32", key + ".target.i32", key + ".user.i32"])
    assert verify_shards(out)["checked"] == 9


def test_leave_one_out_matches_raw_tsv(built, raw_sequences):
    out, m = built
    with open(os.path.join(out, m["id_map_file"])) as f:
        id_map = json.load(f)
    raw_users, raw_items = id_map["users"], id_map["items"]
    assert raw_users == sorted(raw_sequences)
    assert raw_items[0] is None and len(raw_items) == m["num_items"] + 1
    assert raw_items[1:] == sorted(raw_items[1:])  # items indexed by ascending raw id
    by_split = {s: read_all(out, s) for s in ("train", "val", "test")}
    val = {u: (t, h) for u, t, h in by_split["val"]}
    test = {u: (t, h) for u, t, h in by_split["test"]}
    train = defaultdict(set)
    for u, t, h in by_split["train"]:
        train[u].add((t, h))
    to_raw = lambda h: [raw_items[i] for i in h]  # noqa: E731
    for u in (0, 1, 57, MAX_USERS - 1):
        s = raw_sequences[raw_users[u]]
        n = len(s)
        t, h = test[u]
        assert raw_items[t] == s[-1] and to_raw(h) == s[:-1][-MAX_LEN:]
        t, h = val[u]
        assert raw_items[t] == s[-2] and to_raw(h) == s[:-2][-MAX_LEN:]
        assert len(train[u]) == K
        expected = {(s[j - 1], tuple(s[: j - 1][-MAX_LEN:])) for j in range(n - 1 - K, n - 1)}
        assert {(raw_items[t], tuple(to_raw(h))) for t, h in train[u]} == expected
    # eval seen sets: every item before the target, however long the history (masking uses it)
    for split, cut in (("val", 2), ("test", 1)):
        for b in ShardReader(out, split, 64):
            for u, seen in zip(b["user"].tolist(), b["seen"].tolist()):
                s = raw_sequences[raw_users[u]]
                assert sorted(raw_items[i] for i in seen if i) == sorted(set(s[:-cut])), (split, u)
    # target counts: how often each item is a train target (the last K prefixes' targets)
    tcounts = np.load(os.path.join(out, m["train_target_counts_file"]), allow_pickle=False)
    texp = np.zeros_like(tcounts)
    for r in raw_users:
        for it in raw_sequences[r][-2 - K:-2]:
            texp[index_of(raw_items)[it]] += 1
    np.testing.assert_array_equal(tcounts, texp)
    # item counts: occurrences in s_1..s_{n-2} of every user
    counts = np.load(os.path.join(out, m["train_item_counts_file"]), allow_pickle=False)
    assert counts.dtype == np.int64 and counts.shape == (m["num_items"] + 1,) and counts[0] == 0
    index = {r: i for i, r in enumerate(raw_items) if r is not None}
    exp = np.zeros_like(counts)
    for r in raw_users:
        for it in raw_sequences[r][:-2]:
            exp[index[it]] += 1
    np.testing.assert_array_equal(counts, exp)


def test_split_samples_all_prefixes():
    res = split_samples(np.array([5, 3, 7, 2]))
    assert list(zip(*res["test"])) == [(0, 5), (1, 3), (2, 7), (3, 2)]
    assert list(zip(*res["val"])) == [(0, 4), (1, 2), (2, 6)]
    assert list(zip(*res["train"])) == [(0, 2), (0, 3), (2, 2), (2, 3), (2, 4), (2, 5)]
    res = split_samples(np.array([5, 7]), train_prefixes_per_user=2)
    assert list(zip(*res["train"])) == [(0, 2), (0, 3), (1, 4), (1, 5)]


def test_build_is_idempotent_and_rebuilds_on_change(tmp_path):
    out = str(tmp_path / "b")
    kw = dict(max_users=20, train_prefixes_per_user=3, samples_per_shard=25, progress=False)
    m1 = build_shards("ml-1m", out, **kw)
    mpath = os.path.join(out, "manifest.json")
    before = os.stat(mpath).st_mtime_ns
    assert build_shards("ml-1m", out, **kw) == m1
    assert os.stat(mpath).st_mtime_ns == before
    m2 = build_shards("ml-1m", "file://" + out, **dict(kw, samples_per_shard=10))
    assert m2["build"]["samples_per_shard"] == 10 and len(m2["splits"]["train"]["shards"]) == 6
    left = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert left == sorted(sh["name"] for s in m2["splits"].values() for sh in s["shards"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert len(read_all("file://" + out, "train")) == 60


def test_load_manifest_rejects_bad_format(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(ShardError, match="format"):
        load_manifest(str(tmp_path))
    with pytest.raises(ShardError, match="not found"):
        load_manifest(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- sharding across readers


@pytest.mark.parametrize("split", ["train", "val"])  # 7 shards >= 4 readers ; 1 shard < 4 readers
def test_every_sample_exactly_once_across_ranks_and_workers(built, split):
    out, m = built
    everything = read_all(out, split)
    for shuffle in (False, True):
        ranks = read_ranks(out, split, 32, world_size=2, num_workers=2, shuffle=shuffle, seed=3)
        got = [s for _, samples in ranks for s in samples]
        assert len(got) == len(everything) and sorted(got) == sorted(everything)
        assert [nb for nb, _ in ranks] == plan_batches(m, split, 32, 2, 2, drop_last=False)


def test_balanced_assignment_exactly_once(built):
    out, m = built  # 7 train shards over 4 readers: 4 whole shards + 3 split sample-wise
    everything = read_all(out, "train")
    ranks = read_ranks(out, "train", 32, world_size=2, num_workers=2, shuffle=True, assignment="balanced")
    got = [s for _, samples in ranks for s in samples]
    assert sorted(got) == sorted(everything)
    assert [nb for nb, _ in ranks] == plan_batches(m, "train", 32, 2, 2, False, assignment="balanced")
    per = [len(samples) for _, samples in ranks]
    assert max(per) - min(per) <= 2 * (PER_SHARD - 200) + 2  # vs a whole shard for round-robin


@pytest.mark.parametrize("split", ["train", "val"])
def test_plan_batches_drop_last_and_max_batches(built, split):
    out, m = built
    plan = plan_batches(m, split, 16, 2, 2, drop_last=True)
    ranks = read_ranks(out, split, 16, world_size=2, num_workers=2, drop_last=True, shuffle=True)
    assert [nb for nb, _ in ranks] == plan
    assert all(len(s) == 16 * nb for nb, s in ranks)  # only full batches
    steps = steps_per_epoch(m, split, 16, 2, 2)
    assert steps == min(plan)
    ranks = read_ranks(out, split, 16, world_size=2, num_workers=2, drop_last=True, shuffle=True, max_batches=steps)
    assert [nb for nb, _ in ranks] == [steps, steps]
    got = [s for _, samples in ranks for s in samples]
    assert len(set(got)) == len(got)
    rd = ShardReader(out, split, 16, rank=0, world_size=2, drop_last=True, max_batches=steps)
    p = rd.epoch_plan(num_workers=2)
    assert p["leftover_batches"] == plan[0] - steps == rd.leftover_batches(2)
    assert p["leftover_samples"] == p["samples"] - 16 * steps
    # single process (num_workers=0) plan matches too
    assert [sum(1 for _ in ShardReader(out, split, 16, rank=r, world_size=2)) for r in range(2)] == \
        plan_batches(m, split, 16, 2, 1, drop_last=False)


def test_shuffle_is_deterministic_per_epoch(built):
    out, _ = built
    a0 = read_all(out, "train", shuffle=True, seed=1, epoch=0)
    b0 = read_all(out, "train", shuffle=True, seed=1, epoch=0)
    a1 = read_all(out, "train", shuffle=True, seed=1, epoch=1)
    plain = read_all(out, "train")
    assert a0 == b0
    assert a0 != a1 and a0 != plain
    assert sorted(a0) == sorted(a1) == sorted(plain)
    rd = ShardReader(out, "train", 64, shuffle=True, seed=1)
    rd.set_epoch(1)
    assert [(u, t) for b in rd for u, t in zip(b["user"].tolist(), b["target"].tolist())] == [(u, t) for u, t, _ in a1]


def test_batches_are_left_padded(built):
    out, m = built
    full = {}
    for b in ShardReader(out, "train", 50):
        h = b["history"]
        assert h.dtype == torch.int64 and h.shape == (b["target"].shape[0], MAX_LEN)
        assert b["target"].dtype == torch.int64 and b["user"].dtype == torch.int64
        nz = h != 0
        n = nz.sum(1)
        assert (n >= 1).all()
        # non-pad items are one contiguous block ending in the last column
        cols = torch.arange(MAX_LEN).expand_as(h)
        assert torch.equal(nz, cols >= (MAX_LEN - n).unsqueeze(1))
        assert ((h >= 0) & (h <= m["num_items"])).all() and (b["target"] >= 1).all()
        for row, t, u in zip(h.tolist(), b["target"].tolist(), b["user"].tolist()):
            full[(u, t, tuple(row))] = row
    # a narrower reader keeps the most recent items
    short = ShardReader(out, "train", 50, max_len=8)
    b = next(iter(short))
    assert b["history"].shape[1] == 8
    first = next(iter(ShardReader(out, "train", 50)))
    assert torch.equal(b["history"], first["history"][:, -8:])


# --------------------------------------------------------------------------- validation errors


def test_truncated_shard_raises_naming_file(copy_of):
    path = os.path.join(copy_of, "train-00001.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(ShardError, match="train-00001.tar"):
        read_all(copy_of, "train")
    open(path, "wb").write(data[: 512 * 6 * 10])  # cut on a member boundary: count check
    with pytest.raises(ShardError, match=r"train-00001\.tar.*manifest says 300"):
        read_all(copy_of, "train")
    with pytest.raises(ShardError, match="train-00001.tar"):
        verify_shards(copy_of)


def test_out_of_range_item_raises_naming_member(copy_of, built):
    m = built[1]
    path = os.path.join(copy_of, "val-00000.tar")
    members = tar_members(path)
    hi = [i for i, (n, _) in enumerate(members) if n.endswith(".history.i32")][1]  # second sample's
    bad_name = members[hi][0]
    orig = members[hi][1]
    h = np.frombuffer(orig, dtype="<i4").copy()
    h[0] = m["num_items"] + 1
    members[hi] = (bad_name, h.tobytes())
    write_tar(path, members)
    with pytest.raises(ShardError, match=re.escape(bad_name)) as ei:
        read_all(copy_of, "val")
    assert "val-00000.tar" in str(ei.value) and "outside" in str(ei.value)
    # skip mode counts the bad sample and yields the rest
    rd = ShardReader(copy_of, "val", 64, on_error="skip")
    n = sum(b["target"].shape[0] for b in rd)
    assert n == MAX_USERS - 1 and rd.bad_samples == 1 and rd.bad_shards == 0
    # a target out of range
    good = list(members)
    good[hi] = (bad_name, orig)
    ti = [i for i, (n, _) in enumerate(members) if n.endswith(".target.i32")][14]  # 15th sample's
    target_name = members[ti][0]
    good[ti] = members[ti] = (target_name, np.array([0], dtype="<i4").tobytes())
    write_tar(path, good)
    with pytest.raises(ShardError, match=re.escape(target_name) + ".* 0 outside"):
        read_all(copy_of, "val")
    # both bad samples, skipped inside DataLoader workers: the counters are shared
    write_tar(path, members)
    rd = ShardReader(copy_of, "val", 64, on_error="skip")
    assert sum(b["target"].shape[0] for b in DataLoader(rd, batch_size=None, num_workers=2)) == MAX_USERS - 2
    assert rd.bad_samples == 2


def test_missing_member_and_bad_length(copy_of):
    path = os.path.join(copy_of, "test-00000.tar")
    members = tar_members(path)
    ti = next(i for i, (n, _) in enumerate(members) if n.endswith(".target.i32"))
    ui = next(i for i, (n, _) in enumerate(members) if n.endswith(".user.i32"))
    gone = members[ti][0]
    write_tar(path, members[:ti] + members[ti + 1:])
    with pytest.raises(ShardError, match=re.escape(gone)):
        read_all(copy_of, "test")
    members[ui] = (members[ui][0], b"\x01\x00\x00")  # user.i32 with 3 bytes
    write_tar(path, members)
    with pytest.raises(ShardError, match=re.escape(members[ui][0]) + ".*3 bytes"):
        read_all(copy_of, "test")


def test_missing_shard_raises_naming_url(copy_of):
    os.remove(os.path.join(copy_of, "train-00003.tar"))
    url = "file://" + copy_of
    with pytest.raises(ShardError, match=re.escape(url + "/train-00003.tar")):
        read_all(url, "train")
    rd = ShardReader(copy_of, "train", 100, on_error="skip")
    n = sum(b["target"].shape[0] for b in rd)
    assert n == MAX_USERS * K - PER_SHARD and rd.bad_shards == 1


def test_manifest_records_leave_one_out_protocol(built, copy_of):
    _, m = built
    assert m["protocol"] == "leave_one_out" and m["min_history_len"] == 1
    # manifests written before the keys existed still load, as leave-one-out
    mp = os.path.join(copy_of, "manifest.json")
    with open(mp) as f:
        old = json.load(f)
    del old["protocol"], old["min_history_len"]
    with open(mp, "w") as f:
        json.dump(old, f)
    lm = load_manifest(copy_of)
    assert lm["protocol"] == "leave_one_out" and lm["min_history_len"] == 1
    assert len(read_all(copy_of, "val")) == MAX_USERS
