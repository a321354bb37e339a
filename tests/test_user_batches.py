"""DiffRec's per-user sets through ``SequenceDataset(split="records")`` (batches of whole users).

The staged ``ml-1m_clean`` lists (``configs/datasets/ml1m-diffrec_clean.yaml``: pairs_npy,
protocol ``given``) are built once per module (1000 users per block, 2 blocks per shard: 6
blocks in 3 shards) and read back as ``{"user", "train" / "valid" / "test": (offsets, items)}``.
The reference is the npy files grouped here by user (items raw + 1, each segment in file
order). A tiny hand-made pairs_npy dataset (``tmp_path``) covers the edge cases the real
data lacks: users with an empty train / valid / test segment, a user id with no
interaction at all, interleaved (not user-grouped) files, a split file with no rows.

Proved: every user's three segments equal the files' grouping; every user exactly once over
world sizes 1, 2, 3 (and 4), per-rank user counts within one of each other, contiguous
ranges; ``shuffle`` changes the order between epochs (deterministically per seed and epoch)
but not a rank's users nor any user's segments; ``drop_last`` + ``max_batches`` = the
smallest rank's ``plan_batches`` gives every rank as many full batches; users with empty
segments come back with empty segments; 0 and 2 DataLoader workers give identical batches;
the shards are plain WebDataset tars; a second build is a no-op and a changed layout
rewrites (stale shards removed); an fsspec ``memory://`` destination works.

Kept from the old ``test_shards_sets.py`` (sets-v1): README counts (clean and noisy), the
exact ordered round trip with batches straddling blocks, rank partition under shuffle and
epochs, even batch counts, DataLoader order, plain-WebDataset readability, idempotent
rebuild, memory URL. Dropped, as specific to sets-v1: the ``padded`` layout and
``even_batches="pad"`` (no such options: ``collate_records`` is jagged only; equal steps
come from ``max_batches``), the copied ``item_emb.npy`` (seq-v2 shards hold no
embeddings; the config points at the raw file), "refusing to overwrite" a foreign
manifest (seq-v2 rebuilds any folder), and the corruption cases written against sets-v1
member names (covered format-generically by ``tests/test_integrity.py``).
"""

from __future__ import annotations

import io
import os
import uuid
from typing import Dict, List, Tuple

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recsys_dist.config import load_config
from shards import FORMAT, SourceConfig, build_shards, load_manifest, plan_batches
from shards.dataset import SequenceDataset
from shards.source import default_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {v: os.path.join(ROOT, "configs", "datasets", f"ml1m-diffrec_{v}.yaml") for v in ("clean", "noisy")}
DATA_DIR = default_data_dir()
CLEAN = os.path.join(DATA_DIR, "ml-1m", "raw", "diffrec", "ml-1m_clean")
SEGMENTS = ("train", "valid", "test")
# datasets README, "DiffRec format": users, items, interactions per split
COUNTS = {"clean": (5949, 2810, {"train": 403277, "valid": 110722, "test": 57532}),
          "noisy": (5949, 3494, {"train": 429993, "valid": 130772, "test": 57532})}
USERS = 5949
BUILD = dict(records_per_block=1000, blocks_per_shard=2, progress=False)

staged = pytest.mark.skipif(not os.path.isdir(CLEAN), reason=f"staged ml-1m_clean not found at {CLEAN}")

Sets = Dict[int, Tuple[List[int], List[int], List[int]]]  # user -> (train, valid, test) items


# --------------------------------------------------------------------------- reference / helpers


def group(pairs: Dict[str, np.ndarray], num_users: int) -> Sets:
    """user -> per-segment items (raw + 1) in file order, for users 0..num_users-1."""
    out: Sets = {u: ([], [], []) for u in range(num_users)}
    for k, s in enumerate(SEGMENTS):
        for u, i in pairs[s].tolist():
            out[u][k].append(i + 1)
    return out


def raw_lists(folder: str = CLEAN) -> Dict[str, np.ndarray]:
    return {s: np.load(os.path.join(folder, f"{s}_list.npy"), allow_pickle=False) for s in SEGMENTS}


