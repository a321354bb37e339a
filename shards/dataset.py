"""``SequenceDataset``: batches of one split of ``seq-v2`` shards for one rank.

It puts the three parts together: the plan (:mod:`shards.plan`: which samples are this
rank's, in which windows and order), the stream (:mod:`shards.stream`: verified blocks)
and the samples (:mod:`shards.samples`: targets, histories, collation). Use it as
``DataLoader(ds, batch_size=None, num_workers=W)``.

Guarantees:

* exactly once: over the ranks of one world size every sample of the split is read once
  per epoch (``drop_last`` and ``max_batches`` drop only the tail of a rank's stream), and
  ranks differ by at most one sample (:mod:`shards.plan`);
* deterministic: the batch sequence depends on (manifest, split, rank, world_size,
  batch_size, seed, epoch, window_blocks) only, not on the number of DataLoader workers
  (worker ``w`` yields batches ``start + w, start + w + W, ...``, which the DataLoader's
  in-order round-robin puts back in sequence; each worker reads the rank's whole stream
  and collates only its own batches, so reading costs W times, collation does not);
* exact resume: ``start_batch=k`` yields exactly batches ``k, k + 1, ...`` of the
  uninterrupted epoch, skipping whole windows unread;
* nothing unverified: a sample is yielded only after its whole block passed
  :func:`shards.format.decode_block`; any damage raises :class:`~shards.format.ShardError`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .format import Block, block_entries, load_manifest, resolve_manifest_url, segment
from .plan import RECORDS, Window, epoch_windows, position_identity, rank_plan, split_sizes
from .samples import block_samples, collate, collate_records
from .stream import read_shard

DEFAULT_WINDOW_BLOCKS = 8


class SequenceDataset(IterableDataset):
    """Batches of ``split`` (``train``, ``valid``/``val``, ``test``) for ``rank`` of ``world_size``;
    ``split="records"``: batches of whole records with their three segments
    (:func:`shards.samples.collate_records`; DiffRec's users), ``batch_size`` records each.

    Args:
        url: the shard folder or its ``manifest.json`` (any fsspec URL).
        batch_size: samples per batch. max_len: history length of the model input.
        shuffle: training order (see :mod:`shards.plan`). seed, epoch: its RNG.
        drop_last: drop the rank's last partial batch. max_batches: cap per epoch (the
            trainer passes the smallest rank's count so every rank takes as many steps).
        start_batch: resume ``epoch`` at this batch. window_blocks: blocks shuffled together.
        with_seen: add ``seen`` (default: for valid/test). manifest: an already loaded one.
    """

    def __init__(self, url: str, split: str, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 max_len: int = 50, shuffle: bool = False, seed: int = 0, epoch: int = 0, drop_last: bool = False,
                 max_batches: Optional[int] = None, start_batch: int = 0,
                 window_blocks: int = DEFAULT_WINDOW_BLOCKS, with_seen: Optional[bool] = None,
                 io_attempts: int = 5, manifest: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size or batch_size < 1 or max_len < 1 or start_batch < 0 or io_attempts < 1:
            raise ValueError(f"need 0 <= rank < world_size, batch_size >= 1, max_len >= 1, start_batch >= 0, "
                             f"io_attempts >= 1; got {rank}, {world_size}, {batch_size}, {max_len}, {start_batch}, "
                             f"{io_attempts}")
        self.manifest = manifest if manifest is not None else load_manifest(url)
        _, self.base_url = resolve_manifest_url(url)
        self.split = RECORDS if split == RECORDS else segment(split)
        self.batch_size, self.rank, self.world_size, self.max_len = int(batch_size), int(rank), int(world_size), int(max_len)
        # (epoch, start_batch) in shared memory: persistent DataLoader workers see set_epoch / set_position
        self._pos = torch.tensor([int(epoch), int(start_batch)], dtype=torch.long).share_memory_()
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.max_batches = max_batches
        self.window_blocks, self.io_attempts = int(window_blocks), int(io_attempts)
        self.with_seen = self.split not in ("train", RECORDS) if with_seen is None else bool(with_seen)
        self._entries = block_entries(self.manifest)
        self._sizes = split_sizes(self.manifest, self.split)
        self._plan = rank_plan(self._sizes, self.rank, self.world_size)

    # ---------------------------------------------------------------- plan and position

    def planned_batches(self) -> int:
        """Batches of this rank's epoch before ``max_batches``."""
        n = sum(hi - lo for _, lo, hi in self._plan)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        n = self.planned_batches()
        return n if self.max_batches is None else min(n, int(self.max_batches))

    @property
    def epoch(self) -> int:
        return int(self._pos[0])

    @property
    def start_batch(self) -> int:
        return int(self._pos[1])

    def set_epoch(self, epoch: int) -> None:
        self._pos[0], self._pos[1] = int(epoch), 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._pos[0], self._pos[1] = int(epoch), int(start_batch)

    def _identity(self) -> Dict[str, Any]:
        return position_identity(self.manifest, self.split, self.rank, self.world_size, self.batch_size,
                                 self.drop_last, self.max_batches, self.shuffle, self.seed, self.window_blocks)

    def data_position(self, batch_in_epoch: int, num_workers: int = 0, epoch: Optional[int] = None) -> Dict[str, Any]:
        """JSON-able position for a checkpoint: ``batch_in_epoch`` batches of ``epoch`` consumed
        (``num_workers`` does not matter: the stream is the same for any)."""
        total = len(self)
        k = max(0, min(int(batch_in_epoch), total))
        return {**self._identity(), "epoch": int(self.epoch if epoch is None else epoch), "start_batch": k,
                "epoch_batches": total, "epoch_done": k >= total}

    def check_position(self, position: Dict[str, Any], num_workers: int = 0) -> None:
        """Raise ValueError naming every setting in which ``position`` differs from this reader."""
        bad = [f"{k}: saved {position.get(k)!r}, now {v!r}" for k, v in self._identity().items()
               if position.get(k) != v]
        if bad:
            raise ValueError("data position does not match this reader (exact resume impossible): " + "; ".join(bad))

    def restore_position(self, position: Dict[str, Any], num_workers: int = 0) -> None:
        self.check_position(position)
        if position.get("epoch_done"):
            self.set_position(int(position["epoch"]) + 1, 0)
        else:
            self.set_position(int(position["epoch"]), int(position["start_batch"]))

    # ---------------------------------------------------------------- reading

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        end, b = len(self), self.batch_size
        start = min(self.start_batch, end)
        first_mine = start + wid
        if first_mine >= end:
            return
        windows = epoch_windows(self._plan, [s for s, _, _ in self._entries], self.shuffle, self.seed, self.epoch,
                                self.rank, self.window_blocks)
        skip = start * b  # samples of this epoch already consumed
        seen_at = 0  # stream index of the first sample of the current window
        batch_i = start
        carry: List[tuple] = []  # (block, rec, j) pieces of the batch being filled
        have = 0
        for win in windows:
            if seen_at + win.samples <= skip:
                seen_at += win.samples
                continue
            blk, rec, j = self._window_samples(win)
            lo = max(0, skip - seen_at)
            seen_at += win.samples
            i = lo
            while i < rec.size:
                take = min(b - have, rec.size - i)
                if (batch_i - start) % nw == wid:
                    carry.append((blk, rec[i:i + take], j[i:i + take]))
                have += take
                i += take
                if have == b:
                    if carry:
                        yield self._collate(carry)
                    carry, have = [], 0
                    batch_i += 1
                    if batch_i >= end:
                        return
        if have and not self.drop_last and batch_i < end and carry:
            yield self._collate(carry)

    def _collate(self, pieces: List[tuple]) -> Dict[str, Any]:
        if self.split == RECORDS:
            return collate_records([(blk, rec) for blk, rec, _ in pieces])
        return collate(pieces, self.max_len, self.with_seen)

    def _window_samples(self, win: Window) -> tuple:
        """(merged block of the window, record positions, j) of the rank's samples, in order."""
        by_shard: Dict[int, Dict[int, tuple]] = {}
        for e in win.entries:
            s, p, _ = self._entries[e[0]]
            by_shard.setdefault(s, {})[p] = e
        blocks: Dict[int, Block] = {}
        for s, want in by_shard.items():
            for p, block in read_shard(self.manifest, self.base_url, s, set(want), self.io_attempts):
                blocks[want[p][0]] = block
        parts, base = [], 0
        for bi, lo, hi in win.entries:
            blk = blocks[bi]
            if self.split == RECORDS:
                rec = np.arange(lo, hi, dtype=np.int64)
                j = rec
            else:
                rec, j = block_samples(blk, self.split, int(self.manifest["min_history_len"]),
                                       self.manifest["train_prefixes_per_user"])
                rec, j = rec[lo:hi], j[lo:hi]
            parts.append((blk, rec + base, j))
            base += blk.records.size
        assert sum(p[1].size for p in parts) == win.samples
        merged = _merge([p[0] for p in parts])
        rec = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        j = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        if win.seed:
            perm = np.random.default_rng(list(win.seed)).permutation(rec.size)
            rec, j = rec[perm], j[perm]
        return merged, rec, j


def _merge(blocks: List[Block]) -> Block:
    """One Block holding ``blocks`` back to back (offsets shifted)."""
    if len(blocks) == 1:
        return blocks[0]
    offs, shift = [np.zeros(1, np.int64)], 0
    for b in blocks:
        offs.append(b.offsets[1:] + shift)
        shift += int(b.offsets[-1])
    return Block("+".join(b.key for b in blocks), np.concatenate([b.records for b in blocks]),
                 np.concatenate(offs), np.concatenate([b.items for b in blocks]),
                 np.concatenate([b.bounds for b in blocks]))
