"""The scoring passes shared by the collective ranking calls.

After the header exchange (:mod:`~recsys_dist.eval.checks`) the ranks all-gather the queries
``(B, d)`` and id lists (targets, masked ids) of all ``B = sum_r b_r`` users, ordered by rank,
then by position in the rank's batch (:func:`_gather_users`). Each rank then scores its own item
block against all ``B`` queries, ``item_chunk`` rows at a time (``Q_all @ chunk^T``, so peak
extra memory is ``O(B * item_chunk)`` however large the catalog), in two passes
(:class:`_ChunkPasses`):

1. only the chunks that hold targets this rank owns: every target score is read from the score
   matrix of its owner and shared by an all-reduce (SUM) of a tensor that is zero except at the
   owner - exact, since ``x + 0 == x``. It is never recomputed by a separate dot product, so
   every rank compares with the very value the owner compares its own items with;
2. every chunk, compared with those target scores by the caller. First-pass chunks are reused
   up to ``score_cache_bytes``; a recomputed chunk (same operands) must reproduce the shared
   target scores bit-for-bit, and non-finite scores are counted.

The caller's integer counts are then all-reduced with the mismatch and non-finite counts
(:meth:`_ChunkPasses.reduce_counts`), which raise on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from recsys_dist.distributed import gather_rows, sum_over_ranks

#: Default budget (bytes) for keeping first-pass score chunks around for the second pass.
DEFAULT_SCORE_CACHE_BYTES: int = 512 * 1024 * 1024


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    """``(b, width)`` copy of ``(b, w <= width)`` ``x``, zero-padded on the right."""
    out = x.new_zeros((x.shape[0], width))
    out[:, : x.shape[1]] = x
    return out


def _gather_users(
    queries: torch.Tensor, ids: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``(B, d)`` queries (detached) and ``(B, w)`` id lists, in rank order."""
    if world > 1:
        return gather_rows(queries.detach(), sizes, group), gather_rows(ids, sizes, group)
    return queries.contiguous(), ids


