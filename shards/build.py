"""Write ``seq-v2`` shards (:mod:`shards.format`) from records, and build a dataset from its source.

Output folder (any fsspec URL: a path, ``file://``, ``s3://``)::

    seq-00000.tar ...      blocks of records (``.tar.gz`` with ``compress``)
    item_counts.npy        int64 (num_items + 1,): occurrences of each item in the train
                           segments (the popularity ranker's scores; row 0 = 0)
    target_counts.npy      int64 (num_items + 1,): how often each item is a train target
                           (the arrival distribution of in-batch negatives)
    id_map.json            {"records": [raw user/session id per record], "items": [null, raw id of item 1, ...]}
    manifest.json          written last, atomically (tmp + rename); see shards.format

Building is idempotent: a manifest at the destination with the same ``build`` block (every
parameter and the size and sha256 of every source file) whose files have the recorded
sizes is returned as is. A rebuild first removes the old manifest, so no reader ever sees
a manifest that points at shards being rewritten, and removes stale shards last.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import posixpath
import time
from dataclasses import asdict
from typing import Any, Dict, Iterable, List, Optional

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm
from webdataset import TarWriter

from .format import (BLOCK_MEMBERS, FORMAT, ID_MAP_NAME, ITEM_COUNTS_NAME, MANIFEST_NAME, PAD_ID, TARGET_COUNTS_NAME,
                     block_key, block_sha256, npy_bytes, sample_counts, shard_name)
from .records import SEGMENTS, Records, id_map_json

log = logging.getLogger(__name__)
BUILDER_VERSION = 1
DEFAULT_RECORDS_PER_BLOCK = 1000
DEFAULT_BLOCKS_PER_SHARD = 4


def min_history_len(protocol: str) -> int:
    """Shortest history a sample may have: 0 for sessions (DreamRec keeps a session's first
    interaction, with an empty history), else 1."""
    return 0 if protocol == "session" else 1


# --------------------------------------------------------------------------- fs helpers


class _HashingWriter:
    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        self.f.write(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


def _mv(fs: Any, src: str, dst: str) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)  # atomic
    else:
        fs.mv(src, dst)


def _put_atomic(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path + ".tmp", "wb") as f:
        f.write(data)
    _mv(fs, path + ".tmp", path)


def _read_manifest(fs: Any, path: str) -> Optional[Dict[str, Any]]:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}


def _complete(fs: Any, root: str, m: Dict[str, Any]) -> bool:
    try:
        files = [(sh["name"], sh["bytes"]) for sh in m["shards"]]
        if any(fs.size(posixpath.join(root, n)) != b for n, b in files):
            return False
        return all(fs.exists(posixpath.join(root, m[k]))
                   for k in ("train_item_counts_file", "train_target_counts_file", "id_map_file"))
    except (FileNotFoundError, KeyError, TypeError):
        return False


def up_to_date(out: str, build: Dict[str, Any], force: bool = False) -> Optional[Dict[str, Any]]:
    """The manifest at ``out`` if it was built with ``build`` and is complete, else None."""
    fs, root = fsspec.core.url_to_fs(str(out))
    m = _read_manifest(fs, posixpath.join(root, MANIFEST_NAME))
    if not force and m and m.get("build") == build and _complete(fs, root, m):
        return m
    return None


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    """Blocks into shards ``seq-NNNNN.tar`` (``blocks_per_shard`` each), manifest entries out."""

    def __init__(self, fs: Any, root: str, blocks_per_shard: int, compress: bool) -> None:
        self.fs, self.root, self.per, self.compress = fs, root, blocks_per_shard, compress
        self.shards: List[Dict[str, Any]] = []
        self._open: Optional[tuple] = None
        self.nblocks = 0

    def _start(self) -> None:
        name = shard_name(len(self.shards) + (1 if self._open else 0), self.compress)
        path = posixpath.join(self.root, name)
        fh = self.fs.open(path + ".tmp", "wb")
        hw = _HashingWriter(fh)
        # gzip with mtime 0 (not tarfile's "w|gz", which stamps the time): same input, same bytes
        gz = gzip.GzipFile(fileobj=hw, mode="wb", compresslevel=6, mtime=0) if self.compress else None
        tw = TarWriter(gz or hw, encoder=False, compress=False, mtime=0, user="recsys", group="recsys")
        self._open = (name, path, fh, hw, tw, [], gz)

    def _finish(self) -> None:
        name, path, fh, hw, tw, blocks, gz = self._open
        tw.close()
        if gz is not None:
            gz.close()
        fh.close()
        _mv(self.fs, path + ".tmp", path)
        self.shards.append({"name": name, "bytes": hw.bytes, "sha256": hw.sha.hexdigest(), "blocks": blocks})
        self._open = None

    def add(self, members: Dict[str, bytes], entry: Dict[str, Any]) -> None:
        if self._open is None:
            self._start()
        self._open[4].write({"__key__": entry["key"], **members})
        self._open[5].append(entry)
        self.nblocks += 1
        if len(self._open[5]) == self.per:
            self._finish()

    def close(self) -> List[Dict[str, Any]]:
        if self._open is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._open is not None:
            try:
                self._open[2].close()
                self.fs.rm(self._open[1] + ".tmp")
            except OSError:
                pass
            self._open = None


def _block(r: Records, lo: int, hi: int, first: int, m: int, k: Optional[int], b: int) -> tuple:
    """(members, manifest entry) of records ``lo..hi-1`` of chunk ``r``, numbered from ``first``."""
    off = r.offsets[lo:hi + 1] - r.offsets[lo]
    items = r.items[r.offsets[lo]:r.offsets[hi]].astype("<i4")
    bounds = r.bounds[lo:hi].astype("<i8")
    members = {"records.npy": npy_bytes(np.arange(first, first + hi - lo, dtype="<i8")),
               "offsets.npy": npy_bytes(off.astype("<i8")), "items.npy": npy_bytes(items),
               "bounds.npy": npy_bytes(bounds)}
    lens = np.diff(off)
    cnt = sample_counts(lens, bounds, m, k)
    t, v = bounds[:, 0], bounds[:, 1]
    entry = {"key": block_key(b), "first_record": first, "num_records": hi - lo, "num_items": int(items.size),
             "interactions": {"train": int(t.sum()), "valid": int((v - t).sum()), "test": int((lens - v).sum())},
             "samples": {s: int(cnt[s].sum()) for s in SEGMENTS}, "sha256": block_sha256(members)}
    return members, entry


def _counts(r: Records, item_counts: np.ndarray, target_counts: np.ndarray, m: int, k: Optional[int]) -> None:
    """Add chunk ``r``'s train-segment occurrences and train-target counts (in place)."""
    lens = r.lengths()
    rec = np.repeat(np.arange(lens.size), lens)
    pos = np.arange(r.items.size) - r.offsets[:-1][rec]
    t = r.bounds[:, 0][rec]
    item_counts += np.bincount(r.items[pos < t], minlength=item_counts.size)
    lo = np.full_like(t, m) if k is None else np.maximum(m, t - k)
    target_counts += np.bincount(r.items[(pos >= lo) & (pos < t)], minlength=target_counts.size)


