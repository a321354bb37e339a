"""Losses whose softmax runs over item rows spread across ranks.

``sharded_softmax_ce`` is the full-catalog cross-entropy: every rank scores all ranks'
queries against its own block of item rows, and the log-sum-exp is combined exactly across
ranks (max by all-reduce MAX, sum of exponentials by a differentiable all-reduce SUM), so the
value and the gradients equal ``F.cross_entropy`` over the gathered logits.

Both losses take optional per-row ``weights``: given, they return ``sum_i w_i CE_i`` instead
of the mean, and rows of weight 0 contribute nothing (not even a NaN). The all-positions
objective passes each rank's real (sample, position) rows with weight ``world / global count``,
plus weight-0 filler rows up to the largest count of any rank (the all-gather needs the same
number of rows on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recsys_dist.distributed import gather_rows, rank_and_world, sum_over_ranks


def _reduce(ce: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of the per-row CE, or its weighted sum (rows of weight 0 masked out, not multiplied)."""
    if weights is None:
        return ce.mean()
    weights = weights.to(ce.dtype)
    return torch.where(weights != 0, ce * weights, torch.zeros_like(ce)).sum()


def sharded_softmax_ce(queries: torch.Tensor, target_logits: torch.Tensor, item_block: torch.Tensor,
                       group: dist.ProcessGroup | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (or weighted sum) softmax CE of this rank's queries over the whole catalog.

    Args:
        queries: (b, d) this rank's query vectors; b must be equal on every rank.
        target_logits: (b,) q . e_target for this rank's samples (already looked up).
        item_block: (n_r, d) this rank's candidate rows (padding excluded); n_r may be 0.
        weights: (b,) optional per-row weights (see the module docstring).
    Returns:
        scalar: mean over this rank's b samples of logsumexp_j(q . e_j) - q . e_target, or with
        ``weights`` the sum of the weighted per-row CEs.
    """
    rank, world = rank_and_world(group)
    b = queries.shape[0]
    if world > 1:
        q_all = gather_rows(queries, group=group)  # (W*b, d), grads flow back
    else:
        q_all = queries
    logits = q_all @ item_block.t()  # (W*b, n_r)
    lse = sharded_logsumexp(logits, group)[rank * b:(rank + 1) * b]
    return _reduce(lse - target_logits, weights)


def sharded_logsumexp(logits: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(R, n_r) logits of this rank's columns (n_r may be 0) -> (R,) log-sum-exp over every
    rank's columns, exact and differentiable (max by all-reduce MAX, the sum of exponentials by
    a differentiable all-reduce SUM). Every rank passes the same R rows."""
    _, world = rank_and_world(group)
    if logits.shape[1]:
        m = logits.detach().max(dim=1).values
    else:
        m = torch.full((logits.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device)
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(logits - m[:, None]).sum(dim=1)
    if world > 1:
        s = sum_over_ranks(s, group)
    return m + torch.log(s)


def sampled_softmax_ce(queries: torch.Tensor, target_logits: torch.Tensor, target_ids: torch.Tensor,
                       negatives: torch.Tensor, negative_ids: torch.Tensor,
                       log_counts: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled-softmax CE against candidates shared by the batch (for very large catalogs).

    Per sample, ``log(exp(t) + sum_c exp(l_c - log_counts_c)) - t`` over the candidates ``c`` that
    are not the sample's target: the target logit ``t`` enters exactly, and the corrected sum over
    the other candidates is an unbiased estimate of the partition sum over the non-target items,
    so the loss estimates the full-softmax CE (up to the bias of the log of an estimate).

    Args:
        queries: (b, d); target_logits: (b,) q . e_target; target_ids: (b,) long.
        negatives: (n, d) embeddings of the candidate ids negative_ids (n,) long.
        log_counts: (n,) log expected number of copies of each candidate in the candidate set (logQ
            correction, subtracted from the candidates' logits, never from the target's): e.g.
            ``log(n q_j)`` for n i.i.d. draws from q, ``log(n / (N - 1))`` for uniform ones (a
            constant that does not cancel, since the target is not corrected),
            ``NegativeSampler.candidates`` for mixed negatives. None: no correction, right only
            when every candidate occurs exactly once (e.g. the whole catalog).
        weights: (b,) optional per-row weights (see the module docstring).
    Returns:
        scalar mean CE over the b samples (with ``weights``: the sum of the weighted CEs). A candidate equal to a sample's target (an
        accidental hit) is removed from that sample's softmax.
    """
    logits = queries @ negatives.t()  # (b, n)
    if log_counts is not None:
        logits = logits - log_counts[None, :]
    logits = logits.masked_fill(negative_ids[None, :] == target_ids[:, None], float("-inf"))
    full = torch.cat([target_logits[:, None], logits], dim=1)
    return _reduce(torch.logsumexp(full, dim=1) - target_logits, weights)
