"""``recsys-dist/sets-v1``: per-user interaction sets of DiffRec's ML-1M (shards/sets.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from webdataset import TarWriter

from shards import SET_SPLITS, SETS_FORMAT, SetReader, ShardError, build_sets_shards, load_sets_item_emb
from shards.sets import BLOCK_MEMBERS, SETS_VARIANTS, block_sha256
from shards.sources import default_data_dir

CLEAN = os.path.join(default_data_dir(), SETS_VARIANTS["ml-1m_clean"])
NOISY = os.path.join(default_data_dir(), SETS_VARIANTS["ml-1m_noisy"])
# README "DiffRec format" table
COUNTS = {"ml-1m_clean": (5949, 2810, {"train": 403277, "valid": 110722, "test": 57532}),
          "ml-1m_noisy": (5949, 3494, {"train": 429993, "valid": 130772, "test": 57532})}

pytestmark = pytest.mark.skipif(not os.path.isdir(CLEAN), reason=f"dataset not found: {CLEAN}")


def _raw(folder=CLEAN):
    return {s: np.load(os.path.join(folder, f"{s}_list.npy"), allow_pickle=False) for s in SET_SPLITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sets") / "clean")
    return out, build_sets_shards("clean", out)


@pytest.fixture
def copy(built, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(built[0], dst)
    return dst


def _read_all(reader):
    return [b for b in reader]


def _pairs(batches, split):
    """(n, 2) [user, raw item] pairs of a jagged reader's batches, in yield order."""
    us, its = [], []
    for b in batches:
        off, items = b[split]
        us.append(np.repeat(b["user"].numpy(), np.diff(off.numpy())))
        its.append(items.numpy() - 1)
    return np.stack([np.concatenate(us), np.concatenate(its)], axis=1)


def _users_until_error(reader):
    seen = []
    with pytest.raises(ShardError) as ei:
        for b in reader:
            seen.extend(b["user"].tolist())
    return ei.value, set(seen)


def _manifest(root):
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)


def _save_manifest(root, m):
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(m, f)


def _rewrite_block(root, shard, change):
    """Rewrite the (only) block of shard ``shard`` with ``change(arrays)`` applied; update the
    manifest's block and shard checksums so only the reader's structural checks can object."""
    path = os.path.join(root, f"sets-{shard:05d}.tar")
    with tarfile.open(path) as tf:
        mem = {ti.name.partition(".")[2]: tf.extractfile(ti).read() for ti in tf}
        key = tf.getnames()[0].partition(".")[0]
    arrays = {k: np.load(io.BytesIO(v)) for k, v in mem.items()}
    change(arrays)
    for k, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, a)
        mem[k] = buf.getvalue()
    with open(path, "wb") as f:
        with TarWriter(f, encoder=False, mtime=0, compress=False) as tw:
            tw.write({"__key__": key, **mem})
    m = _manifest(root)
    sh = m["shards"][shard]
    sh["blocks"][0]["sha256"] = block_sha256(mem)
    with open(path, "rb") as f:
        data = f.read()
    sh["bytes"], sh["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    _save_manifest(root, m)
    return key


# --------------------------------------------------------------------------- build / round trip


@pytest.mark.parametrize("variant", ["ml-1m_clean", "ml-1m_noisy"])
def test_counts_match_readme(built, tmp_path, variant):
    m = built[1] if variant == "ml-1m_clean" else build_sets_shards(variant, str(tmp_path / "n"))
    users, items, inter = COUNTS[variant]
    assert (m["format"], m["dataset"], m["num_users"], m["num_items"]) == (SETS_FORMAT, variant, users, items)
    assert m["num_interactions"] == inter
    assert sum(b["num_users"] for sh in m["shards"] for b in sh["blocks"]) == users
    assert m["item_emb"]["shape"] == [items, 64] and m["id_map"]["item_id_offset"] == 1


def test_round_trip_exact_and_ordered(built):
    raw = _raw()
    batches = _read_all(SetReader(built[0], batch_users=700))  # batches straddle blocks
    assert [len(b["user"]) for b in batches] == [700] * 8 + [349]
    assert torch.equal(torch.cat([b["user"] for b in batches]), torch.arange(5949))
    for s in SET_SPLITS:  # the files are grouped by user; the reader keeps file order within a user
        np.testing.assert_array_equal(_pairs(batches, s), raw[s])
    padded = _read_all(SetReader(built[0], batch_users=700, layout="padded"))
    for bj, bp in zip(batches, padded):
        for s in SET_SPLITS:
            off, items = bj[s]
            lens = torch.diff(off)
            assert bp[s].shape == (len(lens), int(lens.max()))
            assert torch.equal(bp[s][bp[s] != 0], items)  # row-major, left-aligned, 0-padded
            assert torch.equal((bp[s] != 0).sum(1), lens)


def test_item_emb_copied(built):
    emb = load_sets_item_emb(built[0])
    src = np.load(os.path.join(CLEAN, "item_emb.npy"))
    assert emb.shape == (2811, 64) and not emb[0].any()
    np.testing.assert_array_equal(emb[1:], src)


def test_plain_webdataset_reads_blocks(built):
    import webdataset as wds

    path = os.path.join(built[0], "sets-00000.tar")
    samples = list(wds.WebDataset([path], shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["block-000000"]
    assert set(samples[0]) - {"__key__", "__url__", "__local_path__"} == set(BLOCK_MEMBERS)
    np.testing.assert_array_equal(np.load(io.BytesIO(samples[0]["users.npy"])), np.arange(2000))


def test_rebuild_is_noop_and_param_change_rewrites(built, tmp_path):
    root, m = built
    before = {n: os.stat(os.path.join(root, n)).st_mtime_ns for n in os.listdir(root)}
    assert build_sets_shards("ml-1m_clean", root) == m
    assert {n: os.stat(os.path.join(root, n)).st_mtime_ns for n in os.listdir(root)} == before
    out = str(tmp_path / "re")
    build_sets_shards("clean", out)
    m2 = build_sets_shards("clean", out, users_per_block=3000)  # 2 shards now; the third is removed
    assert [sh["name"] for sh in m2["shards"]] == ["sets-00000.tar", "sets-00001.tar"]
    assert sorted(os.listdir(out)) == ["item_emb.npy", "manifest.json", "sets-00000.tar", "sets-00001.tar"]
    assert sum(len(b["user"]) for b in SetReader(out, batch_users=4000)) == 5949
    other = tmp_path / "seq"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "recsys-dist/seq-v1"}))
    with pytest.raises(ValueError, match="refusing to overwrite"):
        build_sets_shards("clean", str(other))


