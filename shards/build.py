"""Build WebDataset shards (``recsys-dist/seq-v1``) from a raw dataset.

Two protocols (manifest key ``"protocol"``), chosen by the dataset:

* ``"leave_one_out"``: ``ml-1m``, ``amazon-beauty`` (DiffuRec TSV, k-core filter);
* ``"session_split"``: ``zhihu`` (and ``kuairec`` / ``yoochoose`` once their
  train files exist), the DreamRec replay files with their given 8:1:1 session
  split; see :func:`build_shards` and the end of this docstring.

Leave-one-out split rule, for a user with full (filtered) chronological sequence
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

    {"format": "recsys-dist/seq-v1", "dataset": str, "protocol": "leave_one_out",
     "num_items": N, "num_users": U, "max_len": L, "pad_id": 0,
     "min_history_len": 1, "filter": {...counts...},
     "splits": {split: {"num_samples": int,
                        "shards": [{"name", "num_samples", "sha256", "bytes"}]}},
     "train_item_counts_file": "item_counts.npy", "id_map_file": "id_map.json",
     "build": {...every build parameter...}}

Building is idempotent: when ``manifest.json`` at the destination has the same
``build`` block and its files exist with the recorded sizes, nothing is
written and the existing manifest is returned.

Session split (``protocol: "session_split"``). Every row of
``<split>_data.tsv.gz`` becomes one sample of that split, in file order, none
dropped: history = the real (non-pad) items of ``seq`` + 1, oldest first,
*empty* for the first interaction of a session; target = ``next + 1``;
``user`` = the row's index in its split file (``0..n-1``), so each evaluated
row is its own "user" and counted once; ``j`` in the key = the target's
position in its session. Item ids are ``raw + 1`` (``1..item_num`` of
``data_statis.json``, 0 = pad) whether or not an item occurs. Train rows are
shuffled once (as above); val/test stay in file order. Differences from the
leave-one-out manifest: ``"min_history_len": 0``, ``"num_users"`` = rows of the
largest split (user indices of every split are below it), ``"stats"`` (per-split
rows / sessions / empty histories) instead of ``"filter"``, and::

    item_counts.npy   int64 (num_items + 1,): interactions with each item in the
                      train split, each counted once (every row's target, which
                      covers every item of every train history; row 0 = 0)
    id_map.json       {"items": [null, 0, 1, ..., item_num - 1] (raw ids),
                       "sessions": {split: [session index of row 0, 1, ...]}}
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
from typing import Any, Callable, Dict, List, Optional, Tuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm
from webdataset import TarWriter

from .schema import (
    FORMAT,
    ID_MAP_NAME,
    ITEM_COUNTS_NAME,
    TARGET_COUNTS_NAME,
    LEAVE_ONE_OUT,
    MANIFEST_NAME,
    PAD_ID,
    SESSION_SPLIT,
    SPLITS,
    encode_sample,
    is_shard_name,
    manifest_min_history_len,
    manifest_protocol,
    shard_name,
)
from .sources import (
    DATASETS,
    SESSION_DATASETS,
    SESSION_STATIS_FILE,
    SequenceData,
    SessionData,
    dataset_path,
    dataset_protocol,
    load_sequences,
    load_session_splits,
    session_item_counts,
    session_split_file,
)

log = logging.getLogger(__name__)
BUILDER_VERSION = 2  # 2: val/test samples carry the whole seen set (seen.i32) when the history is cut
DEFAULT_MAX_LEN = {LEAVE_ONE_OUT: 50, SESSION_SPLIT: 10}
DEFAULT_MIN_COUNT = 5
# (user, j, history, target, seen or None) of the i-th sample of a split
SampleFn = Callable[[int], Tuple[int, int, np.ndarray, int, Optional[np.ndarray]]]


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


def train_target_counts(data: SequenceData, train_prefixes_per_user: Optional[int] = None) -> np.ndarray:
    """int64 (num_items + 1,): how often each item is the *target* of a train sample (row 0 = 0).

    Train targets are ``s_j`` for ``j = 2..n-2`` (the last K of them with
    ``train_prefixes_per_user=K``), so this is the arrival distribution of in-batch negatives;
    :func:`train_item_counts` (every train-history occurrence) is the popularity ranker's."""
    lengths = data.lengths()
    user_of = np.repeat(np.arange(lengths.size), lengths)
    j = np.arange(data.items.size) - data.offsets[:-1][user_of] + 1  # 1-based position
    hi = lengths[user_of] - 2
    lo = np.full_like(hi, 2)
    if train_prefixes_per_user is not None:
        lo = np.maximum(lo, hi - train_prefixes_per_user + 1)
    counts = np.bincount(data.items[(j >= lo) & (j <= hi)], minlength=data.num_items + 1).astype(np.int64)
    counts[PAD_ID] = 0
    return counts


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
        for key in ("train_item_counts_file", "train_target_counts_file", "id_map_file"):
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
    num_samples: int,
    sample_at: SampleFn,
    samples_per_shard: int,
    compress: bool,
    pbar: Any,
    min_len: int = 1,
) -> Dict[str, Any]:
    """Write samples ``sample_at(0..num_samples-1)`` of ``split`` into shards (tmp file + rename each)."""
    shards: List[Dict[str, Any]] = []
    for index, start in enumerate(range(0, num_samples, samples_per_shard)):
        stop = min(start + samples_per_shard, num_samples)
        name = shard_name(split, index, compress)
        path = posixpath.join(root, name)
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as raw:
            hw = _HashingWriter(raw)
            gz = gzip.GzipFile(fileobj=hw, mode="wb", mtime=0) if compress else None
            sink = gz if gz is not None else hw
            with TarWriter(sink, encoder=False, mtime=0, compress=False, user="recsys", group="recsys") as tw:
                for i in range(start, stop):
                    u, j, history, target, seen = sample_at(i)
                    tw.write(encode_sample(split, u, j, history, target, min_len=min_len, seen=seen))
            if gz is not None:
                gz.close()
        _replace(fs, tmp, path)
        shards.append({"name": name, "num_samples": stop - start, "sha256": hw.sha.hexdigest(), "bytes": hw.bytes})
        pbar.update(stop - start)
    return {"num_samples": int(num_samples), "shards": shards}


