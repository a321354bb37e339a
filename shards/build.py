"""Build leave-one-out WebDataset shards (``recsys-dist/seq-v1``) from a raw dataset.

Split rule, for a user with full (filtered) chronological sequence
``s_1..s_n`` (1-based ``j`` below is the target position, also used in the key):

* test  : history ``s_1..s_{n-1}``, target ``s_n``            (needs n >= 2)
* val   : history ``s_1..s_{n-2}``, target ``s_{n-1}``        (needs n >= 3)
* train : for ``j = 2..n-2``: history ``s_1..s_{j-1}``, target ``s_j``;
  with ``train_prefixes_per_user=K`` only the last K of these (largest j).

Histories are truncated to their last ``max_len`` items. Train samples are
shuffled once (``numpy.random.default_rng(seed).permutation``) before being cut
into shards; val/test samples are written in user order.

Output directory (any fsspec URL: plain path, ``file://``, ``s3://`` ...)::

    train-00000.tar ... val-00000.tar ... test-00000.tar ...
    item_counts.npy   int64 (num_items + 1,): occurrences of each item in
                      s_1..s_{n-2} of every user (row 0 = pad = 0)
    id_map.json       {"users": [raw user id per user index],
                       "items": [null, raw item id of item 1, ...]}
    manifest.json     written last, atomically (tmp file + rename)

``manifest.json``::

    {"format": "recsys-dist/seq-v1", "dataset": str, "num_items": N,
     "num_users": U, "max_len": L, "pad_id": 0, "filter": {...counts...},
     "splits": {split: {"num_samples": int,
                        "shards": [{"name", "num_samples", "sha256", "bytes"}]}},
     "train_item_counts_file": "item_counts.npy", "id_map_file": "id_map.json",
     "build": {...every build parameter...}}

Building is idempotent: when ``manifest.json`` at the destination has the same
``build`` block and its files exist with the recorded sizes, nothing is
written and the existing manifest is returned.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
from typing import Any, Dict, List, Optional, Tuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm
from webdataset import TarWriter

from .schema import (
    FORMAT,
    ID_MAP_NAME,
    ITEM_COUNTS_NAME,
    MANIFEST_NAME,
    PAD_ID,
    SPLITS,
    encode_sample,
    is_shard_name,
    shard_name,
)
from .sources import DATASETS, SequenceData, dataset_path, load_sequences

log = logging.getLogger(__name__)
BUILDER_VERSION = 1


# --------------------------------------------------------------------------- samples


def split_samples(
    lengths: np.ndarray,
    train_prefixes_per_user: Optional[int] = None,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Enumerate the leave-one-out samples of every user.

    Args:
        lengths: int (num_users,), sequence length ``n`` of each user.
        train_prefixes_per_user: keep only the last K train prefixes per user
            (None = all ``j = 2..n-2``).

    Returns:
        ``{split: (users, js)}`` with int64 arrays of equal length: the dense
        user index and the 1-based target position ``j`` of each sample, in
        user order (train not yet shuffled).
    """
    if train_prefixes_per_user is not None and train_prefixes_per_user < 1:
        raise ValueError(f"train_prefixes_per_user must be >= 1 or None, got {train_prefixes_per_user}")
    n = np.asarray(lengths, dtype=np.int64)
    users = np.arange(n.size, dtype=np.int64)
    out: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    has_test = n >= 2
    out["test"] = (users[has_test], n[has_test])
    has_val = n >= 3
    out["val"] = (users[has_val], n[has_val] - 1)
    hi = n - 2  # last train target position (inclusive)
    lo = np.full_like(n, 2)
    if train_prefixes_per_user is not None:
        lo = np.maximum(lo, hi - train_prefixes_per_user + 1)
    cnt = np.clip(hi - lo + 1, 0, None)
    tu = np.repeat(users, cnt)
    starts = np.repeat(lo, cnt)
    first = np.repeat(np.cumsum(cnt) - cnt, cnt)
    tj = starts + (np.arange(tu.size, dtype=np.int64) - first)
    out["train"] = (tu, tj)
    return out


def train_item_counts(data: SequenceData) -> np.ndarray:
    """int64 (num_items + 1,): occurrences of each item in ``s_1..s_{n-2}`` over all users (row 0 = 0)."""
    lengths = data.lengths()
    user_of = np.repeat(np.arange(lengths.size), lengths)
    pos_in_user = np.arange(data.items.size) - data.offsets[:-1][user_of]
    mask = pos_in_user < (lengths[user_of] - 2)
    counts = np.bincount(data.items[mask], minlength=data.num_items + 1).astype(np.int64)
    counts[PAD_ID] = 0
    return counts


