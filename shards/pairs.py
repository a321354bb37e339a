"""DiffRec ``pairs_npy`` sources: one int ``(n, 2)`` ``[user, item]`` ``.npy`` per split -> ``given`` Records.

Users are the raw ids ``0..max`` over the three splits (a user without interactions is an
empty record), items raw + 1, ``num_items`` = max raw item + 1 (or ``cfg.num_items``, not
smaller); a record is the user's train ++ valid ++ test, each in file order. Arrays are read
without pickles; a negative id is an error naming the file, the 1-based row and the column.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Dict

import numpy as np

from .indexing import csr_offsets, segment_bounds
from .rawio import input_error, open_bytes
from .records import SEGMENTS, Records

if TYPE_CHECKING:
    from .source import SourceConfig


def _read_pairs(url: str) -> np.ndarray:
    """int64 (n, 2) ``[user, item]`` of a DiffRec ``.npy`` (no pickles), ids >= 0."""
    with open_bytes(url) as f:
        raw = f.read()
    try:
        a = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise input_error(url, None, None, f"not a plain .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != 2 or a.dtype.kind not in "iu":
        raise input_error(url, None, None, f"expected an int (n, 2) [user, item] array, got "
                                           f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    neg = np.flatnonzero((a < 0).any(1)) if a.dtype.kind == "i" else np.zeros(0, np.int64)
    if neg.size:
        r = int(neg[0])
        col = "user" if a[r, 0] < 0 else "item"
        raise input_error(url, r + 1, col, f"negative id {int(a[r, 0 if col == 'user' else 1])}", unit="row")
    return a.astype(np.int64)


def load_given_pairs(cfg: "SourceConfig", urls: Dict[str, str]) -> Records:
    """``given`` over DiffRec pairs: users ``0..max`` (raw), items raw + 1, each split in file order."""
    pairs = [_read_pairs(urls[s]) for s in SEGMENTS]
    nonempty = [p for p in pairs if p.size]
    num_users = max((int(p[:, 0].max()) + 1 for p in nonempty), default=0)
    max_item = max((int(p[:, 1].max()) + 1 for p in nonempty), default=0)
    num_items = max_item if cfg.num_items is None else cfg.num_items
    if num_items < max_item:
        raise ValueError(f"data.source.num_items: {cfg.num_items} < max raw item + 1 = {max_item} in "
                         f"{', '.join(urls.values())}")
    user = np.concatenate([p[:, 0] for p in pairs])
    item = np.concatenate([p[:, 1] for p in pairs]) + 1
    split = np.repeat(np.arange(3), [p.shape[0] for p in pairs])
    order = np.argsort(user, kind="stable")  # within a user: train, valid, test, each in file order
    off = csr_offsets(user[order], num_users)
    bounds = segment_bounds(user, split, num_users)
    stats = {"protocol": "given", "format": "pairs_npy", "users": num_users, "items": num_items,
             "raw_interactions": {s: int(p.shape[0]) for s, p in zip(SEGMENTS, pairs)},
             "users_without_interactions": int((np.diff(off) == 0).sum())}
    return Records(off, item[order].astype(np.int32), bounds, int(num_items), "given", None,
                   np.arange(num_users, dtype=np.int64), np.arange(num_items, dtype=np.int64), stats)

