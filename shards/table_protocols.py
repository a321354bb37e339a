"""The protocols over table sources: :class:`~shards.table.Table` columns -> :class:`~shards.records.Records`.

* :func:`load_split_one`: ``leave_one_out`` / ``temporal`` over one file, after the iterated
  k-core and ``max_users``;
* :func:`load_split_tables`: ``session`` / ``given`` over one file per split, ids re-indexed
  over all splits.

Re-indexing: users (sessions) -> records in ascending raw id order, items -> ``1..N`` by
ascending raw id over the kept interactions (:func:`~shards.indexing.dense_codes`: integer
order when every raw id parses as one, else string order); ``0`` is padding and never
stored. A record's interactions are in ``time`` order (stable: ties keep file order), or
file order without a time column; with ``time_is_position`` a repeated position within a
user is an error naming both lines.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .indexing import csr_offsets, dense_codes, kcore_filter, segment_bounds
from .records import SEGMENTS, Records
from .table import Table, line_of, read_table, stored_times, table_times

if TYPE_CHECKING:
    from .source import SourceConfig

LOO_MIN_LENGTH = 3  # leave-one-out needs >= 1 train, 1 valid and 1 test interaction


def _check_positions(table_of: Callable[[int], Table], group: np.ndarray, t: np.ndarray, rows: np.ndarray) -> None:
    """Raise if two interactions of one group (already sorted by ``(group, t)``) share a position.

    ``rows`` are the interactions' file rows (same order); ``table_of(k)`` the table of sorted entry k."""
    dup = np.flatnonzero((group[1:] == group[:-1]) & (t[1:] == t[:-1]))
    if dup.size:
        k = int(dup[0])
        a, b = int(rows[k]), int(rows[k + 1])
        tab = table_of(k + 1)
        first = line_of(table_of(k).url, tab.sep, tab.header, a)
        raise tab.fail(b, "time", f"position {t[k + 1].item()!r} repeats for one user (first at line {first} of "
                                  f"{table_of(k).url}); time_is_position needs unique positions per user")


# --------------------------------------------------------------------------- protocols on one table


def load_split_one(cfg: "SourceConfig", url: str) -> Records:
    """``leave_one_out`` / ``temporal`` over one table file."""
    table = read_table(url, cfg)
    n_raw = table.rows
    ucode, uniq_users = dense_codes(table.columns["user"])
    icode, uniq_items = dense_codes(table.columns["item"])
    t = table_times(table)
    rows = np.arange(n_raw, dtype=np.int64)
    order = np.argsort(ucode, kind="stable") if t is None else np.lexsort((t, ucode))
    ucode, icode, rows = ucode[order], icode[order], rows[order]
    ts = None if t is None else t[order]
    if cfg.time_is_position and ts is not None:
        _check_positions(lambda k: table, ucode, ts, rows)

    keep, iterations = kcore_filter(ucode, icode, cfg.min_item_count, cfg.min_user_count)
    stats: Dict[str, Any] = {
        "protocol": cfg.protocol, "format": "table", "min_user_count": cfg.min_user_count,
        "min_item_count": cfg.min_item_count, "iterations": iterations,
        "raw_users": int(uniq_users.size), "raw_items": int(uniq_items.size), "raw_interactions": n_raw,
        "filtered_users": int(np.unique(ucode[keep]).size), "filtered_items": int(np.unique(icode[keep]).size),
        "filtered_interactions": int(keep.sum()),
    }
    if cfg.protocol == "leave_one_out":
        short = kcore_filter(ucode, icode, cfg.min_item_count, max(cfg.min_user_count, LOO_MIN_LENGTH), keep)[0]
        stats["short_users_dropped"] = stats["filtered_users"] - int(np.unique(ucode[short]).size)
        stats["short_interactions_dropped"] = int(keep.sum() - short.sum())
        keep = short
    if not keep.any():
        raise ValueError(f"{url}: nothing left after the k-core (min_user_count={cfg.min_user_count}, "
                         f"min_item_count={cfg.min_item_count}"
                         + (f", leave_one_out needs >= {LOO_MIN_LENGTH} per user" if cfg.protocol == "leave_one_out"
                            else "")
                         + f"): 0 users / 0 items / 0 interactions left of {stats['raw_users']} users / "
                         f"{stats['raw_items']} items / {n_raw} interactions")
    ucode, icode, rows = ucode[keep], icode[keep], rows[keep]
    ts = None if ts is None else ts[keep]

    kept_users = np.unique(ucode)  # ascending code == ascending raw id
    if cfg.max_users is not None and kept_users.size > cfg.max_users:
        kept_users = kept_users[: cfg.max_users]
        sel = ucode <= kept_users[-1]
        ucode, icode, rows = ucode[sel], icode[sel], rows[sel]
        ts = None if ts is None else ts[sel]
    user = np.searchsorted(kept_users, ucode)
    kept_items = np.unique(icode)
    items = (np.searchsorted(kept_items, icode) + 1).astype(np.int32)
    off = csr_offsets(user, kept_users.size)
    lens = np.diff(off)
    if cfg.protocol == "leave_one_out":
        bounds = np.stack([lens - 2, lens - 1], axis=1)
    else:
        bounds, stats["temporal_cut"] = _temporal_bounds(user, rows if ts is None else ts, rows, kept_users.size,
                                                        cfg.temporal_ratio)
        # per user: train ++ valid ++ test, each in time order = global time order within the user
        stats["users_without_train"] = int((bounds[:, 0] == 0).sum())
    stats.update({"max_users": cfg.max_users, "users": int(kept_users.size), "items": int(kept_items.size),
                  "interactions": int(items.size)})
    return Records(off, items, bounds.astype(np.int64), int(kept_items.size), cfg.protocol, stored_times(ts),
                   uniq_users[kept_users], uniq_items[kept_items], stats)