def _loo_sampler(users: np.ndarray, js: np.ndarray, data: SequenceData, max_len: int,
                 with_seen: bool = False) -> SampleFn:
    """Leave-one-out samples; ``with_seen`` (val/test): the whole prefix ``s_1..s_{j-1}``
    as the seen set whenever the history keeps only its last ``max_len`` items."""
    items, offsets = data.items, data.offsets
    users_l, js_l = users.tolist(), js.tolist()

    def at(i: int) -> Tuple[int, int, np.ndarray, int, Optional[np.ndarray]]:
        u, j = users_l[i], js_l[i]
        base = int(offsets[u])
        h0 = max(0, j - 1 - max_len)
        seen = items[base: base + j - 1] if with_seen and h0 > 0 else None
        return u, j, items[base + h0: base + j - 1], int(items[base + j - 1]), seen

    return at


def _session_sampler(rows: np.ndarray, data: SessionData, split: str, max_len: int) -> SampleFn:
    """Session-split samples; val/test carry the session's whole prefix when it was cut."""
    sp = data.splits[split]
    rows_l, pos, tgt, off = rows.tolist(), sp.positions, sp.targets, sp.history_offsets
    with_seen = split != "train"

    def at(i: int) -> Tuple[int, int, np.ndarray, int, Optional[np.ndarray]]:
        r = rows_l[i]
        lo, hi = int(off[r]), int(off[r + 1])
        h0 = max(lo, hi - max_len)
        seen = sp.history_items[lo:hi] if with_seen and h0 > lo else None
        return r, int(pos[r]), sp.history_items[h0:hi], int(tgt[r]), seen

    return at


