"""Exact per-user top-k lists over a row-wise sharded catalog (``rank_targets(..., topk=k)``).

Order: score descending, then global item id ascending - independent of world size, chunking
and item order. Each rank keeps a running top-k of its own candidates chunk by chunk
(:class:`_RunningTopK`); the per-rank lists are all-gathered and merged into every user's
global top-k. Empty slots hold id ``-1`` and score ``-inf``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recsys_dist.distributed import stack_over_ranks


def _topk_in_chunk(
    scores: torch.Tensor, first_id: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-``k`` of a chunk whose column ``j`` is item ``first_id + j``.

    Masked candidates must already be ``-inf``. Selection is exact under the order "score
    descending, then id ascending": all entries above the k-th largest value are taken, and
    among entries equal to it the lowest ids (leftmost columns) fill the remaining slots.

    Returns:
        ``(B, k)`` scores and ``(B, k)`` ``torch.long`` ids, unsorted; ids are ``-1`` where the
        score is ``-inf`` (no candidate), including padding slots when the chunk has fewer than
        ``k`` columns.
    """
    n_q, width = scores.shape
    kk = min(k, width)
    vals = torch.full((n_q, k), float("-inf"), dtype=scores.dtype, device=scores.device)
    ids = torch.full((n_q, k), -1, dtype=torch.long, device=scores.device)
    if kk == 0 or n_q == 0:
        return vals, ids
    kth = torch.topk(scores, kk, dim=1, largest=True, sorted=True).values[:, kk - 1 :]
    above = scores > kth
    tied = scores == kth
    need = kk - above.sum(dim=1, keepdim=True)
    take = above | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= need))
    cols = take.nonzero()[:, 1]
    if cols.numel() != n_q * kk:
        raise ValueError("top-k selection failed: scores contain NaN")
    cols = cols.view(n_q, kk)  # nonzero() is row-major, so each row's columns are contiguous
    chosen = scores.gather(1, cols)
    vals[:, :kk] = chosen
    ids[:, :kk] = torch.where(torch.isneginf(chosen), torch.full_like(cols, -1), cols + first_id)
    return vals, ids


def _merge_topk(
    vals: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of ``(B, m)`` candidate lists, ordered by score desc, then id asc.

    Two stable sorts: by id ascending, then by score descending (stability keeps the id order
    inside every group of equal scores). Entries with id ``-1`` are empty slots (score
    ``-inf``) and sort last.
    """
    ids_sorted, order = torch.sort(ids, dim=1, stable=True)
    vals_sorted = vals.gather(1, order)
    vals_final, order = torch.sort(vals_sorted, dim=1, descending=True, stable=True)
    ids_final = ids_sorted.gather(1, order)
    return vals_final[:, :k], ids_final[:, :k]


class _RunningTopK:
    """This rank's top-``k`` candidates of ``rows`` gathered users, fed chunk by chunk."""

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.vals = torch.full((rows, k), float("-inf"), dtype=dtype, device=device)
        self.ids = torch.full((rows, k), -1, dtype=torch.long, device=device)

    def add(self, candidates: torch.Tensor, first_id: int) -> None:
        """Merge in a ``(rows, width)`` chunk of scores for global ids ``first_id ..`` whose
        non-candidates are already ``-inf``."""
        vals, ids = _topk_in_chunk(candidates, first_id, self.k)
        self.vals, self.ids = _merge_topk(
            torch.cat([self.vals, vals], dim=1), torch.cat([self.ids, ids], dim=1), self.k
        )

    def merged(self, own: slice, b: int, group: dist.ProcessGroup | None, world: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, scores)``, ``(b, k)`` each: the global top-k of the users ``own`` (this rank's
        ``b`` users) over every rank's candidates (collective when world > 1)."""
        k = self.k
        if world > 1:
            g_vals = stack_over_ranks(self.vals, group)[:, own]
            g_ids = stack_over_ranks(self.ids, group)[:, own]
            # (world, b, k) -> (b, world * k)
            g_vals = g_vals.permute(1, 0, 2).reshape(b, world * k)
            g_ids = g_ids.permute(1, 0, 2).reshape(b, world * k)
            scores, ids = _merge_topk(g_vals, g_ids, k)
        else:
            scores, ids = self.vals[own], self.ids[own]
        return ids.contiguous(), scores.contiguous()
