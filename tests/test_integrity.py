"""Data integrity of ``recsys-dist/seq-v2`` shards: nothing corrupted, stale or malformed
reaches training silently.

Every guarantee has the same shape: the reader (:class:`shards.dataset.SequenceDataset`
over a split, :func:`shards.stream.read_shard`, or :func:`shards.format.load_manifest`)
either yields exactly the correct data or raises :class:`shards.format.ShardError` whose
message names the shard (or manifest) URL and, for block damage, the block key; and no
sample of a damaged block is yielded before the error.

The datasets are tiny (60 records, 6 blocks of 10 records, 2 blocks per shard: 3 shards of
~10 KiB plain, ~0.7 KiB gzip) so that hundreds of damaged variants are read in seconds.
Damage goes into shard 1 (blocks 2 and 3), which every split reads both at world size 1
and on rank 1 of 2 (checked).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import re
import shutil
import signal
import tarfile
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shards.dataset import SequenceDataset
from shards.format import ShardError, block_entries, block_key, load_manifest, shard_url
from shards.plan import rank_plan, split_sizes
from shards.stream import read_shard
from shards.synthetic import synth_shards

SPLITS = ("train", "valid", "test")
CONFIGS = ((0, 1), (1, 2))  # (rank, world_size)
BATCH, MAX_LEN = 16, 8
DAMAGED = 1  # the shard the damage goes into
SYNTH = dict(num_items=200, num_users=60, num_interests=10, max_seq_len=12, records_per_block=10,
             blocks_per_shard=2, seed=5, progress=False)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Dict[bool, str]:
    """compress -> folder of a pristine dataset (never modified: tests work on copies)."""
    out = {}
    for gz in (False, True):
        d = str(tmp_path_factory.mktemp("gz" if gz else "plain"))
        synth_shards(d, compress=gz, **SYNTH)
        out[gz] = d
    return out


@pytest.fixture(params=[False, True], ids=["tar", "tar.gz"])
def data(request, datasets, tmp_path) -> "Data":
    d = str(tmp_path / "ds")
    shutil.copytree(datasets[request.param], d)
    return Data(d, request.param)


class Data:
    """A private copy of a dataset, its manifest, per-block records and reference batches."""

    _refs: Dict[Tuple[str, bool], Dict[tuple, List[dict]]] = {}

    def __init__(self, folder: str, gz: bool) -> None:
        self.folder, self.gz = folder, gz
        self.m = load_manifest(folder)
        self.entries = block_entries(self.m)
        key = (json.dumps(self.m["shards"]), gz)
        if key not in Data._refs:
            Data._refs[key] = {(s, r, w): read(folder, s, r, w, self.m)[0] for s in SPLITS for r, w in CONFIGS}
        self.ref = Data._refs[key]

    def shard_path(self, s: int = DAMAGED) -> str:
        return os.path.join(self.folder, self.m["shards"][s]["name"])

    def shard_url(self, s: int = DAMAGED) -> str:
        return shard_url(self.folder, self.m["shards"][s]["name"])

    def block_records(self, keys: Set[str]) -> Set[int]:
        return block_records(self.m, keys)

    def shard_keys(self, s: int = DAMAGED) -> List[str]:
        return [b["key"] for b in self.m["shards"][s]["blocks"]]


def block_records(m: dict, keys: Set[str]) -> Set[int]:
    """Record ids of the blocks ``keys``: ``first_record .. first_record + num_records - 1``."""
    return {r for _, _, b in block_entries(m) if b["key"] in keys
            for r in range(b["first_record"], b["first_record"] + b["num_records"])}


def read(url: str, split: str, rank: int = 0, world_size: int = 1, manifest: Optional[dict] = None,
         **kw: Any) -> Tuple[List[dict], Optional[ShardError]]:
    """(batches yielded, the ShardError that ended the epoch or None). Any other exception
    propagates (and fails the test): damage must never surface as a raw error."""
    ds = SequenceDataset(url, split, BATCH, rank, world_size, max_len=MAX_LEN, shuffle=split == "train", seed=3,
                         manifest=manifest, **kw)
    got: List[dict] = []
    try:
        for b in ds:
            got.append(b)
    except ShardError as e:
        return got, e
    return got, None


def same_batches(a: List[dict], b: List[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def users(batches: List[dict]) -> Set[int]:
    return {u for b in batches for u in b["user"].tolist()}


def samples(batches: List[dict]) -> List[tuple]:
    return [(u, t, tuple(h)) for b in batches for u, t, h in
            zip(b["user"].tolist(), b["target"].tolist(), b["history"].tolist())]


def check_partial_read(d: Data, batches: List[dict], err: Optional[ShardError], split: str, rank: int, ws: int,
                       damaged_keys: Set[str], what: str) -> None:
    """A read of damaged data raised, yielded a correct prefix, and nothing of a damaged block."""
    assert err is not None, f"{what}: {split} rank {rank}/{ws} read the damaged shard without an error"
    ref = d.ref[(split, rank, ws)]
    assert same_batches(batches, ref[:len(batches)]), f"{what}: batches before the error differ from the true ones"
    leaked = users(batches) & d.block_records(damaged_keys)
    assert not leaked, f"{what}: records {sorted(leaked)[:5]} of damaged block(s) {sorted(damaged_keys)} were yielded"


def tar_layout(raw: bytes) -> Tuple[Dict[str, Tuple[int, int]], List[Tuple[int, int, str]]]:
    """Of an uncompressed shard: block key -> byte span [start, end) (its members' headers,
    data and padding), and (start, end, kind) regions, kind in header / data / padding."""
    spans: Dict[str, Tuple[int, int]] = {}
    regions: List[Tuple[int, int, str]] = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        for ti in tf:
            end = ti.offset_data + -(-ti.size // 512) * 512
            k = ti.name.split(".", 1)[0]
            spans[k] = (spans.get(k, (ti.offset, 0))[0], end)
            regions += [(ti.offset, ti.offset_data, "header"), (ti.offset_data, ti.offset_data + ti.size, "data"),
                        (ti.offset_data + ti.size, end, "padding")]
    return spans, regions


def gunzip_lenient(raw: bytes) -> bytes:
    """What a gzip decoder produces from ``raw`` before it fails (byte by byte, so nothing
    decoded before the bad byte is lost)."""
    dec, out = zlib.decompressobj(16 + zlib.MAX_WBITS), []
    try:
        for i in range(len(raw)):
            out.append(dec.decompress(raw[i:i + 1]))
            if dec.eof:
                break
    except zlib.error:
        pass
    return b"".join(out)


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(diff[0]) if diff.size else (n if len(a) != len(b) else -1)


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) if the body takes longer than ``seconds``."""
    def on_alarm(*_):
        raise TimeoutError(f"no result within {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_damaged_shard_is_read_by_every_split_and_config(datasets):
    """Precondition of the damage tests: shard 1 is read by every (split, rank/world size)."""
    m = load_manifest(datasets[False])
    assert len(m["shards"]) == 3 and all(len(sh["blocks"]) == 2 for sh in m["shards"])
    for split in SPLITS:
        for r, w in CONFIGS:
            shards_read = {block_entries(m)[b][0] for b, _, _ in rank_plan(split_sizes(m, split), r, w)}
            assert DAMAGED in shards_read, (split, r, w, shards_read)


# --------------------------------------------------------------------------- 1. corrupted bytes never pass


def damage_cases(raw: bytes, gz: bool, rng: np.random.Generator) -> List[Tuple[str, bytes]]:
    """(label, damaged bytes) of one shard: byte flips, zeroed / duplicated 512-byte blocks,
    truncations, appended garbage."""
    n = len(raw)
    cases: List[Tuple[str, bytes]] = []
    if gz:
        pos = list(range(10)) + list(range(n - 8, n))  # gzip header and CRC32 / ISIZE trailer
        pos += rng.choice(np.arange(10, n - 8), size=200 - len(pos), replace=False).tolist()
    else:
        _, regions = tar_layout(raw)
        pos = []
        for kind in ("header", "data", "padding"):
            where = np.concatenate([np.arange(a, b) for a, b, k in regions if k == kind and b > a])
            pos += rng.choice(where, size=50, replace=False).tolist()
        pos += rng.choice(np.arange(n), size=50, replace=False).tolist()  # anywhere, incl. the end-of-archive zeros
    for p in pos:
        b = bytearray(raw)
        b[p] ^= int(rng.integers(1, 256))
        cases.append((f"flip@{p}", bytes(b)))
    step = 512 if not gz else 128
    for o in range(0, n - 511, step):
        cases.append((f"zero512@{o}", raw[:o] + bytes(512) + raw[o + 512:]))
        cases.append((f"dup512@{o}", raw[:o + 512] + raw[o:o + 512] + raw[o + 512:]))
    for t in sorted({0, 1, 10, 100, 511, 512, 513, 1000, n // 3, n // 2, n - 1024, n - 512, n - 9, n - 8, n - 1}):
        if 0 <= t < n:
            cases.append((f"truncate@{t}", raw[:t]))
    for label, tail in (("zeros512", bytes(512)), ("zeros10240", bytes(10240)), ("random100", rng.bytes(100)),
                        ("itself", raw)):
        cases.append((f"append-{label}", raw + tail))
    return [(lab, c) for lab, c in cases if c != raw]


def test_corrupted_bytes_never_pass(data):
    """Every modified shard raises ShardError naming its URL when read completely (by
    read_shard, and by SequenceDataset for every split at world size 1 and on rank 1 of 2),
    yields only verified blocks / a correct prefix of batches before that, and nothing of a
    damaged block. Plain data damage names the damaged block."""
    d, gz = data, data.gz
    path, url = d.shard_path(), d.shard_url()
    raw = open(path, "rb").read()
    plain = gzip.decompress(raw) if gz else raw
    spans, regions = tar_layout(plain)
    keys = d.shard_keys()
    truth = dict(read_shard(d.m, d.folder, DAMAGED, {0, 1}))
    rng = np.random.default_rng(1234)
    cases = damage_cases(raw, gz, rng)
    assert len(cases) >= 200
    kinds_hit: Dict[str, int] = {}
    for i, (label, bad) in enumerate(cases):
        with open(path, "wb") as f:
            f.write(bad)
        # where the (uncompressed) tar first differs: blocks ending after it are damaged
        q = first_difference(gunzip_lenient(bad) if gz else bad, plain)
        damaged = {k for k, (a, e) in spans.items() if q >= 0 and e > q}
        what = f"{'tar.gz' if gz else 'tar'} {label}"
        # read_shard: raises at the latest at the end, having yielded only true blocks
        got = []
        with pytest.raises(ShardError) as ei:
            for p, blk in read_shard(d.m, d.folder, DAMAGED, {0, 1}):
                got.append((p, blk))
        e = ei.value
        assert url in str(e) and e.url == url, f"{what}: {e}"
        for p, blk in got:
            t = truth[p]
            assert blk.key == t.key and all(np.array_equal(getattr(blk, a), getattr(t, a))
                                            for a in ("records", "offsets", "items", "bounds")), what
        if e.key is not None:
            assert e.key in keys and e.key in str(e), f"{what}: {e}"
        if not gz and label.startswith("flip"):
            p = int(label.split("@")[1])
            kind = next((k for a, b, k in regions if a <= p < b), "tail")
            kinds_hit[kind] = kinds_hit.get(kind, 0) + 1
            if kind == "data":  # the block's bytes changed: its checksum names it
                k = next(k for k, (a, b) in spans.items() if a <= p < b)
                assert e.key == k and f"block {k}" in str(e), f"{what}: {e}"
        if not gz and label.startswith(("truncate", "zero512", "dup512")) and damaged:
            k = min(damaged)  # the first block the damage reaches
            assert e.key == k, f"{what}: expected block {k} named: {e}"
        # SequenceDataset: every split, world size 1 and rank 1 of 2 (rotating, each case one read)
        split, (rank, ws) = SPLITS[i % 3], CONFIGS[(i // 3) % 2]
        batches, err = read(d.folder, split, rank, ws, d.m)
        check_partial_read(d, batches, err, split, rank, ws, damaged, what)
        assert url in str(err), f"{what}: {err}"
    with open(path, "wb") as f:
        f.write(raw)
    if not gz:
        assert all(kinds_hit.get(k, 0) >= 20 for k in ("header", "data", "padding")), kinds_hit
    assert same_batches(read(d.folder, "valid", manifest=d.m)[0], d.ref[("valid", 0, 1)])  # restored: reads again


# --------------------------------------------------------------------------- 2. counts are checked (stale manifests)


def write_manifest(d: Data, m: dict) -> None:
    with open(os.path.join(d.folder, "manifest.json"), "w") as f:
        json.dump(m, f)


def blk(m: dict, b: int) -> dict:
    return block_entries(m)[b][2]


def shift_records(m: dict, b: int, delta: int) -> None:
    """Block ``b`` holds ``delta`` more records; the later ranges and the total follow (a
    consistent manifest that the schema cannot tell from the truth)."""
    blk(m, b)["num_records"] += delta
    for _, _, e in block_entries(m)[b + 1:]:
        e["first_record"] += delta
    m["num_records"] += delta
    m["num_users"] = m["num_records"]


def add_items(m: dict, b: int, delta: int) -> None:
    blk(m, b)["num_items"] += delta
    blk(m, b)["interactions"]["train"] += delta
    m["num_interactions"]["train"] += delta


def add_samples(m: dict, b: int, split: str, delta: int) -> None:
    blk(m, b)["samples"][split] += delta
    m["num_samples"][split] += delta


def _swap_keys(m: dict) -> None:
    a, b = blk(m, 2), blk(m, 3)
    a["key"], b["key"] = b["key"], a["key"]


def _swap_entries(m: dict) -> None:
    bl = m["shards"][1]["blocks"]
    bl[0], bl[1] = bl[1], bl[0]


def _swap_names(m: dict) -> None:
    a, b = m["shards"][0], m["shards"][1]
    a["name"], b["name"] = b["name"], a["name"]


def _at(m: Any, path: str) -> Tuple[Any, Any]:
    """(container, key) of ``path`` ("shards.1.blocks.0.key") in the manifest ``m``."""
    *head, last = path.split(".")
    for p in head:
        m = m[int(p)] if isinstance(m, list) else m[p]
    return m, int(last) if isinstance(m, list) else last


def _set(path: str, value: Any):
    """An edit setting ``path`` of the manifest to ``value``."""
    def edit(m: dict) -> None:
        x, k = _at(m, path)
        x[k] = value
    return edit


def _bump(path: str, delta: int):
    def edit(m: dict) -> None:
        x, k = _at(m, path)
        x[k] += delta
    return edit


def _del(path: str):
    def edit(m: dict) -> None:
        x, k = _at(m, path)
        del x[k]
    return edit


#: (label, edit, fields of which the load error must name one): caught when the manifest loads
LOAD_CASES = [
    ("block num_records +1", _bump("shards.1.blocks.0.num_records", 1), ["shards[1].blocks[1].first_record"]),
    ("block num_records -1", _bump("shards.1.blocks.0.num_records", -1), ["shards[1].blocks[1].first_record"]),
    ("last block num_records +1", _bump("shards.2.blocks.1.num_records", 1), ["num_records"]),
    ("last block num_records -1", _bump("shards.2.blocks.1.num_records", -1), ["num_records"]),
    ("block num_items +1", _bump("shards.1.blocks.0.num_items", 1), ["shards[1].blocks[0].interactions"]),
    ("block num_items -1", _bump("shards.1.blocks.0.num_items", -1), ["shards[1].blocks[0].interactions"]),
    *[(f"block samples.{s} {d:+d}", _bump(f"shards.1.blocks.0.samples.{s}", d), ["num_samples"])
      for s in SPLITS for d in (1, -1)],
    *[(f"block interactions.{s} {d:+d}", _bump(f"shards.1.blocks.1.interactions.{s}", d),
       ["shards[1].blocks[1].interactions"]) for s in SPLITS for d in (1, -1)],
    ("total num_records +1", _bump("num_records", 1), ["num_records"]),
    ("total num_records -1", _bump("num_records", -1), ["num_records"]),
    *[(f"total num_samples.{s} +1", _bump(f"num_samples.{s}", 1), ["num_samples"]) for s in SPLITS],
    *[(f"total num_interactions.{s} -1", _bump(f"num_interactions.{s}", -1), ["num_interactions"]) for s in SPLITS],
    ("shard listed twice", lambda m: m["shards"].append(copy.deepcopy(m["shards"][1])), ["shards[3].name"]),
    ("shard listed twice in a row", lambda m: m["shards"].insert(2, copy.deepcopy(m["shards"][1])),
     ["shards[2].name"]),
    ("block key renamed", _set("shards.1.blocks.0.key", "block-000099"), ["shards[1].blocks[0].key"]),
    ("block key of another dataset", _set("shards.1.blocks.0.key", "seq-000002"), ["shards[1].blocks[0].key"]),
    ("block keys out of order", _swap_keys, ["shards[1].blocks[0].key"]),
    ("block entries out of order", _swap_entries, ["shards[1].blocks[0].key", "shards[1].blocks[0].first_record"]),
    ("first_record +1", _bump("shards.1.blocks.0.first_record", 1), ["shards[1].blocks[0].first_record"]),
    ("first_record -1", _bump("shards.1.blocks.0.first_record", -1), ["shards[1].blocks[0].first_record"]),
    ("first record of the dataset 1", _bump("shards.0.blocks.0.first_record", 1), ["shards[0].blocks[0].first_record"]),
    ("num_items 0", _set("num_items", 0), ["num_items"]),
]


@pytest.mark.parametrize("label,edit,fields", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_stale_counts_fail_when_the_manifest_loads(datasets, tmp_path, label, edit, fields):
    m = load_manifest(datasets[False])
    edit(m)
    path = str(tmp_path / "manifest.json")
    with open(path, "w") as f:
        json.dump(m, f)
    with pytest.raises(ShardError) as ei:
        load_manifest(str(tmp_path))
    msg = str(ei.value)
    assert path in msg and ei.value.url == path, msg
    assert any(f + ":" in msg for f in fields), f"{label}: none of {fields} named in: {msg}"
    with pytest.raises(ShardError):
        SequenceDataset(str(tmp_path), "train", BATCH)


def max_item_per_block(d: Data) -> Dict[str, int]:
    return {b.key: int(b.items.max()) for s, sh in enumerate(d.m["shards"])
            for _, b in read_shard(d.m, d.folder, s, set(range(len(sh["blocks"]))))}


def _lower_num_items(m: dict, d: Data) -> None:
    m["num_items"] = max(max_item_per_block(d).values()) - 1


def _other_build(m: dict, d: Data) -> None:
    """Shard 1 replaced by shard 1 of a rebuild with another seed (same layout): the
    manifest is stale for it."""
    other = d.folder + "-other"
    synth_shards(other, compress=d.gz, **{**SYNTH, "seed": 6})
    shutil.copyfile(os.path.join(other, m["shards"][1]["name"]), d.shard_path(1))


#: (label, edit (manifest, data) of the manifest or the files, blocks that are damaged (None:
#: those holding an item id above num_items), shards whose URL the error may name):
#: consistent manifests, caught when the blocks are read
READ_CASES = [
    ("block holds a record more", lambda m, d: shift_records(m, 2, 1), {2, 3, 4, 5}, {1, 2}),
    ("block holds a record less", lambda m, d: shift_records(m, 2, -1), {2, 3, 4, 5}, {1, 2}),
    ("block num_items +1", lambda m, d: add_items(m, 3, 1), {3}, {1}),
    ("block num_items -1", lambda m, d: add_items(m, 3, -1), {3}, {1}),
    *[(f"block samples.{s} {v:+d}", lambda m, d, s=s, v=v: add_samples(m, 2, s, v), {2}, {1})
      for s in SPLITS for v in (1, -1)],
    ("num_items below the largest item id", _lower_num_items, None, {0, 1, 2}),
    ("block sha256 of another build", lambda m, d: _set("shards.1.blocks.1.sha256", "0" * 64)(m), {3}, {1}),
    ("shard sha256 of another build", lambda m, d: _set("shards.1.sha256", "f" * 64)(m), set(), {1}),
    ("shard bytes of another build", lambda m, d: _bump("shards.1.bytes", 512)(m), set(), {1}),
    ("shard names swapped", lambda m, d: _swap_names(m), {0, 1, 2, 3}, {0, 1}),
    ("shard file missing", lambda m, d: os.remove(d.shard_path(1)), {2, 3}, {1}),
    ("shard file of another build", _other_build, {2, 3}, {1}),
]


@pytest.mark.parametrize("label,edit,damaged,shards_named", READ_CASES, ids=[c[0] for c in READ_CASES])
def test_stale_counts_fail_when_the_block_is_read(data, label, edit, damaged, shards_named):
    """Stale manifests that are consistent in themselves: the block read checks them. World
    size 1 raises on every split with a correct prefix; of 2 ranks at least one raises and
    each yields only true samples; nothing of a damaged block is yielded."""
    d = data
    m = copy.deepcopy(d.m)
    if damaged is None:
        top = max_item_per_block(d)
    edit(m, d)
    write_manifest(d, m)
    m2 = load_manifest(d.folder)  # consistent: loads
    if damaged is None:
        damaged = {i for i, (_, _, b) in enumerate(d.entries) if top[b["key"]] > m2["num_items"]}
        assert 0 < len(damaged) < len(d.entries)
    keys = {block_key(b) for b in damaged}
    urls = {d.shard_url(s) for s in shards_named}
    truth = {s: set(samples(d.ref[(s, 0, 1)])) for s in SPLITS}
    for split in SPLITS:
        got, err = read(d.folder, split)
        check_partial_read(d, got, err, split, 0, 1, keys, label)
        assert err.url in urls and err.url in str(err), f"{label}: {err}"
        if keys:
            assert err.key in keys and f"block {err.key}" in str(err), f"{label}: {err}"
        errs = []
        for r in range(2):
            got, err = read(d.folder, split, r, 2)
            s = samples(got)
            assert len(set(s)) == len(s) and set(s) <= truth[split], f"{label}: rank {r}/2 yielded false samples"
            assert not users(got) & d.block_records(keys), f"{label}: rank {r}/2 yielded a damaged block"
            if err is not None:
                assert err.url in urls and err.url in str(err), f"{label}: {err}"
                errs.append(err)
        assert errs, f"{label}: {split}: no rank of 2 noticed"


# --------------------------------------------------------------------------- 3. malformed manifests


#: (label, edit of the parsed manifest or raw text, field the error must name (None: only the URL))
MALFORMED = [
    ("shard name missing", _del("shards.0.name"), "shards[0].name"),
    ("num_records missing", _del("num_records"), "num_records"),
    ("block num_records missing", _del("shards.0.blocks.1.num_records"), "shards[0].blocks[1].num_records"),
    ("num_items missing", _del("num_items"), "num_items"),
    ("num_items 'abc'", _set("num_items", "abc"), "num_items"),
    ("num_items null", _set("num_items", None), "num_items"),
    ("num_items NaN", _set("num_items", float("nan")), "num_items"),  # json.dumps writes the raw text NaN
    ("num_items Infinity", _set("num_items", float("inf")), "num_items"),
    ("num_items 1.5", _set("num_items", 1.5), "num_items"),
    ("num_items true", _set("num_items", True), "num_items"),
    ("num_items -3", _set("num_items", -3), "num_items"),
    ("num_items a list", _set("num_items", [200]), "num_items"),
    ("shards an object", _set("shards", {"seq-00000.tar": {}}), "shards"),
    ("shards a string", _set("shards", "seq-00000.tar"), "shards"),
    ("shards null", _set("shards", None), "shards"),
    ("shards missing", _del("shards"), "shards"),
    ("shard entry a string", _set("shards.1", "seq-00001.tar"), "shards[1]"),
    ("shard name a number", _set("shards.0.name", 7), "shards[0].name"),
    ("shard name a list", _set("shards.1.name", ["seq-00001.tar"]), "shards[1].name"),
    ("shard name an object", _set("shards.1.name", {"a": 1}), "shards[1].name"),
    ("shard name ../x.tar", _set("shards.0.name", "../x.tar"), "shards[0].name"),
    ("shard name /abs.tar", _set("shards.0.name", "/abs.tar"), "shards[0].name"),
    ("shard name sub/dir.tar", _set("shards.0.name", "sub/dir.tar"), "shards[0].name"),
    ("shard name ..", _set("shards.0.name", ".."), "shards[0].name"),
    ("shard name empty", _set("shards.0.name", ""), "shards[0].name"),
    ("shard name a URL", _set("shards.0.name", "s3://b/x.tar"), "shards[0].name"),
    ("shard name backslash", _set("shards.0.name", "..\\x.tar"), "shards[0].name"),
    ("shard bytes a string", _set("shards.0.bytes", "10240"), "shards[0].bytes"),
    ("shard sha256 short", _set("shards.0.sha256", "abc"), "shards[0].sha256"),
    ("blocks an object", _set("shards.0.blocks", {}), "shards[0].blocks"),
    ("blocks empty", _set("shards.0.blocks", []), "shards[0].blocks"),
    ("block entry a number", _set("shards.0.blocks.0", 3), "shards[0].blocks[0]"),
    ("block samples a list", _set("shards.0.blocks.0.samples", [1, 2, 3]), "shards[0].blocks[0].samples"),
    ("block samples.train a string", _set("shards.0.blocks.0.samples.train", "37"),
     "shards[0].blocks[0].samples.train"),
    ("block interactions missing", _del("shards.0.blocks.0.interactions"), "shards[0].blocks[0].interactions"),
    ("block sha256 a number", _set("shards.0.blocks.0.sha256", 12), "shards[0].blocks[0].sha256"),
    ("block first_record NaN", _set("shards.0.blocks.0.first_record", float("nan")),
     "shards[0].blocks[0].first_record"),
    ("num_samples a list", _set("num_samples", [1, 2, 3]), "num_samples"),
    ("num_samples.valid missing", _del("num_samples.valid"), "num_samples.valid"),
    ("protocol unknown", _set("protocol", "random"), "protocol"),
    ("min_history_len 2", _set("min_history_len", 2), "min_history_len"),
    ("min_history_len NaN", _set("min_history_len", float("nan")), "min_history_len"),
    ("train_prefixes_per_user 0", _set("train_prefixes_per_user", 0), "train_prefixes_per_user"),
    ("block_members other", _set("block_members", ["items.npy"]), "block_members"),
    ("format missing", _del("format"), "format"),
    ("format v1", _set("format", "recsys-dist/seq-v1"), "format"),
    ("a JSON list", "[1, 2]", None),
    ("a JSON string", '"manifest"', None),
    ("a JSON number", "3", None),
    ("JSON null", "null", None),
    ("empty file", "", None),
    ("not JSON", "{'format': 1}", None),
    ("truncated JSON", "TRUNCATE", None),
    ("not UTF-8", b"\xff\xfe{}", None),
    ("deeply nested", "[" * 100000 + "]" * 100000, None),
    ("huge integer", '{"num_items": ' + "9" * 5000 + "}", None),
]


@pytest.mark.parametrize("label,edit,field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_clear_error(datasets, tmp_path, label, edit, field):
    path = str(tmp_path / "manifest.json")
    if isinstance(edit, (str, bytes)):
        if edit == "TRUNCATE":
            edit = open(os.path.join(datasets[False], "manifest.json")).read()[:-100]
        with open(path, "wb") as f:
            f.write(edit.encode() if isinstance(edit, str) else edit)
    else:
        m = load_manifest(datasets[False])
        edit(m)
        with open(path, "w") as f:
            json.dump(m, f)
    for call in (lambda: load_manifest(str(tmp_path)), lambda: load_manifest(path),
                 lambda: SequenceDataset(str(tmp_path), "valid", BATCH)):
        with pytest.raises(ShardError) as ei:
            call()
        msg = str(ei.value)
        assert path in msg and ei.value.url == path, msg
        assert len(msg) < 2000, f"{label}: message of {len(msg)} chars"
        if field is not None:
            assert field + ":" in msg or f"{field} " in msg, f"{label}: field {field} not named in: {msg}"


def test_missing_manifest(tmp_path):
    with pytest.raises(ShardError, match="not found") as ei:
        load_manifest(str(tmp_path / "nope"))
    assert str(tmp_path / "nope" / "manifest.json") in str(ei.value)
    os.makedirs(tmp_path / "dir" / "manifest.json")
    with pytest.raises(ShardError) as ei:
        load_manifest(str(tmp_path / "dir"))
    assert str(tmp_path / "dir" / "manifest.json") in str(ei.value)


# --------------------------------------------------------------------------- 4. bounded memory on hostile sizes

GiB, MiB = 1 << 30, 1 << 20


def tar_header(name: str, size: int, type_: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mtime = size, type_, 0
    return ti.tobuf(format=tarfile.GNU_FORMAT if size >= 8 ** 11 else tarfile.USTAR_FORMAT)


def gzip_of_zeros(prefix: bytes, zeros: int) -> bytes:
    """A gzip stream of ``prefix + bytes(zeros)`` in ~zeros/1000 bytes, made without
    compressing all the zeros: after a full flush a MiB of zeros compresses to the same
    bytes every time, so those are repeated. The CRC32 in the trailer is left 0 (computing
    it costs a pass over the GiB; only a reader that read it all would get there)."""
    assert zeros % MiB == 0 and zeros >= 2 * MiB
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    z = bytes(MiB)
    head = c.compress(prefix) + c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    rep = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(z) + c.flush(zlib.Z_FULL_FLUSH) == rep
    n = zeros // MiB
    body = head + rep * (n - 2) + c.compress(z) + c.flush()
    size = (len(prefix) + zeros) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\0\0\0\0\x02\xff" + body + bytes(4) + size.to_bytes(4, "little")


#: (label, tar bytes before the zeros, the member the error must name)
HOSTILE = [
    ("member declares 1 GiB", lambda: tar_header("block-000000.records.npy", GiB), "block-000000.records.npy"),
    ("member declares 16 GiB (GNU base-256 size)", lambda: tar_header("block-000000.records.npy", 16 * GiB),
     "block-000000.records.npy"),
    ("second member declares 1 GiB", None, "block-000000.offsets.npy"),
    ("pax header declares 1 GiB", lambda: tar_header("././@PaxHeader", GiB, tarfile.XHDTYPE), "././@PaxHeader"),
    ("global pax header declares 1 GiB", lambda: tar_header("pax_global_header", GiB, tarfile.XGLTYPE),
     "pax_global_header"),
    ("GNU long name declares 1 GiB", lambda: tar_header("././@LongLink", GiB, tarfile.GNUTYPE_LONGNAME),
     "././@LongLink"),
    ("pax size record of 1 GiB for the next member", None, "././@PaxHeader"),
]


def _hostile_prefix(d: Data, label: str, make: Any) -> bytes:
    if make is not None:
        return make()
    first = d.m["shards"][0]["blocks"][0]
    if label.startswith("second"):  # a true first member, then the hostile one
        with tarfile.open(os.path.join(d.folder, d.m["shards"][0]["name"])) as tf:
            ti = tf.getmember(f"{first['key']}.records.npy")
            data = tf.extractfile(ti).read()
        return tar_header(ti.name, len(data)) + data + bytes(-len(data) % 512) + \
            tar_header(f"{first['key']}.offsets.npy", GiB)
    rec = f"size={GiB}\n"
    rec = f"{len(rec) + len(str(len(rec) + 3)) + 1} {rec}".encode()
    assert int(rec.split()[0]) == len(rec)
    return tar_header("././@PaxHeader", len(rec), tarfile.XHDTYPE) + rec + bytes(-len(rec) % 512) + \
        tar_header(f"{first['key']}.records.npy", 100)


@pytest.mark.parametrize("label,make,member", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_sizes_are_refused_before_reading(data, label, make, member):
    """A shard whose tar header declares a huge size (a 1 MiB gzip that really holds 1 GiB)
    is refused before the data is read: < 50 MiB allocated, the error names the member."""
    d = data
    prefix = _hostile_prefix(d, label, make)
    path, url = d.shard_path(0), d.shard_url(0)
    with open(path, "wb") as f:
        f.write(gzip_of_zeros(prefix, GiB) if d.gz else prefix + bytes(MiB))
    assert os.path.getsize(path) < 2 * MiB
    if d.gz:
        with open(path, "rb") as f:
            assert zlib.decompressobj(31).decompress(f.read(1 << 16), len(prefix) + 512)[:len(prefix)] == prefix
    for reader in (lambda: list(read_shard(d.m, d.folder, 0, {0, 1})), lambda: read(d.folder, "valid", manifest=d.m)):
        t0 = time.time()
        tracemalloc.start()
        try:
            try:
                out = reader()
            except ShardError as e:
                err = e
            else:
                err = out[1] if isinstance(out, tuple) else None
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err is not None, f"{label}: no error"
        msg = str(err)
        assert url in msg and member in msg, f"{label}: {msg}"
        assert peak < 50 * MiB, f"{label}: {peak / MiB:.0f} MiB allocated"
        assert time.time() - t0 < 10


# --------------------------------------------------------------------------- 5. large manifests stay fast


def big_manifest(num_blocks: int, per_shard: int = 50) -> dict:
    """A consistent manifest of ``num_blocks`` blocks of 10 records (no files behind it)."""
    sha = "ab" * 32
    shards, r = [], 0
    for s in range(num_blocks // per_shard):
        blocks = []
        for j in range(per_shard):
            b = s * per_shard + j
            blocks.append({"key": block_key(b), "first_record": r, "num_records": 10, "num_items": 60,
                           "interactions": {"train": 40, "valid": 10, "test": 10},
                           "samples": {"train": 30, "valid": 10, "test": 10}, "sha256": sha})
            r += 10
        shards.append({"name": f"seq-{s:05d}.tar", "bytes": 10240 * per_shard, "sha256": sha, "blocks": blocks})
    nb = num_blocks // per_shard * per_shard
    return {"format": "recsys-dist/seq-v2", "dataset": "big", "protocol": "leave_one_out", "num_records": r,
            "num_users": r, "num_items": 1000, "pad_id": 0, "min_history_len": 1, "train_prefixes_per_user": None,
            "max_record_len": 6, "num_interactions": {"train": 40 * nb, "valid": 10 * nb, "test": 10 * nb},
            "num_samples": {"train": 30 * nb, "valid": 10 * nb, "test": 10 * nb}, "records_per_block": 10,
            "block_members": ["records.npy", "offsets.npy", "items.npy", "bounds.npy"], "shards": shards}


BIG = 100_000


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Tuple[str, str]:
    """(folder, JSON text) of a manifest of 10^5 block entries."""
    d = tmp_path_factory.mktemp("big")
    raw = json.dumps(big_manifest(BIG))
    (d / "manifest.json").write_text(raw)
    return str(d), raw


def test_large_manifest_loads_and_plans_in_seconds(big):
    """10^5 block entries (5 * 10^8 interactions at 5000 per block): load + validate, and a
    reader's plan for every split on rank 3 of 8."""
    d, _ = big
    t0 = time.time()
    m = load_manifest(d)
    t_load = time.time() - t0
    for split in SPLITS:
        ds = SequenceDataset(d, split, 256, 3, 8, manifest=m)
        assert len(ds) == -(-(m["num_samples"][split] // 8) // 256)
    t_all = time.time() - t0
    assert t_load < 10 and t_all < 15, (t_load, t_all)


def _huge_values(raw: str) -> str:
    m = json.loads(raw)
    m["num_items"] = list(range(10 ** 5))
    m["protocol"] = "x" * 10 ** 6
    m["shards"][0]["name"] = {str(i): "y" * 1000 for i in range(1000)}
    m["shards"][1]["blocks"][0]["key"] = ["k" * 1000] * 1000
    m["min_history_len"] = 10 ** 3000
    return json.dumps(m)


#: (label, manifest, JSON text edit, fewest problems the message must count)
MANY_BAD = [
    ("every block sha256", "big", lambda raw: raw.replace('"sha256": "' + "ab" * 32, '"sha256": "nope'), BIG),
    ("every num_records a string", "big",
     lambda raw: re.sub(r'"num_records": (\d+)', r'"num_records": "\1"', raw), BIG),
    ("every shard name", "one block per shard",
     lambda raw: raw.replace('"name": "seq-', '"name": "' + "../" * 100 + 'seq-'), 10 ** 4),
    ("huge values", "real", _huge_values, 5),
]


@pytest.mark.parametrize("label,base,edit,count", MANY_BAD, ids=[c[0] for c in MANY_BAD])
def test_errors_of_many_bad_entries_are_short(big, datasets, tmp_path, label, base, edit, count):
    raw = big[1] if base == "big" else json.dumps(big_manifest(10 ** 4, per_shard=1)) if base.startswith("one") \
        else open(os.path.join(datasets[False], "manifest.json")).read()
    path = tmp_path / "manifest.json"
    path.write_text(edit(raw))
    t0 = time.time()
    with pytest.raises(ShardError) as ei:
        load_manifest(str(tmp_path))
    msg = str(ei.value)
    assert time.time() - t0 < 10
    assert str(path) in msg and len(msg) < 2000, (len(msg), msg[:3000])
    if count > 5:
        shown = msg.count("; ") + 1
        more = int(re.search(r"\(and (\d+) more\)$", msg).group(1))
        assert shown + more >= count, msg




# --------------------------------------------------------------------------- 7. DataLoader workers


def _flip_data_byte(path: str, member: str, gz: bool) -> None:
    """Flip one byte inside ``member``'s array data (past the .npy header), in place."""
    raw = open(path, "rb").read()
    plain = gzip.decompress(raw) if gz else raw
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        ti = tf.getmember(member)
    b = bytearray(plain)
    b[ti.offset_data + ti.size - 3] ^= 0x10
    out = bytes(b)
    if gz:
        out = gzip.compress(out, mtime=0)
    with open(path, "wb") as f:
        f.write(out)


def loader_read(ds: SequenceDataset, workers: int = 2) -> Tuple[List[dict], Optional[ShardError]]:
    """(batches, the ShardError raised in the main process or None), through a DataLoader,
    under a deadline (a hang fails the test). The error comes back without its traceback, so
    nothing keeps the loader's iterator (and its worker processes) alive after the call."""
    got: List[dict] = []
    with deadline(120):
        it = iter(DataLoader(ds, batch_size=None, num_workers=workers))
        try:
            for b in it:
                got.append(b)
        except ShardError as e:
            return got, e.with_traceback(None)
        finally:
            del it
    return got, None


@pytest.mark.parametrize("split,rank,ws", [("train", 0, 1), ("valid", 1, 2)])
def test_worker_failure_is_raised_in_the_main_process(data, split, rank, ws):
    """Every worker reads the rank's whole stream: all of them fail on the damaged shard, and
    the DataLoader re-raises the first failure as ShardError with the URL and block."""
    d = data
    _flip_data_byte(d.shard_path(2), "block-000005.items.npy", d.gz)
    ds = SequenceDataset(d.folder, split, BATCH, rank, ws, max_len=MAX_LEN, shuffle=split == "train", seed=3)
    got, err = loader_read(ds)
    assert err is not None and d.shard_url(2) in str(err) and "block-000005" in str(err), err
    assert not users(got) & d.block_records({"block-000005"})
    assert same_batches(got, d.ref[(split, rank, ws)][:len(got)])


def test_only_the_worker_reading_the_damage_fails(data):
    """Resumed at the last batch: worker 0 reads the damaged last block and fails, worker 1
    has nothing to do and ends at once. The main process still gets the error (no hang)."""
    d = data
    ref = d.ref[("valid", 0, 1)]
    _flip_data_byte(d.shard_path(2), "block-000005.items.npy", d.gz)
    ds = SequenceDataset(d.folder, "valid", BATCH, max_len=MAX_LEN, manifest=d.m)
    assert len(ds) == len(ref) and d.block_records({"block-000005"}) & users(ref[-1:])
    ds.set_position(0, len(ref) - 1)
    got, err = loader_read(ds)
    assert err is not None and d.shard_url(2) in str(err) and "worker process 0" in str(err), err
    assert got == []
    ds.set_position(0, len(ref) - 2)  # worker 0: batch n-2, worker 1: batch n-1 (damaged block)
    got, err = loader_read(ds)
    assert err is not None and d.shard_url(2) in str(err), err
    assert not users(got) & d.block_records({"block-000005"})
    assert same_batches(got, ref[len(ref) - 2:][:len(got)])


# --------------------------------------------------------------------------- 6. S3 objects corrupted in place


@pytest.fixture(scope="module")
def s3_sets(s3_server):
    pytest.importorskip("s3fs")
    out = {}
    for gz in (False, True):
        url = f"s3://{s3_server.bucket}/integrity-{'gz' if gz else 'tar'}"
        synth_shards(url, compress=gz, **SYNTH)
        out[gz] = url
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_s3_object_overwritten_in_place_with_same_size(s3_sets, s3_server, gz):
    """A shard object on a real S3-protocol server (moto's, ``s3_server`` in conftest.py)
    overwritten with as many other bytes: in a block's data, and in bytes no tar / gzip
    decoder looks at (only the shard checksum can tell)."""
    import boto3

    url = s3_sets[gz]
    m = load_manifest(url)
    ref = {s: read(url, s, manifest=m)[0] for s in ("valid", "test")}
    name = m["shards"][DAMAGED]["name"]
    s3, key = boto3.client("s3"), url.split("/", 3)[3] + "/" + name
    raw = s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    plain = gzip.decompress(raw) if gz else raw
    spans, _ = tar_layout(plain)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        items, bounds = tf.getmember("block-000003.items.npy"), tf.getmember("block-000003.bounds.npy")
    if gz:
        edits = [("middle of the deflate stream", len(raw) // 2), ("gzip header mtime", 5)]
    else:
        edits = [("block data", items.offset_data + items.size - 5),
                 ("header byte after the checksum's NUL", bounds.offset + 155)]
    try:
        for label, pos in edits:
            b = bytearray(raw)
            b[pos] ^= 0x20
            bad = bytes(b)
            s3.put_object(Bucket=s3_server.bucket, Key=key, Body=bad)
            q = first_difference(gunzip_lenient(bad) if gz else bad, plain)
            damaged = {k for k, (_, e) in spans.items() if q >= 0 and e > q}
            for split in ("valid", "test"):
                got, err = read(url, split, manifest=m)
                assert err is not None, f"{label}: corrupted S3 object read without error"
                assert err.url == shard_url(url, name) and err.url in str(err), str(err)
                if label == "block data":
                    assert err.key == "block-000003" and "block-000003" in str(err), str(err)
                assert same_batches(got, ref[split][:len(got)]), label
                assert not users(got) & block_records(m, damaged), label
    finally:
        s3.put_object(Bucket=s3_server.bucket, Key=key, Body=raw)
    assert same_batches(read(url, "valid", manifest=m)[0], ref["valid"])