def write_shards(chunks: Iterable[Records], out: str, *, dataset: str, protocol: str, num_items: int,
                 build: Dict[str, Any], records_per_block: int = DEFAULT_RECORDS_PER_BLOCK,
                 blocks_per_shard: int = DEFAULT_BLOCKS_PER_SHARD, compress: bool = False,
                 train_prefixes_per_user: Optional[int] = None, stats: Optional[Dict[str, Any]] = None,
                 id_map: Optional[Dict[str, Any]] = None, progress: Optional[bool] = None,
                 total_records: Optional[int] = None) -> Dict[str, Any]:
    """Write the records of ``chunks`` (record ids continue from chunk to chunk; each chunk
    is validated) as shards at ``out``; returns the manifest (written last)."""
    if records_per_block < 1 or blocks_per_shard < 1:
        raise ValueError("records_per_block and blocks_per_shard must be >= 1")
    k = None if train_prefixes_per_user is None else int(train_prefixes_per_user)
    if k is not None and k < 1:
        raise ValueError(f"train_prefixes_per_user must be >= 1 or None, got {k}")
    m = min_history_len(protocol)
    fs, root = fsspec.core.url_to_fs(str(out))
    root = root.rstrip("/") or "/"
    fs.makedirs(root, exist_ok=True)
    mpath = posixpath.join(root, MANIFEST_NAME)
    if fs.exists(mpath):
        fs.rm(mpath)  # never leave a manifest pointing at shards being rewritten
    t0 = time.time()
    w = _ShardWriter(fs, root, blocks_per_shard, compress)
    item_counts = np.zeros(num_items + 1, np.int64)
    target_counts = np.zeros(num_items + 1, np.int64)
    first, max_len = 0, 0
    carry: Optional[Records] = None
    try:
        with tqdm(total=total_records, desc=f"shards {dataset}", unit="record",
                  disable=None if progress is None else not progress) as bar:
            for chunk in chunks:
                chunk.validate(f"{dataset} records {first}..")
                if chunk.num_items > num_items:
                    raise ValueError(f"{dataset}: a chunk declares {chunk.num_items} items, the dataset {num_items}")
                _counts(chunk, item_counts, target_counts, m, k)
                if chunk.num_records:
                    max_len = max(max_len, int(chunk.lengths().max()))
                r = chunk if carry is None else _concat(carry, chunk)
                n_full = (r.num_records // records_per_block) * records_per_block
                for lo in range(0, n_full, records_per_block):
                    w.add(*_block(r, lo, lo + records_per_block, first, m, k, w.nblocks))
                    first += records_per_block
                    bar.update(records_per_block)
                carry = r.select(np.arange(n_full, r.num_records)) if n_full < r.num_records else None
            if carry is not None:
                w.add(*_block(carry, 0, carry.num_records, first, m, k, w.nblocks))
                first += carry.num_records
                bar.update(carry.num_records)
            shards = w.close()
    except BaseException:
        w.abort()
        raise
    item_counts[PAD_ID] = target_counts[PAD_ID] = 0
    _put_atomic(fs, posixpath.join(root, ITEM_COUNTS_NAME), npy_bytes(item_counts))
    _put_atomic(fs, posixpath.join(root, TARGET_COUNTS_NAME), npy_bytes(target_counts))
    _put_atomic(fs, posixpath.join(root, ID_MAP_NAME), json.dumps(id_map or {}).encode("utf-8"))
    blocks = [b for sh in shards for b in sh["blocks"]]
    manifest = {
        "format": FORMAT, "dataset": dataset, "protocol": protocol,
        "num_records": first, "num_users": first, "num_items": int(num_items), "pad_id": PAD_ID,
        "min_history_len": m, "train_prefixes_per_user": k, "max_record_len": max_len,
        "num_interactions": {s: sum(b["interactions"][s] for b in blocks) for s in SEGMENTS},
        "num_samples": {s: sum(b["samples"][s] for b in blocks) for s in SEGMENTS},
        "records_per_block": int(records_per_block), "block_members": list(BLOCK_MEMBERS),
        "shards": shards, "train_item_counts_file": ITEM_COUNTS_NAME,
        "train_target_counts_file": TARGET_COUNTS_NAME, "id_map_file": ID_MAP_NAME,
        "stats": stats or {}, "build": build,
    }
    _put_atomic(fs, mpath, json.dumps(manifest, indent=1).encode("utf-8"))
    keep = {sh["name"] for sh in shards}
    for p in fs.glob(posixpath.join(root, "seq-*.tar*")):
        if posixpath.basename(p) not in keep and not p.endswith(".tmp"):
            fs.rm(p)
    log.info("%s: %d records, %d blocks in %d shards, %.1f MiB, %.1f s", dataset, first, len(blocks), len(shards),
             sum(sh["bytes"] for sh in shards) / 2**20, time.time() - t0)
    return manifest


def _concat(a: Records, b: Records) -> Records:
    return Records(np.concatenate([a.offsets[:-1], b.offsets + a.offsets[-1]]), np.concatenate([a.items, b.items]),
                   np.concatenate([a.bounds, b.bounds]), max(a.num_items, b.num_items), a.protocol)


# --------------------------------------------------------------------------- datasets from sources


def _file_digest(url: str) -> Dict[str, Any]:
    h, n = hashlib.sha256(), 0
    with fsspec.open(url, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                break
            h.update(b)
            n += len(b)
    return {"bytes": n, "sha256": h.hexdigest()}


def build_shards(source: Any, out: str, *, dataset: str, data_dir: Optional[str] = None,
                 train_prefixes_per_user: Optional[int] = None,
                 records_per_block: int = DEFAULT_RECORDS_PER_BLOCK, blocks_per_shard: int = DEFAULT_BLOCKS_PER_SHARD,
                 compress: bool = False, force: bool = False, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Build the shards of the dataset that ``source`` (:class:`shards.source.SourceConfig`)
    describes into ``out``; returns the manifest. Idempotent (see the module docstring)."""
    from .source import load_records, source_files

    files = source_files(source, data_dir)
    missing = [f for f in files if not fsspec.core.url_to_fs(f)[0].exists(fsspec.core.url_to_fs(f)[1])]
    layout = {"format": FORMAT, "builder_version": BUILDER_VERSION, "dataset": dataset, "source": asdict(source),
              "train_prefixes_per_user": train_prefixes_per_user, "records_per_block": int(records_per_block),
              "blocks_per_shard": int(blocks_per_shard), "compress": bool(compress)}
    if missing:  # prebuilt shards on a node without the raw data: fine if built with these parameters
        fs, root = fsspec.core.url_to_fs(str(out))
        m = _read_manifest(fs, posixpath.join(root, MANIFEST_NAME))
        same = m and {k: v for k, v in m.get("build", {}).items() if k != "source_files"} == json.loads(json.dumps(layout))
        if same and _complete(fs, root, m):
            log.info("%s: raw data absent (%s); using the shards built with the same parameters", dataset, missing[0])
            return m
        raise FileNotFoundError(f"dataset {dataset!r}: source file(s) not found: {', '.join(missing)} "
                                "(set $RECSYS_DATA_DIR or data.data_dir, or fix data.source)")
    # digests in source_files order (the split files, then the statis file): location-independent,
    # and two split files of one base name cannot overwrite each other's entry
    build = {**layout, "source_files": [_file_digest(f) for f in files]}
    build = json.loads(json.dumps(build))  # as the manifest stores it (tuples -> lists), so it compares equal
    done = up_to_date(out, build, force)
    if done is not None:
        return done
    r = load_records(source, data_dir)
    id_map = {"records": id_map_json(r.raw_record_ids), "items": [None] + (id_map_json(r.raw_item_ids) or [])}
    return write_shards([r], out, dataset=dataset, protocol=r.protocol, num_items=r.num_items, build=build,
                        records_per_block=records_per_block, blocks_per_shard=blocks_per_shard, compress=compress,
                        train_prefixes_per_user=train_prefixes_per_user, stats=r.stats, id_map=id_map,
                        progress=progress, total_records=r.num_records)


def summarize(manifest: Dict[str, Any]) -> str:
    """A few human-readable lines describing a manifest."""
    nbytes = sum(sh["bytes"] for sh in manifest["shards"])
    nblocks = sum(len(sh["blocks"]) for sh in manifest["shards"])
    lines = [f"dataset {manifest['dataset']} ({manifest['protocol']}): {manifest['num_records']:,} records, "
             f"{manifest['num_items']:,} items (table rows {manifest['num_items'] + 1:,}, 0 = pad), "
             f"{nblocks} blocks in {len(manifest['shards'])} shard(s), {nbytes / 2**20:.1f} MiB"]
    for s in SEGMENTS:
        lines.append(f"{s:>5}: {manifest['num_interactions'][s]:>10,} interactions, "
                     f"{manifest['num_samples'][s]:>10,} samples")
    return "\n".join(lines)
