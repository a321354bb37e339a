"""Per-record item sequences with split segments: what a data source yields and a shard stores.

A *record* is one user's chronological sequence (leave-one-out and temporal protocols) or
one session (session protocol). Its items are cut into three consecutive *segments*:

    items[off[r] : off[r] + train_end[r]]            train   (the model learns from these)
    items[off[r] + train_end[r] : off[r] + valid_end[r]]  valid
    items[off[r] + valid_end[r] : off[r + 1]]        test

so one pair of bounds per record expresses every protocol this project runs:

==================  =========================================================================
protocol            segments
==================  =========================================================================
``leave_one_out``   a user's whole sequence; ``train_end = n - 2``, ``valid_end = n - 1``
``temporal``        a user's sequence cut by global time quantiles (DiffRec's 0.8/0.1/0.1):
                    every train interaction precedes every valid one, which precedes test
``session``         a session of one given split: all of it train, or all valid, or all test
``given``           per-user split files (DiffRec's lists): train ++ valid ++ test, each in
                    file order
==================  =========================================================================

Sequential evaluation turns every position ``j`` of the valid (test) segment into one row
with history ``items[:j]`` of the record (for leave-one-out the test history includes the
valid item, the standard protocol; for a session its own prefix); set evaluation (DiffRec)
uses the train segment as the input and the segment as the target set.
Item ids are ``1..num_items``; ``0`` is padding and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

PROTOCOLS = ("leave_one_out", "temporal", "session", "given")
SEGMENTS = ("train", "valid", "test")


@dataclass
class Records:
    """Item sequences of ``R`` records, CSR-packed.

    Attributes:
        offsets: int64 (R + 1,), 0 .. len(items); record r is ``items[offsets[r]:offsets[r+1]]``.
        items: int32 (n,), item ids 1..num_items, oldest first within a record.
        bounds: int64 (R, 2): (train_end, valid_end) per record, relative to its start,
            ``0 <= train_end <= valid_end <= length``.
        num_items: size of the item vocabulary (ids 1..num_items; may exceed the ids used).
        protocol: one of :data:`PROTOCOLS`.
        times: int64 (n,) or None: the source's time (or position) column, per item.
        raw_record_ids: (R,) the source's user (session) ids, or None.
        raw_item_ids: (num_items,) the source's item id of item ``i + 1``, or None.
        stats: counts of the conversion (raw and kept users / items / interactions, ...).
    """

    offsets: np.ndarray
    items: np.ndarray
    bounds: np.ndarray
    num_items: int
    protocol: str
    times: Optional[np.ndarray] = None
    raw_record_ids: Optional[np.ndarray] = None
    raw_item_ids: Optional[np.ndarray] = None
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_records(self) -> int:
        return int(self.offsets.size - 1)

    def lengths(self) -> np.ndarray:
        """int64 (R,): items per record."""
        return np.diff(self.offsets)

    def segment_counts(self) -> Dict[str, int]:
        """Interactions in each segment, summed over records."""
        n = self.lengths()
        t, v = self.bounds[:, 0], self.bounds[:, 1]
        return {"train": int(t.sum()), "valid": int((v - t).sum()), "test": int((n - v).sum())}

    def validate(self, where: str = "records") -> None:
        """Raise ValueError (naming ``where`` and the first bad record) unless the arrays are
        consistent: monotone offsets, ids in 1..num_items, bounds within each record."""
        off, n = self.offsets, self.items.size
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
            raise ValueError(f"{where}: offsets are not monotone from 0 to {n}")
        if self.bounds.shape != (off.size - 1, 2):
            raise ValueError(f"{where}: bounds shape {self.bounds.shape}, expected ({off.size - 1}, 2)")
        if n and (int(self.items.min()) < 1 or int(self.items.max()) > self.num_items):
            r = int(np.searchsorted(off, int(np.flatnonzero((self.items < 1) | (self.items > self.num_items))[0]),
                                    side="right") - 1)
            raise ValueError(f"{where}: record {r} holds an item id outside 1..{self.num_items}")
        t, v = self.bounds[:, 0], self.bounds[:, 1]
        bad = (t < 0) | (v < t) | (v > np.diff(off))
        if bad.any():
            raise ValueError(f"{where}: record {int(np.flatnonzero(bad)[0])} has segment bounds outside its length")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"{where}: unknown protocol {self.protocol!r}; known: {list(PROTOCOLS)}")

    def select(self, keep: np.ndarray) -> "Records":
        """The records at positions ``keep`` (int array, ascending), ids unchanged."""
        keep = np.asarray(keep, np.int64)
        lens = self.lengths()[keep]
        starts = self.offsets[keep]
        off = np.zeros(keep.size + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        idx = np.arange(int(off[-1])) - np.repeat(off[:-1] - starts, lens)
        return Records(off, self.items[idx], self.bounds[keep], self.num_items, self.protocol,
                       None if self.times is None else self.times[idx],
                       None if self.raw_record_ids is None else self.raw_record_ids[keep],
                       self.raw_item_ids, dict(self.stats))


def id_map_json(a: Optional[np.ndarray]) -> Optional[List[Any]]:
    """Raw ids as JSON values (ints where they are integral, else strings)."""
    if a is None:
        return None
    return [int(x) if isinstance(x, (int, np.integer)) else str(x) for x in a.tolist()]
