"""Which samples each rank reads, in which order, and how many batches that makes.

Everything here is computed from the manifest alone (no shard is opened), so every rank
agrees on it and a resumed run can jump to a batch without replaying the epoch.

Partition. The split's samples, in canonical order over the blocks (manifest order), are
cut into ``world_size`` contiguous ranges of equal size (the first ``N % world_size`` ranks
one sample more): rank ``r`` reads samples ``[r*N//W + min(r, N%W), ...)``. So ranks differ by
at most one sample in every split, whatever the block sizes (a split living in a few blocks,
like a session dataset's valid sessions, is still balanced), every sample belongs to exactly
one rank, and a rank uses only its ~1/W of the blocks (at most two of them shared with a
neighbour; the shards holding them are read whole, so at a boundary up to
``blocks_per_shard - 1`` other blocks are read and verified too). A plan entry ``(block, lo, hi)`` keeps the block's canonical samples
``lo <= k < hi``.

Order (``shuffle``, training). The rank's shards (its blocks of each) are permuted per epoch
(RNG ``(seed, epoch, rank)``) and packed into *windows* of at least ``window_blocks`` blocks;
the samples of a window are permuted together (RNG ``(seed, epoch, rank, window)``). So
shuffling costs one window of blocks in memory, changes no rank's count and opens every shard
once per epoch; a window's sample count is known beforehand, which is what lets a resumed
epoch skip whole windows unread. Evaluation reads in plan order, one shard a window.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .format import FORMAT, block_entries, segment

PlanEntry = Tuple[int, int, int]  # (block index, lo, hi): canonical samples lo <= k < hi


def rank_range(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[lo, hi)`` of the split's ``total`` samples that ``rank`` reads."""
    q, r = divmod(int(total), int(world_size))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def rank_plan(block_sizes: Sequence[int], rank: int, world_size: int) -> List[PlanEntry]:
    """Plan entries of ``rank`` (blocks with at least one of its samples), in manifest order."""
    lo, hi = rank_range(sum(int(n) for n in block_sizes), rank, world_size)
    plan, start = [], 0
    for b, n in enumerate(block_sizes):
        a, z = max(lo, start), min(hi, start + int(n))
        if a < z:
            plan.append((b, a - start, z - start))
        start += int(n)
    return plan


RECORDS = "records"  # the pseudo-split of whole records (set models: DiffRec's users)


def split_sizes(manifest: Mapping[str, Any], split: str) -> List[int]:
    """Samples of ``split`` in each block, in manifest order (``"records"``: records)."""
    if split == RECORDS:
        return [int(b["num_records"]) for _, _, b in block_entries(manifest)]
    s = segment(split)
    return [int(b["samples"][s]) for _, _, b in block_entries(manifest)]


def rank_samples(manifest: Mapping[str, Any], split: str, world_size: int) -> List[int]:
    """Samples of ``split`` each rank reads per epoch (every epoch the same)."""
    total = sum(split_sizes(manifest, split))
    return [(lambda r: r[1] - r[0])(rank_range(total, g, world_size)) for g in range(world_size)]


def plan_batches(manifest: Mapping[str, Any], split: str, batch_size: int, world_size: int,
                 drop_last: bool) -> List[int]:
    """Batches each rank yields per epoch before any ``max_batches`` cap."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [n // batch_size if drop_last else -(-n // batch_size)
            for n in rank_samples(manifest, split, world_size)]


def steps_per_epoch(manifest: Mapping[str, Any], batch_size: int, world_size: int) -> int:
    """Train batches every rank can take (``min`` over ranks, ``drop_last``): one epoch's steps."""
    return min(plan_batches(manifest, "train", batch_size, world_size, True))


@dataclass(frozen=True)
class Window:
    """Consecutive plan entries read together; ``samples`` of them are this rank's."""

    entries: Tuple[PlanEntry, ...]
    samples: int
    seed: Tuple[int, ...]  # RNG of the window's sample permutation (shuffle) or ()


def epoch_windows(plan: Sequence[PlanEntry], shard_of: Sequence[int], shuffle: bool, seed: int, epoch: int,
                  rank: int, window_blocks: int) -> List[Window]:
    """The rank's windows of ``epoch`` in reading order (see the module docstring).

    ``shard_of[b]``: the shard holding block ``b``. Windows are made of whole shards (the rank's
    blocks of each), so every shard is opened once per epoch: in evaluation one shard a window;
    in training the rank's shards are permuted and packed until a window has at least
    ``window_blocks`` blocks."""
    groups: List[List[PlanEntry]] = []
    for e in plan:
        if groups and shard_of[groups[-1][-1][0]] == shard_of[e[0]]:
            groups[-1].append(e)
        else:
            groups.append([e])
    if shuffle and len(groups) > 1:
        perm = np.random.default_rng([int(seed), int(epoch), int(rank)]).permutation(len(groups))
        groups = [groups[i] for i in perm]
    out: List[Window] = []
    cur: List[PlanEntry] = []
    for i, g in enumerate(groups):
        cur += g
        if not shuffle or len(cur) >= window_blocks or i == len(groups) - 1:
            ent = tuple(cur)
            out.append(Window(ent, sum(hi - lo for _, lo, hi in ent),
                              (int(seed), int(epoch), int(rank), len(out)) if shuffle else ()))
            cur = []
    return out


def position_identity(manifest: Mapping[str, Any], split: str, rank: int, world_size: int, batch_size: int,
                      drop_last: bool, max_batches: Optional[int], shuffle: bool, seed: int, window_blocks: int) -> Dict[str, Any]:
    """What a saved data position is valid for: an exact resume needs all of it unchanged."""
    blocks = [(b["key"], b["sha256"]) for _, _, b in block_entries(manifest)]
    return {"format": FORMAT, "split": split if split == RECORDS else segment(split),
            "train_prefixes_per_user": manifest["train_prefixes_per_user"],
            "min_history_len": manifest["min_history_len"],
            "blocks_digest": hashlib.sha256(json.dumps(blocks).encode("utf-8")).hexdigest()[:16],
            "rank": int(rank), "world_size": int(world_size), "batch_size": int(batch_size),
            "drop_last": bool(drop_last), "max_batches": max_batches,
            "shuffle": bool(shuffle), "seed": int(seed) if shuffle else None,
            "window_blocks": int(window_blocks) if shuffle else None}
