"""The ``recsys-dist/seq-v2`` shard format: per-record sequences packed in checksummed blocks.

A shard is an ordinary (WebDataset-style) tar, ``seq-00000.tar`` (``.tar.gz`` when
compressed), of *blocks*; a block is one tar sample (member group) holding
``records_per_block`` consecutive records (:mod:`shards.records`) as ``.npy`` arrays
(little-endian, no pickles):

=======================  ===============================================================
tar member               content
=======================  ===============================================================
``<key>.records.npy``    int64 (U,): record ids ``first_record .. first_record + U - 1``
``<key>.offsets.npy``    int64 (U + 1,): 0 .. len(items); record i is ``items[off[i]:off[i+1]]``
``<key>.items.npy``      int32 (n,): item ids 1..num_items, oldest first within a record
``<key>.bounds.npy``     int64 (U, 2): (train_end, valid_end) per record (segments)
=======================  ===============================================================

``key = f"block-{b:06d}"`` for the b-th block of the dataset. The block checksum
(manifest ``blocks[].sha256``) is :func:`block_sha256` over the members' names and bytes;
the reader verifies it, and every count and id range, *before* it yields any sample of the
block (:func:`decode_block`). Samples are made from records at read time
(:mod:`shards.samples`), so the shards do not depend on ``max_len``.

``manifest.json`` (written last, atomically, by :mod:`shards.build`) is checked against
:func:`check_manifest` on load: a typed schema, sums that add up (blocks -> totals),
contiguous record ranges, plain unique shard names inside the manifest's folder. Every
error is a :class:`ShardError` naming the manifest or shard URL, the block and the field.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .records import PROTOCOLS, SEGMENTS

FORMAT = "recsys-dist/seq-v2"
MANIFEST_NAME = "manifest.json"
ITEM_COUNTS_NAME = "item_counts.npy"  # occurrences of each item in the train segments
TARGET_COUNTS_NAME = "target_counts.npy"  # how often each item is a train target (in-batch negatives)
ID_MAP_NAME = "id_map.json"
PAD_ID = 0
BLOCK_MEMBERS: Tuple[str, ...] = ("records.npy", "offsets.npy", "items.npy", "bounds.npy")
_DTYPES = {"records.npy": np.dtype("<i8"), "offsets.npy": np.dtype("<i8"), "items.npy": np.dtype("<i4"),
           "bounds.npy": np.dtype("<i8")}
NPY_HEADER_MAX = 4096  # bytes an .npy header may take beyond its data (np.save writes 128)
SPLIT_ALIASES = {"val": "valid"}  # v1's split name
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt, stale or malformed.

    The message names the URL and, where it applies, the block key and member; ``url``,
    ``key`` and ``member`` are attributes too (``None`` when not known)."""

    def __init__(self, message: str, url: Optional[str] = None, key: Optional[str] = None,
                 member: Optional[str] = None) -> None:
        super().__init__(message)
        self.url, self.key, self.member = url, key, member


def block_key(b: int) -> str:
    return f"block-{b:06d}"


def shard_name(i: int, compress: bool = False) -> str:
    return f"seq-{i:05d}.tar" + (".gz" if compress else "")


def segment(split: str) -> str:
    """``"val"`` -> ``"valid"``; other names unchanged (checked)."""
    s = SPLIT_ALIASES.get(split, split)
    if s not in SEGMENTS:
        raise ValueError(f"unknown split {split!r}; known: {list(SEGMENTS)} (or 'val')")
    return s