def _up_to_date(fs: Any, root: str, build: Dict[str, Any], source_present: bool, force: bool,
                out: str) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """``(existing manifest or None, that manifest if nothing needs rebuilding else None)``."""
    existing = _read_json(fs, posixpath.join(root, MANIFEST_NAME))
    if existing is None or force:
        return existing, None
    old_build = existing.get("build")
    if not source_present and isinstance(old_build, dict):
        # raw data not present here (e.g. a training node): accept a prebuilt
        # manifest whose parameters match, whatever source size it recorded
        old_build = {**old_build, "source": build["source"]}
    if old_build == build and _manifest_is_complete(fs, root, existing):
        log.info("shards at %s are up to date; skipping build", out)
        try:  # manifests written before these keys existed are leave-one-out
            existing.setdefault("protocol", manifest_protocol(existing))
            existing.setdefault("min_history_len", manifest_min_history_len(existing))
        except (TypeError, ValueError):
            return existing, None
        return existing, existing
    return existing, None


def _write_all(
    fs: Any,
    root: str,
    existing: Optional[Dict[str, Any]],
    dataset: str,
    samplers: Dict[str, Tuple[int, SampleFn]],
    samples_per_shard: int,
    compress: bool,
    min_len: int,
    progress: Optional[bool],
    item_counts: Callable[[], np.ndarray],
    target_counts: Callable[[], np.ndarray],
    id_map: Callable[[], Dict[str, Any]],
    manifest_head: Dict[str, Any],
    build: Dict[str, Any],
) -> Dict[str, Any]:
    """Write every split, item_counts.npy, id_map.json, then manifest.json (last), then drop stale shards."""
    manifest_path = posixpath.join(root, MANIFEST_NAME)
    fs.makedirs(root, exist_ok=True)
    if existing is not None and fs.exists(manifest_path):
        fs.rm(manifest_path)  # never leave a manifest that points at shards being rewritten

    total = sum(n for n, _ in samplers.values())
    disable = None if progress is None else not progress
    splits: Dict[str, Any] = {}
    with tqdm(total=total, desc=f"shards {dataset}", unit="sample", disable=disable) as pbar:
        for split in SPLITS:
            n, at = samplers[split]
            splits[split] = _write_split(fs, root, split, n, at, samples_per_shard, compress, pbar, min_len)

    for name, counts in ((ITEM_COUNTS_NAME, item_counts), (TARGET_COUNTS_NAME, target_counts)):
        buf = io.BytesIO()
        np.save(buf, counts(), allow_pickle=False)
        _write_bytes_atomic(fs, posixpath.join(root, name), buf.getvalue())
    _write_bytes_atomic(fs, posixpath.join(root, ID_MAP_NAME), json.dumps(id_map()).encode("utf-8"))

    manifest: Dict[str, Any] = {
        **manifest_head,
        "splits": splits,
        "train_item_counts_file": ITEM_COUNTS_NAME,
        "train_target_counts_file": TARGET_COUNTS_NAME,
        "id_map_file": ID_MAP_NAME,
        "build": build,
    }
    _write_bytes_atomic(fs, manifest_path, json.dumps(manifest, indent=1).encode("utf-8"))

    remove_stale_shards(fs, root, splits)
    return manifest


def remove_stale_shards(fs: Any, root: str, splits: Dict[str, Any]) -> None:
    """Delete shards (and shard tmp files) of an earlier build that the new manifest's
    ``splits`` do not reference."""
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