# --------------------------------------------------------------------------- fs helpers


class _HashingWriter:
    """Write-through file wrapper that computes sha256 and the byte count."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        self.f.write(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


def _replace(fs: Any, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` (atomic on local filesystems)."""
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def _write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    _replace(fs, tmp, path)


def _read_json(fs: Any, path: str) -> Optional[Dict[str, Any]]:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring unreadable manifest %s", path)
        return None


def _manifest_is_complete(fs: Any, root: str, manifest: Dict[str, Any]) -> bool:
    try:
        for split in manifest["splits"].values():
            for sh in split["shards"]:
                if fs.size(posixpath.join(root, sh["name"])) != sh["bytes"]:
                    return False
        for key in ("train_item_counts_file", "id_map_file"):
            if key in manifest and not fs.exists(posixpath.join(root, manifest[key])):
                return False
    except (FileNotFoundError, KeyError, TypeError):
        return False
    return True


def _jsonable_ids(a: np.ndarray) -> List[Any]:
    return [int(x) for x in a] if np.issubdtype(a.dtype, np.integer) else [str(x) for x in a]


# --------------------------------------------------------------------------- build


def _write_split(
    fs: Any,
    root: str,
    split: str,
    users: np.ndarray,
    js: np.ndarray,
    data: SequenceData,
    max_len: int,
    samples_per_shard: int,
    compress: bool,
    pbar: Any,
) -> Dict[str, Any]:
    shards: List[Dict[str, Any]] = []
    items, offsets = data.items, data.offsets
    for index, start in enumerate(range(0, users.size, samples_per_shard)):
        stop = min(start + samples_per_shard, users.size)
        name = shard_name(split, index, compress)
        path = posixpath.join(root, name)
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as raw:
            hw = _HashingWriter(raw)
            gz = gzip.GzipFile(fileobj=hw, mode="wb", mtime=0) if compress else None
            sink = gz if gz is not None else hw
            with TarWriter(sink, encoder=False, mtime=0, compress=False, user="recsys", group="recsys") as tw:
                for u, j in zip(users[start:stop].tolist(), js[start:stop].tolist()):
                    base = int(offsets[u])
                    h0 = max(0, j - 1 - max_len)
                    tw.write(encode_sample(split, u, j, items[base + h0: base + j - 1], int(items[base + j - 1])))
            if gz is not None:
                gz.close()
        _replace(fs, tmp, path)
        shards.append({"name": name, "num_samples": stop - start, "sha256": hw.sha.hexdigest(), "bytes": hw.bytes})
        pbar.update(stop - start)
    return {"num_samples": int(users.size), "shards": shards}