# --------------------------------------------------------------------------- ranks / shuffle / batches


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_users(built, world_size):
    raw = _raw()
    for shuffle, epoch in [(False, 0), (True, 0), (True, 1)]:
        per = [[b for b in SetReader(built[0], r, world_size, 300, shuffle=shuffle, seed=7, epoch=epoch)]
               for r in range(world_size)]
        users = [torch.cat([b["user"] for b in bs]).tolist() for bs in per]
        flat = sorted(u for us in users for u in us)
        assert flat == list(range(5949)), "every user exactly once across ranks"
        assert max(map(len, users)) - min(map(len, users)) <= 1
        got = np.concatenate([_pairs(bs, "train") for bs in per])
        got = got[np.argsort(got[:, 0], kind="stable")]
        np.testing.assert_array_equal(got, raw["train"])  # per-user order survives the shuffle
        if shuffle:
            again = [torch.cat([b["user"] for b in SetReader(built[0], r, world_size, 300, shuffle=True, seed=7,
                                                            epoch=epoch)]).tolist() for r in range(world_size)]
            assert again == users, "deterministic for (seed, epoch)"
            if epoch == 0:
                shuffled0 = users
            else:
                assert users != shuffled0, "different order in another epoch"


def test_even_batches(built):
    kw = dict(batch_users=425, drop_last=True)  # ranks hold 2975 / 2974 users: 7 / 6 full batches
    assert SetReader(built[0], 0, 2, **kw).rank_batches() == [7, 6]
    own = [len(list(SetReader(built[0], r, 2, **kw))) for r in range(2)]
    assert own == [7, 6]
    drop = [list(SetReader(built[0], r, 2, even_batches="drop", **kw)) for r in range(2)]
    assert [len(d) for d in drop] == [6, 6] and all(len(b["user"]) == 425 for d in drop for b in d)
    pad = [list(SetReader(built[0], r, 2, even_batches="pad", **kw)) for r in range(2)]
    assert [len(p) for p in pad] == [7, 7]
    last = pad[1][-1]
    assert last["user"].shape == (0,) and last["train"][0].tolist() == [0] and last["train"][1].numel() == 0
    r = SetReader(built[0], 1, 2, batch_users=1000, even_batches="pad", layout="padded")
    assert len(r) == 3 and sum(len(b["user"]) for b in r) == 2974


def test_dataloader_workers_keep_order(built):
    r = SetReader(built[0], 0, 2, 256, shuffle=True, seed=3)
    ref = [b["user"] for b in r]
    got = [b["user"] for b in DataLoader(r, batch_size=None, num_workers=2)]
    assert len(got) == len(ref) == len(r) and all(torch.equal(a, b) for a, b in zip(ref, got))


