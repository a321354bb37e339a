"""Raw interaction sources -> filtered, re-indexed per-user item sequences.

Supported datasets (DiffuRec leave-one-out conversion, see
``<data dir>/README.md``): ``ml-1m`` and ``amazon-beauty``. Each is a gzip TSV
with header ``user, item, pos, split, raw_user_id, raw_item_id``; ``pos`` is
the 0-based chronological position in the user's sequence. The ``split``
column and the pre-computed ``user``/``item`` indices are ignored: sequences
are rebuilt from ``(raw_user_id, pos)`` order and ``raw_item_id``.

Processing (:func:`load_sequences`):

1. order every user's interactions by ``pos``;
2. iterated k-core filter: drop the interactions of items with fewer than
   ``min_item_count`` interactions, then of users with fewer than
   ``min_user_count``, and repeat until nothing changes (the result is the
   unique maximal sub-dataset meeting both thresholds);
3. optionally keep only the first ``max_users`` users (by ascending raw user
   id) *after* the filter;
4. re-index: users -> ``0..U-1`` by ascending raw user id; items that occur in
   the kept sequences -> ``1..N`` by ascending raw item id (numeric order when
   all raw ids are integers, else string order). ``0`` is the padding id.
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

DATASETS: Dict[str, str] = {
    "ml-1m": "ml-1m/raw/diffurec/interactions.tsv.gz",
    "amazon-beauty": "amazon-beauty/raw/diffurec/interactions.tsv.gz",
}
DATA_DIR_ENV = "RECSYS_DATA_DIR"
_COLUMNS = ("pos", "raw_user_id", "raw_item_id")


def repo_root() -> Path:
    """Root of the recsys-dist checkout (the parent of the ``shards`` package)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """``$RECSYS_DATA_DIR`` if set, else ``<repo root>/../shared/datasets``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    return str((repo_root().parent / "shared" / "datasets").resolve())


def dataset_path(dataset: str, data_dir: Optional[str] = None) -> str:
    """Path of the interactions file of ``dataset`` under ``data_dir`` (default :func:`default_data_dir`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return os.path.join(data_dir or default_data_dir(), DATASETS[dataset])


@dataclass
class SequenceData:
    """Filtered, re-indexed per-user sequences in CSR layout.

    Attributes:
        items: int32 array (total_interactions,), item ids in ``1..num_items``;
            user ``u``'s chronological sequence is ``items[offsets[u]:offsets[u+1]]``.
        offsets: int64 array (num_users + 1,).
        raw_user_ids: array (num_users,), raw id of each dense user index.
        raw_item_ids: array (num_items,), raw id of item ``i`` at position ``i - 1``.
        stats: counts before/after filtering (JSON-serialisable).
    """

    items: np.ndarray
    offsets: np.ndarray
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def num_items(self) -> int:
        return int(self.raw_item_ids.size)

    def sequence(self, user: int) -> np.ndarray:
        """Chronological item ids of dense user ``user``, shape (n,)."""
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def lengths(self) -> np.ndarray:
        """Sequence length of every user, int64 (num_users,)."""
        return np.diff(self.offsets)


def _header_indices(path: str) -> Tuple[int, ...]:
    with gzip.open(path, "rt", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    try:
        return tuple(header.index(c) for c in _COLUMNS)
    except ValueError:
        raise ValueError(f"{path}: header {header} lacks one of the columns {list(_COLUMNS)}") from None


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = _header_indices(path)
    try:  # fast path: integer raw ids
        with gzip.open(path, "rt", newline="") as f:
            arr = np.loadtxt(f, delimiter="\t", skiprows=1, usecols=idx, dtype=np.int64, ndmin=2)
        pos, users, items = arr[:, 0], arr[:, 1], arr[:, 2]
    except ValueError:  # raw ids are not all integers: keep them as strings
        pos_l: List[int] = []
        users_l: List[str] = []
        items_l: List[str] = []
        with gzip.open(path, "rt", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            next(reader)
            for lineno, row in enumerate(reader, start=2):
                try:
                    pos_l.append(int(row[idx[0]]))
                    users_l.append(row[idx[1]])
                    items_l.append(row[idx[2]])
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: malformed row {row!r} ({e})") from None
        pos = np.asarray(pos_l, dtype=np.int64)
        users = np.asarray(users_l)
        items = np.asarray(items_l)
    for a in (pos, users, items):
        a.setflags(write=False)
    return pos, users, items


def load_interactions(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``(pos, raw_user_id, raw_item_id)`` columns of an interactions TSV(.gz).

    Returns three read-only arrays of shape (num_interactions,): ``pos`` int64,
    raw user / item ids as int64 (or str when not all are integers). Results
    are cached in-process per (path, mtime, size).
    """
    st = os.stat(path)
    return _load_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def kcore_filter(
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    min_item_count: int,
    min_user_count: int,
) -> Tuple[np.ndarray, int]:
    """Iterated k-core filter over interactions.

    Args:
        user_codes, item_codes: int64 arrays (num_interactions,) of dense codes.
        min_item_count: keep items with at least this many interactions.
        min_user_count: keep users with at least this many interactions.

    Returns:
        ``(keep, iterations)``: bool mask (num_interactions,) and the number of
        passes until stable.
    """
    keep = np.ones(user_codes.shape[0], dtype=bool)
    n_items = int(item_codes.max()) + 1 if item_codes.size else 0
    n_users = int(user_codes.max()) + 1 if user_codes.size else 0
    iterations = 0
    while True:
        iterations += 1
        before = int(keep.sum())
        ic = np.bincount(item_codes[keep], minlength=n_items)
        keep &= ic[item_codes] >= min_item_count
        uc = np.bincount(user_codes[keep], minlength=n_users)
        keep &= uc[user_codes] >= min_user_count
        if int(keep.sum()) == before:
            return keep, iterations


def load_sequences(
    dataset: str,
    data_dir: Optional[str] = None,
    min_item_count: int = 5,
    min_user_count: int = 5,
    max_users: Optional[int] = None,
) -> SequenceData:
    """Load ``dataset`` and return filtered, re-indexed chronological sequences.

    See the module docstring for the exact rules. ``max_users`` keeps the first
    N users (ascending raw user id) after the k-core filter; items are then
    re-indexed over the kept users only, so ``num_items`` of a slice is the
    number of distinct items in it.
    """
    path = dataset_path(dataset, data_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found (set ${DATA_DIR_ENV} or pass data_dir; default {default_data_dir()})"
        )
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
    pos, raw_users, raw_items = load_interactions(path)
    uniq_users, ucode = np.unique(raw_users, return_inverse=True)
    uniq_items, icode = np.unique(raw_items, return_inverse=True)
    ucode = ucode.astype(np.int64).ravel()
    icode = icode.astype(np.int64).ravel()

    order = np.lexsort((pos, ucode))  # by user, then chronological position
    ucode, icode, pos_s = ucode[order], icode[order], pos[order]
    dup = (ucode[1:] == ucode[:-1]) & (pos_s[1:] == pos_s[:-1])
    if dup.any():
        k = int(np.flatnonzero(dup)[0])
        raise ValueError(f"{path}: user {uniq_users[ucode[k]]!r} has two interactions at pos {pos_s[k]}")

    keep, iterations = kcore_filter(ucode, icode, min_item_count, min_user_count)
    ucode, icode = ucode[keep], icode[keep]
    users_after = int(np.unique(ucode).size)
    items_after = int(np.unique(icode).size)
    inter_after = int(ucode.size)

    kept_users = np.unique(ucode)  # ascending code == ascending raw id
    if max_users is not None and kept_users.size > max_users:
        sel = np.isin(ucode, kept_users[:max_users])
        ucode, icode = ucode[sel], icode[sel]
        kept_users = kept_users[:max_users]

    # users -> 0..U-1 ; items -> 1..N (ascending raw id)
    user_new = np.searchsorted(kept_users, ucode)
    kept_items = np.unique(icode)
    item_new = (np.searchsorted(kept_items, icode) + 1).astype(np.int32)
    counts = np.bincount(user_new, minlength=kept_users.size)
    offsets = np.zeros(kept_users.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    stats: Dict[str, object] = {
        "min_item_count": int(min_item_count),
        "min_user_count": int(min_user_count),
        "iterations": iterations,
        "raw_users": int(uniq_users.size),
        "raw_items": int(uniq_items.size),
        "raw_interactions": int(pos.size),
        "filtered_users": users_after,
        "filtered_items": items_after,
        "filtered_interactions": inter_after,
        "max_users": max_users,
        "users": int(kept_users.size),
        "items": int(kept_items.size),
        "interactions": int(item_new.size),
    }
    return SequenceData(
        items=item_new,
        offsets=offsets,
        raw_user_ids=uniq_users[kept_users],
        raw_item_ids=uniq_items[kept_items],
        stats=stats,
    )