def _temporal_bounds(user: np.ndarray, t: np.ndarray, rows: np.ndarray, n_users: int,
                     ratio: Sequence[float]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Per-user ``(train_end, valid_end)`` of a global time-quantile split.

    ``user``, ``t``, ``rows``: the kept interactions sorted by ``(user, t)``; all of them sorted
    by ``(t, file row)``: the first ``floor(r0 * n)`` are train, up to ``floor((r0 + r1) * n)``
    valid, the rest test (ties at a cut are split by file order)."""
    n = user.size
    g = np.lexsort((rows, t))  # global time order, ties by file order
    c1 = int(math.floor(ratio[0] * n + 1e-9))
    c2 = max(c1, min(n, int(math.floor((ratio[0] + ratio[1]) * n + 1e-9))))
    seg = np.empty(n, np.int8)
    seg[g[:c1]], seg[g[c1:c2]], seg[g[c2:]] = 0, 1, 2
    cut = {"train_interactions": c1, "valid_interactions": c2 - c1, "test_interactions": n - c2,
           "valid_from_time": t[g[c1]].item() if c1 < n else None,
           "test_from_time": t[g[c2]].item() if c2 < n else None}
    return segment_bounds(user, seg, n_users), cut


# --------------------------------------------------------------------------- per-split tables


def load_split_tables(cfg: "SourceConfig", urls: Dict[str, str]) -> Records:
    """``session`` / ``given`` over one table file per split (ids re-indexed over all splits)."""
    tables = [read_table(urls[s], cfg) for s in SEGMENTS]
    sizes = np.array([tb.rows for tb in tables])
    split = np.repeat(np.arange(3, dtype=np.int64), sizes)
    rows = np.concatenate([np.arange(k, dtype=np.int64) for k in sizes])
    ucode, uniq_users = dense_codes([v for tb in tables for v in tb.columns["user"]])
    icode, uniq_items = dense_codes([v for tb in tables for v in tb.columns["item"]])
    t: Optional[np.ndarray] = None
    if cfg.time is not None:
        tt = [table_times(tb) for tb in tables]
        dtype = np.float64 if any(x.dtype.kind == "f" for x in tt) else np.int64  # type: ignore[union-attr]
        t = np.concatenate([x.astype(dtype) for x in tt])  # type: ignore[union-attr]
    # session: records are (split, session); given: records are users, their splits concatenated
    major = (split, ucode) if cfg.protocol == "session" else (ucode, split)
    keys = (rows,) + (() if t is None else (t,)) + (major[1], major[0])
    order = np.lexsort(keys)
    split, ucode, icode, rows = split[order], ucode[order], icode[order], rows[order]
    ts = None if t is None else t[order]
    gid = split * (int(ucode.max()) + 1 if ucode.size else 1) + ucode  # (split, user) as one code
    if cfg.time_is_position and ts is not None:
        _check_positions(lambda k: tables[int(split[k])], gid, ts, rows)
    kept_items = np.unique(icode)
    items = (np.searchsorted(kept_items, icode) + 1).astype(np.int32)
    if cfg.protocol == "session":
        uk, first, rec = np.unique(gid, return_index=True, return_inverse=True)  # gid ascends here
        rec_split, rec_user = split[first], ucode[first]
        off = csr_offsets(rec.ravel(), uk.size)
        lens = np.diff(off)
        bounds = np.zeros((uk.size, 2), np.int64)  # test sessions: (0, 0)
        bounds[rec_split == 0] = lens[rec_split == 0, None]  # train: (n, n)
        bounds[rec_split == 1, 1] = lens[rec_split == 1]  # valid: (0, n)
        raw_rec = uniq_users[rec_user]
        stats_rec = {"sessions": {s: int((rec_split == i).sum()) for i, s in enumerate(SEGMENTS)}}
    else:
        kept_users = np.unique(ucode)
        user = np.searchsorted(kept_users, ucode)
        off = csr_offsets(user, kept_users.size)
        bounds = segment_bounds(user, split, kept_users.size)
        raw_rec = uniq_users[kept_users]
        stats_rec = {"users": int(kept_users.size)}
    stats = {"protocol": cfg.protocol, "format": "table", "items": int(kept_items.size),
             "raw_interactions": {s: int(k) for s, k in zip(SEGMENTS, sizes)}, **stats_rec}
    return Records(off, items, bounds.astype(np.int64), int(kept_items.size), cfg.protocol, stored_times(ts),
                   raw_rec, uniq_items[kept_items], stats)