def test_memory_url(tmp_path):
    url = f"memory://sets-{uuid.uuid4().hex}/clean"
    try:
        m = build_sets_shards("clean", url, users_per_block=1000, blocks_per_shard=2)
        assert len(m["shards"]) == 3 and build_sets_shards("clean", url, users_per_block=1000,
                                                           blocks_per_shard=2) == m
        parts = [list(SetReader(url, r, 2, 512)) for r in range(2)]
        assert sorted(u for p in parts for b in p for u in b["user"].tolist()) == list(range(5949))
        np.testing.assert_array_equal(_pairs(list(SetReader(url, batch_users=999)), "valid"), _raw()["valid"])
    finally:
        fsspec.filesystem("memory").rm(url.split("/clean")[0], recursive=True)


# --------------------------------------------------------------------------- corruption


def _check(err, root, shard, key, *words):
    msg = str(err)
    assert os.path.join(root, f"sets-{shard:05d}.tar") in msg and f"[block {key}]" in msg, msg
    assert err.key == key
    for w in words:
        assert w in msg, msg


def test_flipped_byte_in_block_member(copy):
    path = os.path.join(copy, "sets-00001.tar")
    with tarfile.open(path) as tf:
        ti = tf.getmember("block-000001.train_items.npy")
    with open(path, "r+b") as f:
        f.seek(ti.offset_data + ti.size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    err, seen = _users_until_error(SetReader(copy, batch_users=500))
    _check(err, copy, 1, "block-000001", "checksum")
    assert seen == set(range(2000)), "block 0 streams; nothing of block 1 is yielded"


def test_truncated_shard(copy):
    path = os.path.join(copy, "sets-00001.tar")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * 0.6))
    err, seen = _users_until_error(SetReader(copy, batch_users=300))
    _check(err, copy, 1, "block-000001")
    assert not seen & set(range(2000, 4000))


def test_truncated_at_block_boundary_and_bad_header(tmp_path):
    out = str(tmp_path / "one")
    build_sets_shards("clean", out, blocks_per_shard=3)  # one shard, three blocks
    path = os.path.join(out, "sets-00000.tar")
    with tarfile.open(path) as tf:
        cut = tf.getmember("block-000001.test_items.npy").offset  # first header of block 1 (sorted names)
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # a corrupt header: tarfile itself would just stop here
        f.write(data[:cut] + b"\xff" * 8 + data[cut + 8:])
    err, seen = _users_until_error(SetReader(out, batch_users=2000))
    _check(err, out, 0, "block-000001")
    assert seen == set(range(2000))
    with open(path, "wb") as f:
        f.write(data[:cut])  # cleanly cut between blocks
    err, _ = _users_until_error(SetReader(out, batch_users=2000))
    _check(err, out, 0, "block-000001", "1 of 3 blocks")


def test_manifest_count_off_by_one(copy):
    m = _manifest(copy)
    m["shards"][2]["blocks"][0]["num_interactions"]["valid"] += 1  # consistent totals: only the data disagrees
    m["shards"][2]["num_interactions"]["valid"] += 1
    m["num_interactions"]["valid"] += 1
    _save_manifest(copy, m)
    err, seen = _users_until_error(SetReader(copy, batch_users=500))
    _check(err, copy, 2, "block-000002", "stale manifest")
    assert not seen & set(range(4000, 5949))
    m["shards"][2]["num_interactions"]["valid"] -= 1  # inconsistent counts are refused at load time
    m["num_interactions"]["valid"] -= 1
    _save_manifest(copy, m)
    with pytest.raises(ShardError, match=r"sets-00002\.tar \(manifest .*\) \[block block-000002\]"):
        SetReader(copy)
    m["shards"][2]["blocks"][0]["num_interactions"]["valid"] -= 1
    m["num_interactions"]["test"] -= 1
    _save_manifest(copy, m)
    with pytest.raises(ShardError, match="manifest totals say"):
        SetReader(copy)


@pytest.mark.parametrize("case", ["item_high", "item_pad", "offsets", "offsets_end", "dup_user"])
def test_invalid_block_contents(copy, case):
    def change(a):
        if case == "item_high":
            a["train_items.npy"][3] = 2811
        elif case == "item_pad":
            a["test_items.npy"][0] = 0
        elif case == "offsets":
            o = a["valid_offsets.npy"]
            o[5], o[6] = o[6] + 3, o[5]
        elif case == "offsets_end":
            a["train_offsets.npy"][-1] -= 1
        else:
            a["users.npy"][1] = a["users.npy"][0]

    key = _rewrite_block(copy, 1, change)
    err, seen = _users_until_error(SetReader(copy, batch_users=400))
    words = {"item_high": ["item id 2811 outside 1..2810"], "item_pad": ["item id 0"],
             "offsets": ["offsets are not monotone"], "offsets_end": ["offsets are not monotone"],
             "dup_user": ["duplicate"]}[case]
    _check(err, copy, 1, key, *words)
    assert not seen & set(range(2000, 4000))