def block_sha256(members: Mapping[str, bytes]) -> str:
    """sha256 over ``name + b"\\0" + len (8 bytes LE) + bytes`` of each member, sorted by name."""
    h = hashlib.sha256()
    for m in sorted(members):
        b = bytes(members[m])
        h.update(m.encode("ascii") + b"\0" + len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- samples per record


def sample_counts(lengths: np.ndarray, bounds: np.ndarray, min_history_len: int,
                  prefixes: Optional[int]) -> Dict[str, np.ndarray]:
    """int64 (R,) samples each record yields per split (see :mod:`shards.samples`):

    train: target positions ``j`` in ``[min_history_len, train_end)``, the last ``prefixes``
    of them when set; valid / test: positions in the segment with ``j >= min_history_len``.
    """
    t, v = bounds[:, 0], bounds[:, 1]
    m = int(min_history_len)
    train = np.maximum(0, t - m)
    if prefixes is not None:
        train = np.minimum(train, int(prefixes))
    return {"train": train, "valid": np.maximum(0, v - np.maximum(t, m)),
            "test": np.maximum(0, lengths - np.maximum(v, m))}


# --------------------------------------------------------------------------- blocks


@dataclass
class Block:
    """One verified block: CSR records (see the module table)."""

    key: str
    records: np.ndarray  # int64 (U,)
    offsets: np.ndarray  # int64 (U + 1,)
    items: np.ndarray  # int32 (n,)
    bounds: np.ndarray  # int64 (U, 2)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def member_size_limit(member: str, rec: Mapping[str, Any]) -> int:
    """Largest tar member size the manifest's block entry allows (refused before reading)."""
    u, n = int(rec["num_records"]), int(rec["num_items"])
    data = {"records.npy": 8 * u, "offsets.npy": 8 * (u + 1), "items.npy": 4 * n, "bounds.npy": 16 * u}
    return data.get(member, 0) + NPY_HEADER_MAX


def decode_block(members: Mapping[str, bytes], rec: Mapping[str, Any], manifest: Mapping[str, Any],
                 where: str) -> Block:
    """Verify one block against its manifest entry ``rec`` and return its arrays.

    Checks, in order: the member names, the checksum, each array's dtype and shape, record
    ids ``first_record ..``, monotone offsets, the interaction count, item ids in
    ``1..num_items``, segment bounds inside each record, and the per-split sample counts
    recomputed from the bounds. ``where`` (``"<shard url> [block <key>]"``) starts every
    error message. Raises :class:`ShardError`.
    """
    key = str(rec["key"])

    def err(msg: str, member: Optional[str] = None) -> ShardError:
        return ShardError(f"{where}: {msg}", url=where.split(" [", 1)[0], key=key, member=member)

    names = manifest["block_members"]
    missing, extra = sorted(set(names) - set(members)), sorted(set(members) - set(names))
    if missing or extra:
        raise err(f"block members missing {missing} / unexpected {extra} (truncated or foreign shard)")
    got = block_sha256(members)
    if got != rec["sha256"]:
        raise err(f"checksum mismatch: members' sha256 {got[:16]}..., manifest {str(rec['sha256'])[:16]}... "
                  "(corrupt block, or the manifest is stale)")
    a: Dict[str, np.ndarray] = {}
    for m in BLOCK_MEMBERS:
        try:
            x = np.load(io.BytesIO(members[m]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise err(f"member {key}.{m} is not a valid .npy: {e}", m) from e
        want = _DTYPES[m]
        ndim = 2 if m == "bounds.npy" else 1
        if x.dtype != want or x.ndim != ndim or (ndim == 2 and x.shape[1] != 2):
            raise err(f"member {key}.{m} is {x.dtype} {x.shape}, expected {ndim}-D {want}", m)
        a[m] = x.astype(want.newbyteorder("="), copy=False)
    u, off, items, bounds = a["records.npy"], a["offsets.npy"], a["items.npy"], a["bounds.npy"]
    n_rec, first = int(rec["num_records"]), int(rec["first_record"])
    if u.size != n_rec or not np.array_equal(u, np.arange(first, first + n_rec)):
        raise err(f"holds records that are not {first}..{first + n_rec - 1} (stale manifest or foreign block)",
                  "records.npy")
    if off.size != u.size + 1 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != items.size:
        raise err(f"offsets are not monotone from 0 to len(items)={items.size} with {u.size + 1} entries",
                  "offsets.npy")
    if items.size != int(rec["num_items"]):
        raise err(f"holds {items.size} interactions, the manifest says {rec['num_items']} (stale manifest)",
                  "items.npy")
    ni = int(manifest["num_items"])
    if items.size and (int(items.min()) < 1 or int(items.max()) > ni):
        bad = int(items[(items < 1) | (items > ni)][0])
        raise err(f"item id {bad} outside 1..{ni}", "items.npy")
    lens = np.diff(off)
    if bounds.shape[0] != u.size or np.any(bounds[:, 0] < 0) or np.any(bounds[:, 1] < bounds[:, 0]) \
            or np.any(bounds[:, 1] > lens):
        raise err("segment bounds outside their records (0 <= train_end <= valid_end <= length)", "bounds.npy")
    counts = sample_counts(lens, bounds, int(manifest["min_history_len"]), manifest["train_prefixes_per_user"])
    for s in SEGMENTS:
        if int(counts[s].sum()) != int(rec["samples"][s]):
            raise err(f"yields {int(counts[s].sum())} {s} samples, the manifest says {rec['samples'][s]} "
                      "(stale manifest)", "bounds.npy")
    return Block(key, u, off, items, bounds)


# --------------------------------------------------------------------------- manifest


def _is_int(x: Any) -> bool:
    return type(x) is int or (isinstance(x, int) and not isinstance(x, bool))  # fast path first


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short(x: Any, n: int = 100) -> str:
    """``repr(x)``, bounded (:mod:`reprlib`, then ``n`` characters): a hostile value cannot
    blow up an error message."""
    r = _REPR.repr(x)
    return r if len(r) <= n else r[:n - 3] + "..."


class _Checker:
    """Collects schema problems as ``field: what`` (first few kept, all counted)."""

    def __init__(self, url: str, keep: int = 5) -> None:
        self.url, self.keep, self.problems, self.count = url, keep, [], 0

    def add(self, field: str, what: str) -> None:
        self.count += 1
        if len(self.problems) < self.keep:
            self.problems.append(f"{field}: {what}")

    def int_(self, d: Mapping[str, Any], k: str, field: str, lo: int = 0) -> int:
        v = d.get(k) if isinstance(d, dict) else None  # (a typing.Mapping check costs 5 us a call)
        if not _is_int(v) or v < lo:
            if len(self.problems) < self.keep:
                self.add(f"{field}.{k}" if field else k, f"expected an integer >= {lo}, got {_short(v)}")
            else:
                self.count += 1  # counted, not described
            return 0
        return v

    def raise_if_any(self) -> None:
        if self.count:
            more = f" (and {self.count - len(self.problems)} more)" if self.count > len(self.problems) else ""
            raise ShardError(f"{self.url}: malformed manifest: {'; '.join(self.problems)}{more}", url=self.url)


def check_manifest(m: Any, url: str) -> Dict[str, Any]:
    """Validate a parsed manifest (schema, sums, names); returns it. Cost O(blocks)."""
    c = _Checker(url)
    if not isinstance(m, dict):
        raise ShardError(f"{url}: manifest is {type(m).__name__}, expected a JSON object", url=url)
    if m.get("format") != FORMAT:
        raise ShardError(f"{url}: manifest format is {_short(m.get('format'))}, this reader supports {FORMAT!r} "
                         "(rebuild the shards: python -m launcher prepare)", url=url)
    if m.get("protocol") not in PROTOCOLS:
        c.add("protocol", f"expected one of {list(PROTOCOLS)}, got {_short(m.get('protocol'))}")
    num_records = c.int_(m, "num_records", "")
    c.int_(m, "num_items", "", 1)
    if m.get("min_history_len") not in (0, 1) or isinstance(m.get("min_history_len"), bool):
        c.add("min_history_len", f"expected 0 or 1, got {_short(m.get('min_history_len'))}")
    k = m.get("train_prefixes_per_user")
    if k is not None and (not _is_int(k) or k < 1):
        c.add("train_prefixes_per_user", f"expected null or an integer >= 1, got {_short(k)}")
    if m.get("block_members") != list(BLOCK_MEMBERS):
        c.add("block_members", f"expected {list(BLOCK_MEMBERS)}, got {_short(m.get('block_members'))}")
    totals: Dict[str, Dict[str, int]] = {}
    for t in ("num_interactions", "num_samples"):
        d = m.get(t)
        if not isinstance(d, dict):
            c.add(t, f"expected an object with keys {list(SEGMENTS)}, got {type(d).__name__}")
            d = {}
        totals[t] = {s: c.int_(d, s, t) for s in SEGMENTS}
    shards = m.get("shards")
    if not isinstance(shards, list):
        c.add("shards", f"expected a list, got {type(shards).__name__}")
        shards = []
    names = set()
    next_record, sums = 0, {"num_interactions": dict.fromkeys(SEGMENTS, 0), "num_samples": dict.fromkeys(SEGMENTS, 0)}
    bi = 0
    for i, sh in enumerate(shards):
        f = f"shards[{i}]"
        if not isinstance(sh, dict):
            c.add(f, f"expected an object, got {type(sh).__name__}")
            continue
        name = sh.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
            c.add(f"{f}.name", f"expected a plain file name inside the manifest's folder, got {_short(name)}")
        elif name in names:
            c.add(f"{f}.name", f"{_short(name)} is listed twice")
        else:
            names.add(name)
        c.int_(sh, "bytes", f)
        if not isinstance(sh.get("sha256"), str) or not _SHA_RE.match(sh.get("sha256", "")):
            c.add(f"{f}.sha256", "expected 64 hex digits")
        blocks = sh.get("blocks")
        if not isinstance(blocks, list) or not blocks:
            c.add(f"{f}.blocks", "expected a non-empty list")
            continue
        for j, b in enumerate(blocks):
            fb = f"{f}.blocks[{j}]"
            if not isinstance(b, dict):
                c.add(fb, "expected an object")
                continue
            if b.get("key") != block_key(bi):
                c.add(f"{fb}.key", f"expected {block_key(bi)!r} (blocks numbered in order), got {_short(b.get('key'))}")
            bi += 1
            first = c.int_(b, "first_record", fb)
            nr = c.int_(b, "num_records", fb, 1)
            if first != next_record:
                c.add(f"{fb}.first_record", f"expected {next_record} (contiguous record ranges), got {first}")
            next_record = first + nr
            ni = c.int_(b, "num_items", fb)
            if not isinstance(b.get("sha256"), str) or not _SHA_RE.match(b.get("sha256", "")):
                c.add(f"{fb}.sha256", "expected 64 hex digits")
            smp = b.get("samples")
            if not isinstance(smp, dict):
                c.add(f"{fb}.samples", "expected an object")
                smp = {}
            for s in SEGMENTS:
                sums["num_samples"][s] += c.int_(smp, s, f"{fb}.samples")
            itr = b.get("interactions")
            if not isinstance(itr, dict):
                c.add(f"{fb}.interactions", "expected an object")
                itr = {}
            seg = {s: c.int_(itr, s, f"{fb}.interactions") for s in SEGMENTS}
            if sum(seg.values()) != ni:
                c.add(f"{fb}.interactions", f"segments sum to {sum(seg.values())}, num_items says {ni}")
            for s in SEGMENTS:
                sums["num_interactions"][s] += seg[s]
    if c.count == 0:
        if next_record != num_records:
            c.add("num_records", f"blocks hold records 0..{next_record - 1}, the manifest says {num_records}")
        for t in sums:
            if sums[t] != totals[t]:
                c.add(t, f"blocks sum to {sums[t]}, the manifest says {totals[t]}")
    c.raise_if_any()
    m.setdefault("num_users", m["num_records"])
    return m


def resolve_manifest_url(url_or_dir: str) -> Tuple[str, str]:
    """``(manifest_url, base_url)`` for a manifest file URL or its directory."""
    u = str(url_or_dir)
    if u.endswith(".json"):
        return u, (u.rsplit("/", 1)[0] if "/" in u else ".")
    base = u.rstrip("/") or "/"
    return shard_url(base, MANIFEST_NAME), base


def shard_url(base_url: str, name: str) -> str:
    """URL of ``name`` beside the manifest at ``base_url``."""
    return base_url.rstrip("/") + "/" + name


def parse_manifest(raw: bytes, url: str) -> Dict[str, Any]:
    try:
        m = json.loads(raw.decode("utf-8"), parse_constant=lambda c: math.nan)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise ShardError(f"{url}: manifest is not valid JSON: {type(e).__name__}: {str(e)[:200]}",
                         url=url) from e
    return check_manifest(m, url)


def load_manifest(url_or_dir: str) -> Dict[str, Any]:
    """Read and validate ``manifest.json`` (file URL or its directory). Raises :class:`ShardError`."""
    from .storage import open_retrying

    murl, _ = resolve_manifest_url(url_or_dir)
    try:
        with open_retrying(murl) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ShardError(f"{murl}: manifest not found (build it: python -m launcher prepare)", url=murl) from None
    except OSError as e:
        raise ShardError(f"{murl}: cannot read manifest: {e}", url=murl) from e
    return parse_manifest(raw, murl)


def block_entries(manifest: Mapping[str, Any]) -> List[Tuple[int, int, Dict[str, Any]]]:
    """``(shard index, position in shard, block entry)`` of every block, in dataset order."""
    return [(s, i, b) for s, sh in enumerate(manifest["shards"]) for i, b in enumerate(sh["blocks"])]


def short_list(xs: Sequence[Any], n: int = 5) -> str:
    """``a, b, c (and 7 more)``: bounded error messages."""
    head = ", ".join(str(x) for x in xs[:n])
    return head + (f" (and {len(xs) - n} more)" if len(xs) > n else "")
