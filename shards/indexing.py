"""Re-indexing and grouping of interactions (numpy, no I/O).

* :func:`dense_codes`: raw ids (strings as read) -> int64 dense codes in ascending raw id
  order (as integers when every id parses as one and no two spellings collide, else strings).
* :func:`kcore_filter`: the iterated k-core (the unique maximal subset meeting both thresholds).
* :func:`csr_offsets` / :func:`segment_bounds`: CSR offsets of sorted group codes, and each
  group's ``(train_end, valid_end)`` from per-entry segment codes (0 train, 1 valid, 2 test).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def dense_codes(values: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """``(codes, uniq)``: int64 (n,) dense codes in ascending raw id order, and the raw ids.

    Raw ids are int64 when every value parses as an integer and no two spellings collide
    (``7`` / ``07``), else strings (string order)."""
    try:
        ints = np.fromiter(map(int, values), np.int64, count=len(values))
    except (ValueError, OverflowError):
        ints = None
    if ints is not None:
        uniq, inv = np.unique(ints, return_inverse=True)
        if uniq.size == len(set(values)):
            return inv.astype(np.int64).ravel(), uniq
    uniq, inv = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return inv.astype(np.int64).ravel(), uniq


def kcore_filter(user_codes: np.ndarray, item_codes: np.ndarray, min_item_count: int,
                 min_user_count: int, keep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int]:
    """Iterated k-core over interactions: drop items with fewer than ``min_item_count``, then
    users with fewer than ``min_user_count`` interactions, until nothing changes (the unique
    maximal subset meeting both). Returns ``(keep, iterations)``, bool (n,), starting from
    ``keep`` (default all)."""
    keep = np.ones(user_codes.shape[0], dtype=bool) if keep is None else keep.copy()
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


def csr_offsets(group: np.ndarray, n_groups: int, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """int64 (n_groups + 1,) offsets of ``group`` (sorted dense codes): entry ``k`` of ``group``
    spans ``weights[k]`` (int, default 1) slots."""
    off = np.zeros(n_groups + 1, np.int64)
    np.cumsum(np.bincount(group, weights, minlength=n_groups).astype(np.int64, copy=False), out=off[1:])
    return off


def segment_bounds(group: np.ndarray, segment: np.ndarray, n_groups: int) -> np.ndarray:
    """int64 (n_groups, 2) ``(train_end, valid_end)`` per group: the counts of its entries
    with ``segment`` 0 (train) and 0 or 1 (train or valid); ``group``, ``segment``: (n,)."""
    tr = np.bincount(group, weights=segment == 0, minlength=n_groups).astype(np.int64)
    va = np.bincount(group, weights=segment == 1, minlength=n_groups).astype(np.int64)
    return np.stack([tr, tr + va], axis=1)

