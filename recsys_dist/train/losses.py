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


class _AllGather(torch.autograd.Function):
    """Concatenate equal-size (b, d) tensors from all ranks; backward returns this rank's
    slice of the summed gradient (all-reduce then slice: works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.b = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * ctx.b:(r + 1) * ctx.b], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all-gather of (b_r, d) rows from every rank, in rank order; ``sizes`` are
    every rank's b_r (may differ: rows are padded to the largest for the collective). The
    gradient of a rank's rows is the sum of every rank's gradient of them."""
    most = max(sizes)
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
    full = _AllGather.apply(x, group)
    if all(n == most for n in sizes):
        return full
    index = torch.cat([torch.arange(r * most, r * most + n) for r, n in enumerate(sizes)]).to(full.device)
    return full.index_select(0, index)


def sum_over_ranks(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all-reduce SUM (the gradient of a sum is the sum of the gradients)."""
    return _AllReduceSum.apply(x, group)


def _reduce(ce: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of the per-row CE, or its weighted sum (rows of weight 0 masked out, not multiplied)."""
    if weights is None:
        return ce.mean()
    weights = weights.to(ce.dtype)
    return torch.where(weights != 0, ce * weights, torch.zeros_like(ce)).sum()


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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
    rank, world = _world(group)
    b = queries.shape[0]
    if world > 1:
        q_all = _AllGather.apply(queries, group)  # (W*b, d), grads flow back
    else:
        q_all = queries
    logits = q_all @ item_block.t()  # (W*b, n_r)
    lse = sharded_logsumexp(logits, group)[rank * b:(rank + 1) * b]
    return _reduce(lse - target_logits, weights)


def sharded_logsumexp(logits: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(R, n_r) logits of this rank's columns (n_r may be 0) -> (R,) log-sum-exp over every
    rank's columns, exact and differentiable (max by all-reduce MAX, the sum of exponentials by
    a differentiable all-reduce SUM). Every rank passes the same R rows."""
    _, world = _world(group)
    if logits.shape[1]:
        m = logits.detach().max(dim=1).values
    else:
        m = torch.full((logits.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device)
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(logits - m[:, None]).sum(dim=1)
    if world > 1:
        s = _AllReduceSum.apply(s, group)
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