def build_shards(
    dataset: str,
    out: str,
    data_dir: Optional[str] = None,
    max_len: int = 50,
    train_prefixes_per_user: Optional[int] = None,
    samples_per_shard: int = 20000,
    min_item_count: int = 5,
    min_user_count: int = 5,
    seed: int = 0,
    max_users: Optional[int] = None,
    compress: bool = False,
    force: bool = False,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """Build train/val/test shards of ``dataset`` into ``out`` and return the manifest.

    Args:
        dataset: a key of :data:`shards.sources.DATASETS` (``"ml-1m"``, ``"amazon-beauty"``).
        out: destination directory, plain path or fsspec URL (``file://``, ``s3://``).
        data_dir: dataset root; default ``$RECSYS_DATA_DIR`` or ``<repo>/../shared/datasets``.
        max_len: histories keep their last ``max_len`` items (items, >= 1).
        train_prefixes_per_user: keep only each user's last K train prefixes (None = all).
        samples_per_shard: samples per tar file (the last shard of a split may hold fewer).
        min_item_count, min_user_count: iterated k-core thresholds (interactions).
        seed: seed of the one-off train shuffle.
        max_users: keep only the first N users (ascending raw id) after filtering.
        compress: gzip the tars (``.tar.gz``); the reader handles both.
        force: rebuild even if an identical build already exists at ``out``.
        progress: show a tqdm bar (None = only on a terminal).

    Returns:
        The manifest dict (also written to ``<out>/manifest.json``).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    src = dataset_path(dataset, data_dir)
    build = {
        "format": FORMAT,
        "builder_version": BUILDER_VERSION,
        "dataset": dataset,
        "source": {"file": DATASETS[dataset], "bytes": os.path.getsize(src) if os.path.exists(src) else None},
        "max_len": int(max_len),
        "train_prefixes_per_user": None if train_prefixes_per_user is None else int(train_prefixes_per_user),
        "samples_per_shard": int(samples_per_shard),
        "min_item_count": int(min_item_count),
        "min_user_count": int(min_user_count),
        "seed": int(seed),
        "max_users": None if max_users is None else int(max_users),
        "compress": bool(compress),
        "split_rule": "leave-one-out",
        "item_index": "items that occur after filtering, ascending raw id -> 1..N",
    }
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/") or "/"
    manifest_path = posixpath.join(root, MANIFEST_NAME)
    existing = _read_json(fs, manifest_path)
    if existing is not None and not force:
        old_build = existing.get("build")
        if not os.path.exists(src) and isinstance(old_build, dict):
            # raw data not present here (e.g. a training node): accept a prebuilt
            # manifest whose parameters match, whatever source size it recorded
            old_build = {**old_build, "source": build["source"]}
        if old_build == build and _manifest_is_complete(fs, root, existing):
            log.info("shards at %s are up to date; skipping build", out)
            return existing
    data = load_sequences(dataset, data_dir, min_item_count, min_user_count, max_users)
    samples = split_samples(data.lengths(), train_prefixes_per_user)
    tu, tj = samples["train"]
    perm = np.random.default_rng(seed).permutation(tu.size)
    samples["train"] = (tu[perm], tj[perm])

    fs.makedirs(root, exist_ok=True)
    if existing is not None:  # never leave a manifest that points at shards being rewritten
        fs.rm(manifest_path)

    total = sum(u.size for u, _ in samples.values())
    disable = None if progress is None else not progress
    splits: Dict[str, Any] = {}
    with tqdm(total=total, desc=f"shards {dataset}", unit="sample", disable=disable) as pbar:
        for split in SPLITS:
            users, js = samples[split]
            splits[split] = _write_split(fs, root, split, users, js, data, max_len, samples_per_shard, compress, pbar)

    buf = io.BytesIO()
    np.save(buf, train_item_counts(data), allow_pickle=False)
    _write_bytes_atomic(fs, posixpath.join(root, ITEM_COUNTS_NAME), buf.getvalue())
    id_map = {"users": _jsonable_ids(data.raw_user_ids), "items": [None] + _jsonable_ids(data.raw_item_ids)}
    _write_bytes_atomic(fs, posixpath.join(root, ID_MAP_NAME), json.dumps(id_map).encode("utf-8"))

    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "dataset": dataset,
        "num_items": data.num_items,
        "num_users": data.num_users,
        "max_len": int(max_len),
        "pad_id": PAD_ID,
        "filter": data.stats,
        "splits": splits,
        "train_item_counts_file": ITEM_COUNTS_NAME,
        "id_map_file": ID_MAP_NAME,
        "build": build,
    }
    _write_bytes_atomic(fs, manifest_path, json.dumps(manifest, indent=1).encode("utf-8"))

    # remove shards of an earlier build that the new manifest does not reference
    keep = {sh["name"] for s in splits.values() for sh in s["shards"]}
    try:
        for p in fs.ls(root, detail=False):
            base = posixpath.basename(p.rstrip("/"))
            if (is_shard_name(base) and base not in keep) or (
                base.endswith(".tmp") and is_shard_name(base[: -len(".tmp")])
            ):
                fs.rm(p)
    except (FileNotFoundError, NotImplementedError):  # pragma: no cover - exotic filesystems
        pass
    return manifest


def summarize(manifest: Dict[str, Any]) -> str:
    """One human-readable paragraph describing a manifest."""
    lines = [
        f"dataset {manifest['dataset']}: {manifest['num_users']} users, {manifest['num_items']} items "
        f"(embedding rows {manifest['num_items'] + 1}, 0 = pad), max_len {manifest['max_len']}",
    ]
    f = manifest.get("filter", {})
    if f:
        lines.append(
            f"filter: {f.get('raw_users')} users / {f.get('raw_items')} items / {f.get('raw_interactions')} "
            f"interactions -> {f.get('filtered_users')} / {f.get('filtered_items')} / "
            f"{f.get('filtered_interactions')} (min_item_count={f.get('min_item_count')}, "
            f"min_user_count={f.get('min_user_count')}, {f.get('iterations')} passes)"
        )
    for split in SPLITS:
        s = manifest["splits"].get(split)
        if s is None:
            continue
        nbytes = sum(sh["bytes"] for sh in s["shards"])
        lines.append(f"{split:>5}: {s['num_samples']:>9} samples in {len(s['shards'])} shard(s), {nbytes / 2**20:.1f} MiB")
    return "\n".join(lines)
