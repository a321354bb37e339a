"""Per-user interaction sets: the ``recsys-dist/sets-v1`` shard format (DiffRec's ML-1M data).

A record is one user's three item sets (``train`` in file order, which T-DiffRec's
temporal weights need; ``valid``; ``test``). Records are packed in *blocks* of
``users_per_block`` consecutive users; a block is one WebDataset sample (member group)
of an ordinary tar, ``blocks_per_shard`` blocks per shard ``sets-00000.tar``, ...:

=============================  =====================================================
tar member                     content (``.npy``, little-endian, no pickles)
=============================  =====================================================
``<key>.users.npy``            int64 (U,): user ids, strictly increasing, in 0..num_users-1
``<key>.<s>_offsets.npy``      int64 (U+1,): 0, ..., len(items); user i's items are
                               ``items[off[i]:off[i+1]]``, for s in train, valid, test
``<key>.<s>_items.npy``        int32: item ids 1..num_items (raw DiffRec id + 1; 0 = pad)
=============================  =====================================================

``key = f"block-{b:06d}"``. Block ``b`` holds users ``b*U .. min((b+1)*U, num_users)-1``.
The block checksum (manifest ``blocks[].sha256``) is :func:`block_sha256`: sha256 over,
for each member in :data:`BLOCK_MEMBERS` order, ``name + b"\\0" + len (8 bytes LE) + bytes``.

``manifest.json`` (written last, atomically; see :func:`build_sets_shards`)::

    {"format": "recsys-dist/sets-v1", "dataset": "ml-1m_clean", "num_users", "num_items",
     "pad_id": 0, "splits": ["train", "valid", "test"], "num_interactions": {split: n},
     "num_blocks", "users_per_block", "block_members": [...],
     "id_map": {"user": "raw", "item": "raw + 1", "item_id_offset": 1},
     "item_emb": {"file": "item_emb.npy", "shape", "dtype", "bytes", "sha256", "row": "item id - 1"},
     "shards": [{"name", "bytes", "sha256", "num_users", "num_interactions",
                 "blocks": [{"key", "first_user", "last_user", "num_users",
                             "num_interactions": {split: n}, "sha256"}]}],
     "build": {every build parameter + size/sha256 of every source file}}

:class:`SetReader` verifies every block (checksum, counts against the manifest, offsets,
id ranges, duplicate users) before yielding any user of it, and every shard's size and
sha256 once it has been read to its end; each error is a :class:`~shards.schema.ShardError`
naming the shard URL and block key.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import posixpath
import tarfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import TarWriter

from .reader import reader_shard_plan, resolve_manifest_url, shard_order, shard_url
from .schema import MANIFEST_NAME, PAD_ID, ShardError
from .sources import default_data_dir
from .storage import open_retrying

SETS_FORMAT = "recsys-dist/sets-v1"
SET_SPLITS: Tuple[str, ...] = ("train", "valid", "test")
BLOCK_MEMBERS: Tuple[str, ...] = ("users.npy",) + tuple(
    f"{s}_{p}.npy" for s in SET_SPLITS for p in ("offsets", "items"))
SETS_VARIANTS = {"ml-1m_clean": "ml-1m/raw/diffrec/ml-1m_clean", "ml-1m_noisy": "ml-1m/raw/diffrec/ml-1m_noisy"}
SOURCE_FILES = ("train_list.npy", "valid_list.npy", "test_list.npy", "item_emb.npy")
ITEM_EMB_NAME = "item_emb.npy"
BUILDER_VERSION = 1
_DTYPES = {"users": np.dtype("<i8"), "offsets": np.dtype("<i8"), "items": np.dtype("<i4")}


def block_key(b: int) -> str:
    return f"block-{b:06d}"


def sets_shard_name(i: int) -> str:
    return f"sets-{i:05d}.tar"


def block_sha256(members: Mapping[str, bytes]) -> str:
    """The block checksum the manifest records (see the module docstring)."""
    h = hashlib.sha256()
    for m in BLOCK_MEMBERS:
        b = bytes(members[m])
        h.update(m.encode("ascii") + b"\0" + len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class _Hashing:
    """File wrapper (write-through or read-through) counting bytes and their sha256."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.bytes += len(b)
        return b

    def flush(self) -> None:
        self.f.flush()