def sets_of(batches) -> List[Tuple[int, Tuple[List[int], List[int], List[int]]]]:
    """[(user, (train, valid, test))] of record batches, in yield order (checks the layout)."""
    out = []
    for b in batches:
        users = b["user"].tolist()
        segs = []
        for s in SEGMENTS:
            off, items = b[s]
            assert off.dtype == items.dtype == torch.int64 and off.shape == (len(users) + 1,)
            assert off[0] == 0 and off[-1] == items.numel() and bool((off[1:] >= off[:-1]).all())
            o = off.tolist()
            segs.append([items[o[i]:o[i + 1]].tolist() for i in range(len(users))])
        out += [(u, (segs[0][i], segs[1][i], segs[2][i])) for i, u in enumerate(users)]
    return out


def read(url: str, batch_size: int = 256, rank: int = 0, world_size: int = 1, **kw) -> list:
    return list(SequenceDataset(url, "records", batch_size, rank, world_size, **kw))


def users_of(batches) -> List[int]:
    return [u for b in batches for u in b["user"].tolist()]


def norm(b):
    """A batch with tuples as lists (the DataLoader's default_convert turns tuples into lists)."""
    return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in b.items()}


def same_batches(a: list, b: list) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        return len(x) == len(y) and all(eq(p, q) for p, q in zip(x, y))

    return len(a) == len(b) and all(norm(x).keys() == norm(y).keys() and all(eq(norm(x)[k], norm(y)[k]) for k in x)
                                    for x, y in zip(a, b))


def clean_source():
    return load_config(CONFIGS["clean"]).data.source


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not os.path.isdir(CLEAN):
        pytest.skip(f"staged ml-1m_clean not found at {CLEAN}")
    out = str(tmp_path_factory.mktemp("sets") / "clean")
    return out, build_shards(clean_source(), out, dataset="ml-1m_clean", data_dir=DATA_DIR, **BUILD)


@pytest.fixture(scope="module")
def reference():
    if not os.path.isdir(CLEAN):
        pytest.skip(f"staged ml-1m_clean not found at {CLEAN}")
    return group(raw_lists(), USERS)


# --------------------------------------------------------------------------- tiny hand-made dataset

# raw [user, item] rows, deliberately not grouped by user; user 3 has no interaction at all,
# user 1 only train, user 2 no train, user 5 only test, user 6 (the largest id) only valid
TINY = {
    "train": [(4, 7), (0, 3), (1, 2), (4, 1), (0, 9), (1, 2), (7, 0), (0, 3), (4, 4)],
    "valid": [(6, 5), (0, 1), (2, 8), (4, 6), (7, 2)],
    "test": [(2, 9), (0, 6), (5, 3), (4, 0), (2, 2), (7, 8)],
}
TINY_USERS = 8


def tiny_dataset(tmp_path, lists=TINY, rpb: int = 3) -> Tuple[str, Dict[str, np.ndarray]]:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    arrays = {s: np.asarray(lists[s], dtype=np.int64).reshape(-1, 2) for s in SEGMENTS}
    for s, a in arrays.items():
        np.save(d / f"{s}_list.npy", a)
    cfg = SourceConfig(files={s: str(d / f"{s}_list.npy") for s in SEGMENTS}, format="pairs_npy", protocol="given")
    out = str(tmp_path / f"tiny-{rpb}")
    build_shards(cfg, out, dataset="tiny", records_per_block=rpb, blocks_per_shard=2, progress=False)
    return out, arrays


@pytest.mark.parametrize("variant", ["interleaved", "empty_valid_file"])
def test_tiny_edge_cases_come_back_with_empty_segments(tmp_path, variant):
    lists = TINY if variant == "interleaved" else {**TINY, "valid": []}
    out, arrays = tiny_dataset(tmp_path, lists)
    ref = group(arrays, TINY_USERS)
    assert ref[3] == ([], [], []) and ref[1][1:] == ([], []) and ref[2][0] == [] and ref[5][:2] == ([], [])
    m = load_manifest(out)
    assert (m["num_records"], m["num_items"]) == (TINY_USERS, 10)  # users 0..max; items: max raw + 1
    for bs in (1, 3, 5, 8):  # batches within, across and over blocks (3 users each) and shards
        got = sets_of(read(out, bs))
        assert got == sorted(ref.items())
        assert [len(b["user"]) for b in read(out, bs)] == [bs] * (TINY_USERS // bs) + (
            [TINY_USERS % bs] if TINY_USERS % bs else [])
    for ws in (2, 3):
        per = [sets_of(read(out, 2, r, ws)) for r in range(ws)]
        assert sorted(x for p in per for x in p) == sorted(ref.items())
        assert max(map(len, per)) - min(map(len, per)) <= 1
    # a batch of the user without any interaction: three empty segments, offsets [0, 0]
    only = [b for b in read(out, 1) if b["user"].tolist() == [3]][0]
    for s in SEGMENTS:
        assert only[s][0].tolist() == [0, 0] and only[s][1].numel() == 0