def build_shards(
    dataset: str,
    out: str,
    data_dir: Optional[str] = None,
    max_len: Optional[int] = None,
    train_prefixes_per_user: Optional[int] = None,
    samples_per_shard: int = 20000,
    min_item_count: Optional[int] = None,
    min_user_count: Optional[int] = None,
    seed: int = 0,
    max_users: Optional[int] = None,
    compress: bool = False,
    force: bool = False,
    progress: Optional[bool] = None,
    max_rows: Optional[int] = None,
) -> Dict[str, Any]:
    """Build train/val/test shards of ``dataset`` into ``out`` and return the manifest.

    Args:
        dataset: leave-one-out (:data:`shards.sources.DATASETS`: ``"ml-1m"``, ``"amazon-beauty"``)
            or session-split (:data:`shards.sources.SESSION_DATASETS`: ``"zhihu"``, ``"kuairec"``,
            ``"yoochoose"``; the staged kuairec / yoochoose lack ``train_data.tsv.gz`` and raise
            :class:`FileNotFoundError` naming it).
        out: destination directory, plain path or fsspec URL (``file://``, ``s3://``).
        data_dir: dataset root; default ``$RECSYS_DATA_DIR`` or ``<repo>/../shared/datasets``.
        max_len: histories keep their last ``max_len`` items (items, >= 1); default 50
            (leave-one-out) or 10 (session split, whose histories have at most 10 items).
        train_prefixes_per_user: keep only each user's last K train prefixes (None = all;
            leave-one-out only).
        samples_per_shard: samples per tar file (the last shard of a split may hold fewer).
        min_item_count, min_user_count: iterated k-core thresholds (interactions; default 5;
            leave-one-out only: the session split is used unfiltered).
        seed: seed of the one-off train shuffle.
        max_users: leave-one-out: keep only the first N users (ascending raw id) after
            filtering; session split: same as ``max_rows`` (a user is a row there).
        compress: gzip the tars (``.tar.gz``); the reader handles both.
        force: rebuild even if an identical build already exists at ``out``.
        progress: show a tqdm bar (None = only on a terminal).
        max_rows: session split only: keep the first N rows (file order) of every split.

    Returns:
        The manifest dict (also written to ``<out>/manifest.json``).
    """
    protocol = dataset_protocol(dataset)
    if max_len is None:
        max_len = DEFAULT_MAX_LEN[protocol]
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if protocol == SESSION_SPLIT:
        if train_prefixes_per_user is not None:
            raise ValueError(f"train_prefixes_per_user applies to leave-one-out datasets; {dataset!r} is "
                             "session-split (one sample per row of the given train file)")
        if min_item_count is not None or min_user_count is not None:
            raise ValueError(f"min_item_count / min_user_count apply to leave-one-out datasets; {dataset!r} is "
                             "session-split and used unfiltered")
        if max_rows is not None and max_users is not None and max_rows != max_users:
            raise ValueError(f"max_rows={max_rows} and max_users={max_users} disagree (both mean rows per split here)")
        return _build_session_shards(dataset, out, data_dir, int(max_len), int(samples_per_shard), int(seed),
                                     max_rows if max_rows is not None else max_users, bool(compress), force, progress)
    if max_rows is not None:
        raise ValueError(f"max_rows applies to session-split datasets; use max_users for {dataset!r}")
    min_item_count = DEFAULT_MIN_COUNT if min_item_count is None else min_item_count
    min_user_count = DEFAULT_MIN_COUNT if min_user_count is None else min_user_count
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
    existing, done = _up_to_date(fs, root, build, os.path.exists(src), force, out)
    if done is not None:
        return done
    data = load_sequences(dataset, data_dir, min_item_count, min_user_count, max_users)
    samples = split_samples(data.lengths(), train_prefixes_per_user)
    tu, tj = samples["train"]
    perm = np.random.default_rng(seed).permutation(tu.size)
    samples["train"] = (tu[perm], tj[perm])
    samplers = {split: (int(u.size), _loo_sampler(u, j, data, max_len, with_seen=split != "train"))
                for split, (u, j) in samples.items()}
    head = {
        "format": FORMAT,
        "dataset": dataset,
        "protocol": LEAVE_ONE_OUT,
        "num_items": data.num_items,
        "num_users": data.num_users,
        "max_len": int(max_len),
        "pad_id": PAD_ID,
        "min_history_len": 1,
        "seen_sets": True,
        "filter": data.stats,
    }
    return _write_all(
        fs, root, existing, dataset, samplers, samples_per_shard, compress, 1, progress,
        item_counts=lambda: train_item_counts(data),
        target_counts=lambda: train_target_counts(data, train_prefixes_per_user),
        id_map=lambda: {"users": _jsonable_ids(data.raw_user_ids), "items": [None] + _jsonable_ids(data.raw_item_ids)},
        manifest_head=head, build=build,
    )