def _put_atomic(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path + ".tmp", "wb") as f:
        f.write(data)
    _mv(fs, path + ".tmp", path)


def _mv(fs: Any, src: str, dst: str) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)  # atomic
    else:
        fs.mv(src, dst)


# --------------------------------------------------------------------------- build


def _source_dir(variant: str, data_dir: Optional[str]) -> Tuple[str, str]:
    name = variant if variant.startswith("ml-1m_") else f"ml-1m_{variant}"
    if name not in SETS_VARIANTS:
        raise ValueError(f"unknown DiffRec variant {variant!r}; known: {sorted(SETS_VARIANTS)}")
    if data_dir is not None and os.path.exists(os.path.join(data_dir, "train_list.npy")):
        return name, data_dir  # the variant's own folder
    return name, os.path.join(data_dir or default_data_dir(), SETS_VARIANTS[name])


def _pairs(raw: bytes, what: str) -> np.ndarray:
    a = np.load(io.BytesIO(raw), allow_pickle=False)
    if a.ndim != 2 or a.shape[1] != 2 or a.dtype.kind not in "iu" or (a.size and int(a.min()) < 0):
        raise ValueError(f"{what}: expected non-negative int (n, 2) [user, item] pairs, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _complete(fs: Any, root: str, m: Dict[str, Any]) -> bool:
    try:
        files = [(sh["name"], sh["bytes"]) for sh in m["shards"]] + [(m["item_emb"]["file"], m["item_emb"]["bytes"])]
        return all(fs.size(posixpath.join(root, n)) == b for n, b in files)
    except (FileNotFoundError, KeyError, TypeError):
        return False


def build_sets_shards(variant: str, out: str, data_dir: Optional[str] = None, users_per_block: int = 2000,
                      blocks_per_shard: int = 1, force: bool = False) -> Dict[str, Any]:
    """Build ``sets-v1`` shards of DiffRec's ML-1M ``variant`` (``"clean"``/``"noisy"`` or
    ``"ml-1m_clean"``/``"ml-1m_noisy"``) at ``out`` (any fsspec URL); returns the manifest.

    ``data_dir``: the datasets root (default :func:`shards.sources.default_data_dir`), or the
    variant's own folder (the one holding ``train_list.npy``). Users are the raw ids
    (0..max+1), items raw + 1; ``item_emb.npy`` is copied unchanged (row r = item r + 1).
    Idempotent: if ``out`` has a manifest with the same ``build`` (parameters and source
    files' sha256) and its files have the recorded sizes, nothing is written.
    """
    if users_per_block < 1 or blocks_per_shard < 1:
        raise ValueError("users_per_block and blocks_per_shard must be >= 1")
    name, src = _source_dir(variant, data_dir)
    raw: Dict[str, bytes] = {}
    for f in SOURCE_FILES:
        with fsspec.open(os.path.join(src, f), "rb") as fh:
            raw[f] = fh.read()
    build = {"builder_version": BUILDER_VERSION, "format": SETS_FORMAT, "dataset": name,
             "users_per_block": int(users_per_block), "blocks_per_shard": int(blocks_per_shard),
             "source": {f: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for f, b in raw.items()}}
    fs, root = fsspec.core.url_to_fs(str(out))
    mpath = posixpath.join(root, MANIFEST_NAME)
    existing = None
    if fs.exists(mpath):
        try:
            with fs.open(mpath, "rb") as fh:
                existing = json.loads(fh.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            existing = {}
    if not force and existing and existing.get("build") == build and _complete(fs, root, existing):
        return existing
    if existing and existing.get("format") != SETS_FORMAT and not force:
        raise ValueError(f"{out} holds a {existing.get('format')!r} manifest; refusing to overwrite it (force=True)")

    pairs = {s: _pairs(raw[f"{s}_list.npy"], f"{src}/{s}_list.npy") for s in SET_SPLITS}
    num_users = max(int(p[:, 0].max()) + 1 for p in pairs.values() if p.size)
    num_items = max(int(p[:, 1].max()) + 1 for p in pairs.values() if p.size)
    emb = np.load(io.BytesIO(raw[ITEM_EMB_NAME]), allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] != num_items:
        raise ValueError(f"{src}/{ITEM_EMB_NAME}: shape {emb.shape}, expected ({num_items}, d) (one row per item)")
    grouped = {}
    for s, p in pairs.items():  # stable sort by user: keeps the file (chronological) order within a user
        off = np.zeros(num_users + 1, np.int64)
        np.cumsum(np.bincount(p[:, 0], minlength=num_users), out=off[1:])
        grouped[s] = (off, (p[np.argsort(p[:, 0], kind="stable"), 1] + 1).astype("<i4"))

    fs.makedirs(root, exist_ok=True)
    if existing is not None:
        fs.rm(mpath)  # never leave a manifest pointing at shards being rewritten
    nblocks = -(-num_users // users_per_block)
    shards: List[Dict[str, Any]] = []
    for si, b0 in enumerate(range(0, nblocks, blocks_per_shard)):
        sname = sets_shard_name(si)
        path = posixpath.join(root, sname)
        recs = []
        with fs.open(path + ".tmp", "wb") as fh:
            hw = _Hashing(fh)
            with TarWriter(hw, encoder=False, mtime=0, compress=False, user="recsys", group="recsys") as tw:
                for b in range(b0, min(b0 + blocks_per_shard, nblocks)):
                    lo, hi = b * users_per_block, min((b + 1) * users_per_block, num_users)
                    mem = {"users.npy": _npy(np.arange(lo, hi, dtype="<i8"))}
                    counts = {}
                    for s in SET_SPLITS:
                        off, items = grouped[s]
                        mem[f"{s}_offsets.npy"] = _npy((off[lo:hi + 1] - off[lo]).astype("<i8"))
                        mem[f"{s}_items.npy"] = _npy(items[off[lo]:off[hi]])
                        counts[s] = int(off[hi] - off[lo])
                    tw.write({"__key__": block_key(b), **mem})
                    recs.append({"key": block_key(b), "first_user": lo, "last_user": hi - 1, "num_users": hi - lo,
                                 "num_interactions": counts, "sha256": block_sha256(mem)})
        _mv(fs, path + ".tmp", path)
        shards.append({"name": sname, "bytes": hw.bytes, "sha256": hw.sha.hexdigest(),
                       "num_users": sum(r["num_users"] for r in recs),
                       "num_interactions": {s: sum(r["num_interactions"][s] for r in recs) for s in SET_SPLITS},
                       "blocks": recs})
    _put_atomic(fs, posixpath.join(root, ITEM_EMB_NAME), raw[ITEM_EMB_NAME])
    manifest = {
        "format": SETS_FORMAT, "dataset": name, "source_dir": src, "num_users": num_users, "num_items": num_items,
        "pad_id": PAD_ID, "splits": list(SET_SPLITS),
        "num_interactions": {s: int(pairs[s].shape[0]) for s in SET_SPLITS},
        "num_blocks": nblocks, "users_per_block": int(users_per_block), "block_members": list(BLOCK_MEMBERS),
        "id_map": {"user": "raw", "item": "raw + 1", "item_id_offset": 1},
        "item_emb": {"file": ITEM_EMB_NAME, "shape": list(emb.shape), "dtype": str(emb.dtype),
                     "bytes": build["source"][ITEM_EMB_NAME]["bytes"],
                     "sha256": build["source"][ITEM_EMB_NAME]["sha256"], "row": "item id - 1"},
        "shards": shards, "build": build,
    }
    _put_atomic(fs, mpath, json.dumps(manifest, indent=1).encode("utf-8"))
    keep = {sh["name"] for sh in shards}
    for p in fs.glob(posixpath.join(root, "sets-*.tar")):
        if posixpath.basename(p) not in keep:
            fs.rm(p)
    return manifest


# --------------------------------------------------------------------------- manifest


def load_sets_manifest(url: str) -> Dict[str, Any]:
    """Read ``manifest.json`` (file URL or its directory) and check that its counts add up
    (blocks -> shards -> totals) and that the blocks' user ranges are disjoint, ascending and
    cover ``num_users``. Raises :class:`ShardError` (naming shard and block where it applies)."""
    murl, base = resolve_manifest_url(url)
    try:
        with open_retrying(murl) as f:
            m = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{murl}: manifest not found", url=murl) from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{murl}: cannot read manifest: {e}", url=murl) from e
    if not isinstance(m, dict) or m.get("format") != SETS_FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise ShardError(f"{murl}: manifest format is {got!r}, expected {SETS_FORMAT!r}", url=murl)
    total = {s: 0 for s in SET_SPLITS}
    users, prev_last, sh = 0, -1, {"name": "?"}
    try:
        for sh in m["shards"]:
            where = f"{shard_url(base, sh['name'])} (manifest {murl})"
            keys = [b["key"] for b in sh["blocks"]]
            for b in sh["blocks"]:
                n, lo, hi = int(b["num_users"]), int(b["first_user"]), int(b["last_user"])
                if not (prev_last < lo and 0 <= n <= hi - lo + 1 and hi < int(m["num_users"])):
                    raise ShardError(f"{where} [block {b['key']}]: user range {lo}..{hi} cannot hold {n} users, "
                                     f"overlaps the previous block or leaves 0..{int(m['num_users']) - 1}",
                                     url=murl, key=b["key"])
                prev_last, users = hi, users + n
                for s in SET_SPLITS:
                    total[s] += int(b["num_interactions"][s])
            for s in SET_SPLITS:
                if sum(int(b["num_interactions"][s]) for b in sh["blocks"]) != int(sh["num_interactions"][s]):
                    raise ShardError(f"{where} [block {', '.join(keys)}]: the blocks' {s} counts do not add up "
                                     f"to the shard's {sh['num_interactions'][s]}", url=murl, key=keys[0])
        if users != int(m["num_users"]) or total != {s: int(m["num_interactions"][s]) for s in SET_SPLITS}:
            raise ShardError(f"{murl}: blocks hold {users} users / {total} interactions, manifest totals say "
                             f"{m['num_users']} / {m['num_interactions']}", url=murl)
        int(m["num_items"]), m["item_emb"]["file"]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ShardError(f"{murl}: malformed manifest (at shard {sh.get('name')!r}): {type(e).__name__}: {e}",
                         url=murl) from e
    return m


def load_sets_item_emb(url: str) -> np.ndarray:
    """The L-DiffRec item embeddings beside the manifest, checked against its sha256, as float32
    ``(num_items + 1, d)`` indexed by item id (row 0 = padding = zeros)."""
    m = load_sets_manifest(url)
    _, base = resolve_manifest_url(url)
    eurl = shard_url(base, m["item_emb"]["file"])
    with open_retrying(eurl) as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != m["item_emb"]["sha256"]:
        raise ShardError(f"{eurl}: sha256 differs from the manifest's (corrupt or stale file)", url=eurl)
    emb = np.load(io.BytesIO(raw), allow_pickle=False)
    return np.concatenate([np.zeros((1, emb.shape[1]), emb.dtype), emb]).astype(np.float32)


# --------------------------------------------------------------------------- reader


def _gather(off: np.ndarray, items: np.ndarray, sel: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated items) of the users at block positions ``sel``, in ``sel`` order."""
    starts = off[sel]
    lens = off[sel + 1] - starts
    ends = np.cumsum(lens)
    idx = np.arange(int(ends[-1]) if ends.size else 0) - np.repeat(ends - lens - starts, lens)
    return lens, items[idx]


class SetReader(IterableDataset):
    """Batches of whole users from ``sets-v1`` shards, for ``DataLoader(reader, batch_size=None)``.

    Yields ``{"user": LongTensor (B,), "train"/"valid"/"test": (offsets (B+1,), items (n,))``
    (``layout="jagged"``) or a right-0-padded LongTensor (B, Lmax) (``layout="padded"``)}``;
    train items keep the file (chronological) order.

    Partition: blocks are dealt out like :func:`shards.reader.reader_shard_plan`'s
    ``"balanced"`` assignment: whole rounds of ``world_size`` blocks round-robin, the
    leftover ``num_blocks % world_size`` blocks split user-wise, so every user goes to
    exactly one rank and rank sizes differ by at most a block-size difference + 1.
    ``shuffle`` (training): the epoch's block order is permuted among equal-sized blocks
    (RNG ``(seed, epoch)``, so rank sizes never change) and each block's users by RNG
    ``(seed, epoch, block)``; a block-local shuffle, memory is one block at a time.
    ``even_batches``: ``None`` (each rank its own count), ``"drop"`` (every rank stops at
    the smallest rank's count) or ``"pad"`` (ranks with fewer batches add empty ones);
    counts come from the manifest alone. With ``W`` DataLoader workers, worker w yields
    batches w, w+W, ... of the rank's sequence (the DataLoader's round-robin keeps the
    order; every worker reads all of the rank's blocks).
    """

    def __init__(self, url: str, rank: int = 0, world_size: int = 1, batch_users: int = 256, *,
                 shuffle: bool = False, seed: int = 0, epoch: int = 0, drop_last: bool = False,
                 even_batches: Optional[str] = None, layout: str = "jagged", io_attempts: int = 5) -> None:
        super().__init__()
        if not 0 <= rank < world_size or batch_users < 1:
            raise ValueError(f"need 0 <= rank < world_size and batch_users >= 1, "
                             f"got {rank}, {world_size}, {batch_users}")
        if even_batches not in (None, "drop", "pad") or layout not in ("jagged", "padded"):
            raise ValueError(f"even_batches must be None/'drop'/'pad', layout 'jagged'/'padded'; "
                             f"got {even_batches!r}, {layout!r}")
        self.manifest = load_sets_manifest(url)
        _, self.base_url = resolve_manifest_url(url)
        self.rank, self.world_size, self.batch_users = int(rank), int(world_size), int(batch_users)
        self.shuffle, self.seed, self.epoch, self.drop_last = bool(shuffle), int(seed), int(epoch), bool(drop_last)
        self.even_batches, self.layout, self.io_attempts = even_batches, layout, int(io_attempts)
        self.num_users, self.num_items = int(self.manifest["num_users"]), int(self.manifest["num_items"])
        self._blocks = [(s, i, b) for s, sh in enumerate(self.manifest["shards"]) for i, b in enumerate(sh["blocks"])]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self, g: int, epoch: int) -> List[Tuple[int, int, int, int]]:
        sizes = [int(b["num_users"]) for _, _, b in self._blocks]
        return reader_shard_plan(sizes, shard_order(sizes, self.shuffle, self.seed, epoch), g,
                                 self.world_size, "balanced")

    def rank_users(self, epoch: Optional[int] = None) -> List[int]:
        """Users each rank reads in ``epoch`` (from the manifest; the same in every epoch)."""
        e = self.epoch if epoch is None else int(epoch)
        def kept(blk: int, first: int, stride: int, off: int) -> int:  # k in 0..n-1 with (first + k) % stride == off
            return len(range((off - first) % stride, int(self._blocks[blk][2]["num_users"]), stride))

        return [sum(kept(*p) for p in self._plan(g, e)) for g in range(self.world_size)]

    def rank_batches(self) -> List[int]:
        """Batches each rank would yield without ``even_batches``."""
        b = self.batch_users
        return [n // b if self.drop_last else -(-n // b) for n in self.rank_users()]

    def __len__(self) -> int:
        nb = self.rank_batches()
        return {None: nb[self.rank], "drop": min(nb), "pad": max(nb)}[self.even_batches]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        target, done = len(self), 0
        it = self._batches(self.epoch)
        try:
            for pieces in itertools.islice(it, target):  # never reads past the last batch it needs
                if done % nw == wid:
                    yield self._collate(pieces)
                done += 1
        finally:
            it.close()
        for i in range(done, target):  # even_batches="pad"
            if i % nw == wid:
                yield self._collate([])

    # ---------------------------------------------------------------- internals

    def _batches(self, epoch: int) -> Iterator[List[Tuple[Dict[str, Any], np.ndarray]]]:
        """Lists of (block arrays, selected block positions) holding ``batch_users`` users each."""
        plan = self._plan(self.rank, epoch)
        first_seen: Dict[int, int] = {}
        for blk, *_ in plan:
            first_seen.setdefault(self._blocks[blk][0], len(first_seen))
        plan.sort(key=lambda p: (first_seen[self._blocks[p[0]][0]], self._blocks[p[0]][1]))
        pieces: List[Tuple[Dict[str, Any], np.ndarray]] = []
        have = 0
        for s in sorted(first_seen, key=first_seen.get):
            wanted = {self._blocks[p[0]][1]: p for p in plan if self._blocks[p[0]][0] == s}
            for pos, data in self._read_shard(s, set(wanted)):
                blk, first, stride, off = wanted[pos]
                n = data["users"].size
                order = np.random.default_rng([self.seed, epoch, blk]).permutation(n) if self.shuffle else np.arange(n)
                sel = order[(first + np.arange(n)) % stride == off]
                while sel.size:
                    take = min(self.batch_users - have, sel.size)
                    pieces.append((data, sel[:take]))
                    sel, have = sel[take:], have + take
                    if have == self.batch_users:
                        yield pieces
                        pieces, have = [], 0
        if pieces and not self.drop_last:
            yield pieces

    def _collate(self, pieces: Sequence[Tuple[Dict[str, Any], np.ndarray]]) -> Dict[str, Any]:
        users = [d["users"][sel] for d, sel in pieces]
        out: Dict[str, Any] = {"user": torch.from_numpy(np.concatenate(users + [np.zeros(0, np.int64)]))}
        for s in SET_SPLITS:
            got = [_gather(*d[s], sel) for d, sel in pieces]
            lens = np.concatenate([g[0] for g in got] + [np.zeros(0, np.int64)])
            items = np.concatenate([g[1] for g in got] + [np.zeros(0, np.int32)]).astype(np.int64)
            if self.layout == "jagged":
                offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
                out[s] = (torch.from_numpy(offsets), torch.from_numpy(items))
            else:
                pad = np.full((lens.size, int(lens.max()) if lens.size else 0), PAD_ID, np.int64)
                rows = np.repeat(np.arange(lens.size), lens)
                pad[rows, np.arange(items.size) - np.repeat(np.cumsum(lens) - lens, lens)] = items
                out[s] = torch.from_numpy(pad)
        return out

    def _read_shard(self, s: int, wanted: set) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """Verified arrays of the blocks at positions ``wanted`` of shard ``s``, in storage order."""
        sh = self.manifest["shards"][s]
        url = shard_url(self.base_url, sh["name"])
        keys = [b["key"] for b in sh["blocks"]]
        cur = [0]  # position of the block being read

        def err(msg: str, member: Optional[str] = None) -> ShardError:
            k = keys[min(cur[0], len(keys) - 1)]
            return ShardError(f"{url} [block {k}]: {msg}", url=url, key=k, member=member)

        try:
            f = open_retrying(url, attempts=self.io_attempts)
        except OSError as e:
            raise err(f"cannot open shard: {type(e).__name__}: {e}") from e
        with f:
            hf = _Hashing(f)
            try:
                with tarfile.open(fileobj=hf, mode="r|") as tf:
                    key, mem = None, {}
                    for ti in tf:
                        k, _, ext = ti.name.partition(".")
                        if k != key:
                            if key is not None:
                                yield from self._block(err, sh, cur[0], key, mem, wanted)
                                cur[0] += 1
                            key, mem = k, {}
                        if not ti.isfile() or ext in mem:
                            raise err(f"tar entry {ti.name!r} is not a file or appears twice", ti.name)
                        mem[ext] = tf.extractfile(ti).read() if cur[0] in wanted else b""  # type: ignore[union-attr]
                    if key is not None:
                        yield from self._block(err, sh, cur[0], key, mem, wanted)
                        cur[0] += 1
                while hf.read(1 << 20):  # the end-of-archive padding, for the shard checksum
                    pass
            except (tarfile.TarError, EOFError, OSError) as e:
                raise err(f"corrupt or truncated tar: {type(e).__name__}: {e}") from e
        if cur[0] != len(keys):
            raise err(f"shard ends after {cur[0]} of {len(keys)} blocks (truncated shard or stale manifest)")
        if hf.bytes != sh["bytes"] or hf.sha.hexdigest() != sh["sha256"]:
            raise err(f"shard is {hf.bytes} bytes with sha256 {hf.sha.hexdigest()}; the manifest says "
                      f"{sh['bytes']} / {sh['sha256']} (corrupt tar headers or stale manifest)")

    def _block(self, err: Any, sh: Dict[str, Any], pos: int, key: str, mem: Dict[str, bytes],
               wanted: set) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """Check block ``pos`` of shard ``sh`` completely; yield its arrays if wanted."""
        if pos >= len(sh["blocks"]) or key != sh["blocks"][pos]["key"]:
            raise err(f"tar holds block {key!r} at position {pos}; the manifest lists "
                      f"{[b['key'] for b in sh['blocks']]} (stale manifest or foreign shard)")
        rec = sh["blocks"][pos]
        missing, extra = sorted(set(BLOCK_MEMBERS) - set(mem)), sorted(set(mem) - set(BLOCK_MEMBERS))
        if missing or extra:
            raise err(f"block members missing {missing} / unexpected {extra} (truncated or foreign shard)")
        if pos not in wanted:
            return
        got = block_sha256(mem)
        if got != rec["sha256"]:
            raise err(f"checksum mismatch: members' sha256 {got}, manifest {rec['sha256']} (corrupt block)")
        a: Dict[str, np.ndarray] = {}
        for m in BLOCK_MEMBERS:
            want = _DTYPES[m[:-4].rsplit("_", 1)[-1]]
            try:
                x = np.load(io.BytesIO(mem[m]), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise err(f"member {key}.{m} is not a valid .npy: {e}", m) from e
            if x.dtype != want or x.ndim != 1:
                raise err(f"member {key}.{m} is {x.dtype} {x.shape}, expected 1-D {want}", m)
            a[m] = x.astype(want.newbyteorder("="))
        u = a["users.npy"]
        if u.size != rec["num_users"]:
            raise err(f"holds {u.size} users, the manifest says {rec['num_users']} (stale manifest)", "users.npy")
        if u.size and (np.any(np.diff(u) <= 0) or u[0] < rec["first_user"] or u[-1] > rec["last_user"]):
            raise err(f"users are not strictly increasing within {rec['first_user']}..{rec['last_user']} "
                      f"(duplicate or out-of-range users)", "users.npy")
        out: Dict[str, Any] = {"users": u}
        for s in SET_SPLITS:
            off, items = a[f"{s}_offsets.npy"], a[f"{s}_items.npy"]
            if off.size != u.size + 1 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != items.size:
                raise err(f"{s} offsets are not monotone from 0 to len(items)={items.size} with "
                          f"{u.size + 1} entries", f"{s}_offsets.npy")
            if items.size != rec["num_interactions"][s]:
                raise err(f"holds {items.size} {s} interactions, the manifest says "
                          f"{rec['num_interactions'][s]} (stale manifest)", f"{s}_items.npy")
            if items.size and (int(items.min()) < 1 or int(items.max()) > self.num_items):
                bad = int(items[(items < 1) | (items > self.num_items)][0])
                raise err(f"{s} item id {bad} outside 1..{self.num_items}", f"{s}_items.npy")
            out[s] = (off, items)
        yield pos, out