# --------------------------------------------------------------------------- staged ml-1m_clean


@staged
@pytest.mark.parametrize("variant", ["clean", "noisy"])
def test_counts_match_readme(built, tmp_path, variant):
    if variant == "clean":
        m = built[1]
    else:
        m = build_shards(load_config(CONFIGS["noisy"]).data.source, str(tmp_path / "noisy"),
                         dataset="ml-1m_noisy", data_dir=DATA_DIR, **BUILD)
    users, items, inter = COUNTS[variant]
    assert (m["format"], m["protocol"], m["num_records"], m["num_items"]) == (FORMAT, "given", users, items)
    assert m["num_interactions"] == inter
    assert sum(b["num_records"] for sh in m["shards"] for b in sh["blocks"]) == users


def test_round_trip_exact_and_ordered(built, reference):
    """World size 1: users 0..5948 in order, batches straddling blocks, every segment as in the files."""
    out, m = built
    assert len(m["shards"]) == 3 and sum(len(sh["blocks"]) for sh in m["shards"]) == 6
    batches = read(out, 700)
    assert [len(b["user"]) for b in batches] == [700] * 8 + [349]
    got = sets_of(batches)
    assert [u for u, _ in got] == list(range(USERS))
    assert got == sorted(reference.items())
    raw = raw_lists()  # the jagged batches flatten back to the (user-grouped) files themselves
    for s in SEGMENTS:
        us = np.concatenate([np.repeat(b["user"].numpy(), np.diff(b[s][0].numpy())) for b in batches])
        its = np.concatenate([b[s][1].numpy() for b in batches]) - 1
        np.testing.assert_array_equal(np.stack([us, its], 1), raw[s])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_user_once_per_world_size(built, reference, world_size):
    out, m = built
    per = [read(out, 300, r, world_size) for r in range(world_size)]
    users = [users_of(bs) for bs in per]
    assert [u for us in users for u in us] == list(range(USERS))  # contiguous ranges, in rank order
    assert max(map(len, users)) - min(map(len, users)) <= 1
    assert [len(bs) for bs in per] == plan_batches(m, "records", 300, world_size, False)
    assert sorted(x for bs in per for x in sets_of(bs)) == sorted(reference.items())


@pytest.mark.parametrize("world_size", [2, 3])
def test_shuffle_changes_order_not_membership(built, reference, world_size):
    out, _ = built
    plain = [set(users_of(read(out, 256, r, world_size))) for r in range(world_size)]
    orders = {}
    for epoch in (0, 1):
        per = [read(out, 256, r, world_size, shuffle=True, seed=7, epoch=epoch, window_blocks=2)
               for r in range(world_size)]
        orders[epoch] = [users_of(bs) for bs in per]
        assert [set(u) for u in orders[epoch]] == plain  # a rank keeps its users
        assert all(len(set(u)) == len(u) for u in orders[epoch])
        assert all(u != sorted(u) for u in orders[epoch])
        got = dict(x for bs in per for x in sets_of(bs))
        assert got == reference  # segments (and their order) survive the shuffle
        again = [users_of(read(out, 256, r, world_size, shuffle=True, seed=7, epoch=epoch, window_blocks=2))
                 for r in range(world_size)]
        assert again == orders[epoch], "deterministic for (seed, epoch)"
    assert all(a != b for a, b in zip(orders[0], orders[1])), "another epoch, another order on every rank"


