"""Training and evaluation samples made from verified blocks of records, and their batches.

A sample is ``(record, j)``: the item at position ``j`` of the record is the target and
``items[:j]`` its history (the newest ``max_len`` of them are the model input; all of
them are the seen set that evaluation masks). Which ``j`` a split yields
(:func:`shards.format.sample_counts` counts the same):

* ``train``: ``j`` in ``[min_history_len, train_end)``: every prefix of the train segment
  (DiffuRec's samples), or its last ``train_prefixes_per_user`` (``1``: one sample per
  record, the longest prefix, which is what all-position training of causal models
  reads: every position of its history predicts the next item);
* ``valid`` / ``test``: every position of the segment with ``j >= min_history_len``
  (leave-one-out: one row per user; sessions: one row per interaction).

Samples come in canonical order (records in block order, ``j`` ascending); the reader
(:mod:`shards.dataset`) decides which of them a rank keeps and in which order. Set models
(DiffRec) read whole records instead (:func:`collate_records`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .format import PAD_ID, Block

Piece = Tuple[Block, np.ndarray, np.ndarray]  # (block, record positions (k,), target positions j (k,))


def block_samples(block: Block, split: str, min_history_len: int,
                  prefixes: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """``(record positions, j)``, int64 (S,) each, of the block's samples of ``split``."""
    t, v = block.bounds[:, 0], block.bounds[:, 1]
    m = int(min_history_len)
    if split == "train":
        lo = np.full_like(t, m) if prefixes is None else np.maximum(m, t - int(prefixes))
        hi = t
    elif split == "valid":
        lo, hi = np.maximum(t, m), v
    else:
        lo, hi = np.maximum(v, m), block.lengths
    n = np.maximum(0, hi - lo)
    rec = np.repeat(np.arange(n.size, dtype=np.int64), n)
    starts = np.cumsum(n) - n
    j = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts - lo, n)
    return rec, j


def collate(pieces: Sequence[Piece], max_len: int, with_seen: bool) -> Dict[str, torch.Tensor]:
    """A batch dict from pieces of blocks.

    Returns ``history`` (B, max_len) int64, the newest ``max_len`` items before the target,
    left-padded with 0 (an empty history is all padding); ``target`` (B,); ``user`` (B,) the
    record id; with ``with_seen`` also ``seen`` (B, S): the sorted unique items of the whole
    history, right-padded with 0 (S = the batch's largest).
    """
    hist: List[np.ndarray] = []
    tgt: List[np.ndarray] = []
    usr: List[np.ndarray] = []
    seen: List[np.ndarray] = []
    for blk, rec, j in pieces:
        start = blk.offsets[rec]
        base = start + j  # index of the target
        idx = base[:, None] - max_len + np.arange(max_len)[None, :]
        ok = idx >= start[:, None]
        hist.append(np.where(ok, blk.items[np.clip(idx, 0, None)], PAD_ID).astype(np.int64))
        tgt.append(blk.items[base].astype(np.int64))
        usr.append(blk.records[rec])
        if with_seen:
            seen.append(_seen_rows(blk.items, start, j))
    out = {"history": torch.from_numpy(np.concatenate(hist) if hist else np.zeros((0, max_len), np.int64)),
           "target": torch.from_numpy(np.concatenate(tgt) if tgt else np.zeros(0, np.int64)),
           "user": torch.from_numpy(np.concatenate(usr) if usr else np.zeros(0, np.int64))}
    if with_seen:
        width = max((s.shape[1] for s in seen), default=0)
        out["seen"] = torch.from_numpy(np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]))) for s in seen])
                                       if seen else np.zeros((0, 0), np.int64))
    return out


def _seen_rows(items: np.ndarray, start: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(k, S) int64: sorted unique ``items[start_i : start_i + j_i]`` per row, right-padded with 0."""
    width = int(j.max()) if j.size else 0
    if width == 0:
        return np.zeros((j.size, 0), np.int64)
    idx = start[:, None] + np.arange(width)[None, :]
    ok = np.arange(width)[None, :] < j[:, None]
    big = np.iinfo(np.int64).max
    x = np.sort(np.where(ok, items[np.where(ok, idx, 0)].astype(np.int64), big), axis=1)
    dup = np.zeros_like(ok)
    dup[:, 1:] = x[:, 1:] == x[:, :-1]
    x = np.sort(np.where(dup, big, x), axis=1)
    x[x == big] = PAD_ID
    return x


def collate_records(pieces: Sequence[Tuple[Block, np.ndarray]]) -> Dict[str, object]:
    """Whole records with their segments: ``{"user": (B,) record ids, "train" / "valid" / "test":
    (offsets (B + 1,), items (n,)) int64}`` (jagged; train items in record order)."""
    out: Dict[str, object] = {"user": torch.from_numpy(np.concatenate(
        [blk.records[rec] for blk, rec in pieces] + [np.zeros(0, np.int64)]))}
    for k, seg in enumerate(("train", "valid", "test")):
        lens, items = [], []
        for blk, rec in pieces:
            start = blk.offsets[rec]
            lo = start + (0 if k == 0 else blk.bounds[rec, k - 1])
            hi = start + (blk.bounds[rec, k] if k < 2 else blk.lengths[rec])
            n = hi - lo
            lens.append(n)
            items.append(blk.items[np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n - lo, n)])
        n = np.concatenate(lens + [np.zeros(0, np.int64)])
        out[seg] = (torch.from_numpy(np.concatenate([[0], np.cumsum(n)]).astype(np.int64)),
                    torch.from_numpy(np.concatenate(items + [np.zeros(0, np.int32)]).astype(np.int64)))
    return out