def _scores(
    queries: torch.Tensor, item_block: torch.Tensor, c0: int, c1: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(B, c1 - c0)`` scores of all gathered queries against local rows ``c0 .. c1 - 1``.

    Always called with the same operands for a given chunk, so a recomputation reproduces the
    first computation (checked by the caller).
    """
    return queries @ item_block[c0:c1].to(dtype).T


def _positions_mask(ids: torch.Tensor, first_id: int, width: int) -> torch.Tensor:
    """``(B, width)`` bool: ``out[i, j]`` is True iff ``first_id + j`` occurs in ``ids[i]``.

    Args:
        ids: ``(B, L)`` global item ids (any values; those outside the window are ignored).
        first_id: global id of column 0.
        width: number of columns.
    """
    inside = (ids >= first_id) & (ids < first_id + width)
    # Ids outside the window are routed to a dummy column ``width`` that is dropped after.
    idx = torch.where(inside, ids - first_id, torch.full_like(ids, width))
    out = torch.zeros(ids.shape[0], width + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(1, idx, True)
    return out[:, :width]


def _chunk_masks(
    target_ids: torch.Tensor, masked_ids: torch.Tensor | None, first_id: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(is_target, masked)``, both ``(B, width)`` bool over the chunk's columns: the users'
    targets, and their masked ids plus the padding row (id 0). A column may be in both; the
    caller decides (a target is never masked)."""
    is_target = _positions_mask(target_ids, first_id, width)
    masked = torch.zeros_like(is_target)
    if masked_ids is not None:
        masked |= _positions_mask(masked_ids, first_id, width)
    if first_id == 0:
        masked[:, 0] = True  # padding row
    return is_target, masked


class _ChunkPasses:
    """The two passes over one rank's item chunks (module docstring).

    Args:
        queries: ``(B, d)`` gathered queries.
        item_block: ``(n_r, d)`` this rank's rows, global ids ``row_offset ..``.
        row_offset: global id of ``item_block[0]``.
        item_chunk: rows per chunk.
        target_ids: ``(B, T)`` global target ids of every gathered user.
        valid: ``(B, T)`` bool, slots that hold a target (``None``: all).
        dtype: score dtype.
        score_cache_bytes: budget for keeping first-pass chunks for the second pass.
    """

    def __init__(self, queries: torch.Tensor, item_block: torch.Tensor, row_offset: int,
                 item_chunk: int, target_ids: torch.Tensor, valid: torch.Tensor | None,
                 dtype: torch.dtype, score_cache_bytes: int) -> None:
        self.queries, self.item_block, self.dtype = queries, item_block, dtype
        self.lo = int(row_offset)
        self.score_cache_bytes = score_cache_bytes
        n_local = int(item_block.shape[0])
        self.chunks = [(c0, min(c0 + item_chunk, n_local)) for c0 in range(0, n_local, item_chunk)]
        local_pos = target_ids - self.lo
        owned = (local_pos >= 0) & (local_pos < n_local)
        if valid is not None:
            owned = valid & owned
        # the targets this rank owns: gathered user, slot, local row, chunk
        self.own_u, self.own_s = owned.nonzero(as_tuple=True)
        self.own_pos = local_pos[self.own_u, self.own_s]
        self.chunk_of = torch.div(self.own_pos, item_chunk, rounding_mode="floor")
        self.target_chunks = sorted(set(self.chunk_of.tolist()))
        self.cache: dict[int, torch.Tensor] = {}
        device = item_block.device
        self.mismatch = torch.zeros(1, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(1, dtype=torch.long, device=device)
        self.t_scores: torch.Tensor | None = None

    def target_scores(self, shape: tuple[int, int], group: dist.ProcessGroup | None,
                      world: int) -> torch.Tensor:
        """First pass: the ``shape = (B, T)`` target scores, as computed by each target's owner
        (0 in slots that hold no target), identical on every rank (collective when world > 1)."""
        t_scores = torch.zeros(shape, dtype=self.dtype, device=self.item_block.device)
        cache_used = 0
        for ci in self.target_chunks:
            c0, c1 = self.chunks[ci]
            s = _scores(self.queries, self.item_block, c0, c1, self.dtype)
            sel = self.chunk_of == ci
            u, slot = self.own_u[sel], self.own_s[sel]
            t_scores[u, slot] = s[u, self.own_pos[sel] - c0]
            nbytes = s.numel() * s.element_size()
            if cache_used + nbytes <= self.score_cache_bytes:
                self.cache[ci] = s
                cache_used += nbytes
        if world > 1:
            # Zero everywhere except at the owner of each target: the sum is exact.
            t_scores = sum_over_ranks(t_scores, group)
        self.t_scores = t_scores
        return t_scores

    def all_chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Second pass: ``(first_id, width, scores)`` of every chunk in order, ``scores`` being
        ``(B, width)`` for global ids ``first_id ..``. The caller should drop its reference to
        ``scores`` before asking for the next chunk (peak memory)."""
        assert self.t_scores is not None, "target_scores() first"
        for ci, (c0, c1) in enumerate(self.chunks):
            s = self.cache.pop(ci, None)
            if s is None:
                s = _scores(self.queries, self.item_block, c0, c1, self.dtype)
                if ci in self.target_chunks:  # recomputed: must reproduce the shared target scores
                    sel = self.chunk_of == ci
                    again = s[self.own_u[sel], self.own_pos[sel] - c0]
                    self.mismatch += (again != self.t_scores[self.own_u[sel], self.own_s[sel]]).sum()
            self.nonfinite += (~torch.isfinite(s)).sum()
            yield self.lo + c0, c1 - c0, s
            del s

    def reduce_counts(self, parts: Sequence[torch.Tensor], who: str,
                      group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
        """All-reduce (SUM) of the concatenated 1-D integer ``parts`` (collective when world >
        1); raises on every rank if any rank saw a non-finite score (``ValueError``) or a
        recomputed chunk that did not reproduce the target scores (``RuntimeError``)."""
        packed = torch.cat([*parts, self.mismatch, self.nonfinite])
        if world > 1:
            packed = sum_over_ranks(packed, group)
        if int(packed[-1]) != 0:
            raise ValueError(
                f"{who}: {int(packed[-1])} scores are NaN/inf (finite queries and rows whose "
                f"dot products overflow {self.dtype}); refusing to rank them"
            )
        if int(packed[-2]) != 0:
            raise RuntimeError(
                f"{who}: recomputed score chunks did not reproduce the target scores "
                f"({int(packed[-2])} mismatches): the matmul is not deterministic here; raise "
                "score_cache_bytes so that the first-pass scores are reused"
            )
        return packed[:-2]