@pytest.mark.parametrize("world_size, batch, own", [(2, 425, [7, 6]), (4, 248, [6, 5, 5, 5])])
def test_drop_last_and_max_batches_give_equal_steps(built, world_size, batch, own):
    out, m = built
    assert plan_batches(m, "records", batch, world_size, True) == own  # 2975/2974 resp. 1488/1487 users
    assert [len(read(out, batch, r, world_size, drop_last=True)) for r in range(world_size)] == own
    cap = min(plan_batches(m, "records", batch, world_size, True))
    for shuffle in (False, True):
        per = [read(out, batch, r, world_size, drop_last=True, max_batches=cap, shuffle=shuffle, seed=1)
               for r in range(world_size)]
        assert [len(bs) for bs in per] == [cap] * world_size
        assert all(len(b["user"]) == batch for bs in per for b in bs)
        users = [u for bs in per for u in users_of(bs)]
        assert len(set(users)) == len(users) == cap * batch * world_size
        for r, bs in enumerate(per):  # the cap drops only the tail of a rank's stream
            full = read(out, batch, r, world_size, shuffle=shuffle, seed=1)
            assert same_batches(bs, full[:cap])


def test_dataloader_workers_give_identical_batches(built):
    out, _ = built
    for rank, kw in ((0, dict(shuffle=True, seed=3, window_blocks=1)), (1, {})):
        ds = SequenceDataset(out, "records", 256, rank, 2, **kw)
        direct = list(ds)
        zero = list(DataLoader(ds, batch_size=None, num_workers=0))
        two = list(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(direct) == len(ds) and same_batches(zero, direct) and same_batches(two, zero)


def test_users_with_an_empty_test_set(built, reference, tmp_path):
    """ml-1m_clean with the test rows of every 5th user removed: those users read back with an
    empty test segment (train / valid unchanged), over 2 ranks and 2 workers."""
    raw = raw_lists()
    drop = raw["test"][:, 0] % 5 == 0
    d = tmp_path / "src"
    d.mkdir()
    for s in SEGMENTS:
        np.save(d / f"{s}_list.npy", raw[s][~drop] if s == "test" else raw[s])
    cfg = SourceConfig(files={s: str(d / f"{s}_list.npy") for s in SEGMENTS}, format="pairs_npy", protocol="given")
    out = str(tmp_path / "out")
    m = build_shards(cfg, out, dataset="ml-1m_clean-cut", **BUILD)
    assert m["num_records"] == USERS and m["num_interactions"]["test"] == int((~drop).sum())
    got = {}
    for r in range(2):
        for u, segs in sets_of(DataLoader(SequenceDataset(out, "records", 500, r, 2), batch_size=None,
                                          num_workers=2)):
            assert u not in got
            got[u] = segs
    assert len(got) == USERS
    for u, (tr, va, te) in got.items():
        assert (tr, va) == reference[u][:2]
        assert te == ([] if u % 5 == 0 else reference[u][2])


def test_plain_webdataset_reads_blocks(built):
    import webdataset as wds

    out, _ = built
    samples = list(wds.WebDataset([os.path.join(out, "seq-00000.tar")], shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["block-000000", "block-000001"]
    assert set(samples[0]) - {"__key__", "__url__", "__local_path__"} == {
        "records.npy", "offsets.npy", "items.npy", "bounds.npy"}
    np.testing.assert_array_equal(np.load(io.BytesIO(samples[1]["records.npy"])), np.arange(1000, 2000))


def test_rebuild_is_noop_and_layout_change_rewrites(built, tmp_path):
    out, m = built
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert build_shards(clean_source(), out, dataset="ml-1m_clean", data_dir=DATA_DIR, **BUILD) == m
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == before
    re = str(tmp_path / "re")
    build_shards(clean_source(), re, dataset="ml-1m_clean", data_dir=DATA_DIR, **BUILD)
    m2 = build_shards(clean_source(), re, dataset="ml-1m_clean", data_dir=DATA_DIR,
                      **dict(BUILD, records_per_block=3000))  # 2 blocks, 1 shard: the other two removed
    assert [sh["name"] for sh in m2["shards"]] == ["seq-00000.tar"]
    assert sorted(f for f in os.listdir(re) if ".tar" in f) == ["seq-00000.tar"]
    assert same_batches(read(re, 999), read(out, 999))


def test_memory_url(built, reference):
    url = f"memory://sets-{uuid.uuid4().hex}/clean"
    try:
        m = build_shards(clean_source(), url, dataset="ml-1m_clean", data_dir=DATA_DIR, **BUILD)
        assert len(m["shards"]) == 3
        per = [sets_of(read(url, 512, r, 2)) for r in range(2)]
        assert sorted(x for p in per for x in p) == sorted(reference.items())
        assert same_batches(read(url, 999), read(built[0], 999))
    finally:
        fsspec.filesystem("memory").rm(url.split("/clean")[0], recursive=True)