def _build_session_shards(
    dataset: str,
    out: str,
    data_dir: Optional[str],
    max_len: int,
    samples_per_shard: int,
    seed: int,
    max_rows: Optional[int],
    compress: bool,
    force: bool,
    progress: Optional[bool],
) -> Dict[str, Any]:
    """:func:`build_shards` for a session-split (DreamRec replay) dataset; see the module docstring."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    src = dataset_path(dataset, data_dir)
    names = [SESSION_STATIS_FILE] + [session_split_file(s) for s in SPLITS]
    sizes = {n: (os.path.getsize(os.path.join(src, n)) if os.path.exists(os.path.join(src, n)) else None)
             for n in names}
    build = {
        "format": FORMAT,
        "builder_version": BUILDER_VERSION,
        "dataset": dataset,
        "source": {"dir": SESSION_DATASETS[dataset], "bytes": sizes},
        "max_len": int(max_len),
        "samples_per_shard": int(samples_per_shard),
        "seed": int(seed),
        "max_rows": None if max_rows is None else int(max_rows),
        "compress": bool(compress),
        "split_rule": "session split as given (train/val/test files), every row kept, no filter",
        "item_index": "raw id + 1 -> 1..item_num",
    }
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/") or "/"
    present = all(v is not None for v in sizes.values())
    existing, done = _up_to_date(fs, root, build, present, force, out)
    if done is not None:
        return done
    data = load_session_splits(dataset, data_dir, max_rows)  # FileNotFoundError naming missing files
    rows = {s: np.arange(data.splits[s].num_rows, dtype=np.int64) for s in SPLITS}
    rows["train"] = rows["train"][np.random.default_rng(seed).permutation(rows["train"].size)]
    samplers = {s: (int(r.size), _session_sampler(r, data, s, max_len)) for s, r in rows.items()}
    head = {
        "format": FORMAT,
        "dataset": dataset,
        "protocol": SESSION_SPLIT,
        "num_items": data.num_items,
        "num_users": data.num_users,
        "max_len": int(max_len),
        "pad_id": PAD_ID,
        "min_history_len": 0,
        "seen_sets": True,
        "stats": data.stats,
    }
    return _write_all(
        fs, root, existing, dataset, samplers, samples_per_shard, compress, 0, progress,
        item_counts=lambda: session_item_counts(data.splits["train"], data.num_items),
        target_counts=lambda: _bincount_targets(data.splits["train"].targets, data.num_items),
        id_map=lambda: {"items": [None] + list(range(data.num_items)),
                        "sessions": {s: data.splits[s].sessions.tolist() for s in SPLITS}},
        manifest_head=head, build=build,
    )


def _bincount_targets(targets: np.ndarray, num_items: int) -> np.ndarray:
    counts = np.bincount(targets, minlength=num_items + 1).astype(np.int64)
    counts[PAD_ID] = 0
    return counts


def summarize(manifest: Dict[str, Any]) -> str:
    """One human-readable paragraph describing a manifest."""
    protocol = manifest.get("protocol", LEAVE_ONE_OUT)
    if protocol == SESSION_SPLIT:
        lines = [
            f"dataset {manifest['dataset']} ({protocol}: one sample per row, user = row index): "
            f"{manifest['num_items']} items (embedding rows {manifest['num_items'] + 1}, 0 = pad), "
            f"max_len {manifest['max_len']}, empty histories allowed",
        ]
        for split, st in (manifest.get("stats") or {}).get("splits", {}).items():
            lines.append(
                f"{split:>5}: {st.get('rows')} rows, {st.get('sessions')} sessions, "
                f"{st.get('empty_history_rows')} empty histories"
            )
    else:
        lines = [
            f"dataset {manifest['dataset']}: {manifest['num_users']} users, {manifest['num_items']} items "
            f"(embedding rows {manifest['num_items'] + 1}, 0 = pad), max_len {manifest['max_len']}",
        ]
    f = manifest.get("filter") or {}
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
