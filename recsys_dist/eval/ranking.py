"""Exact full-catalog rank of one held-out target per user against a row-wise sharded item table.

Every rank holds a contiguous block of item rows (:func:`~recsys_dist.distributed.row_partition`)
and a batch of its own users. :func:`rank_targets` is collective: all ranks of ``group`` call it
once per evaluation step, and together they count, for every user, the candidates scoring
strictly higher than the target (``g``) and exactly equal to it (``e``) over *every* catalog item
(no sampling), as exact integers. Pieces: input checks and the header agreement across ranks in
:mod:`~recsys_dist.eval.checks`, the two chunked scoring passes in
:mod:`~recsys_dist.eval.scoring`, top-k lists in :mod:`~recsys_dist.eval.topk`, metrics in
:mod:`~recsys_dist.eval.metrics`; the protocol in ``docs/evaluation.md``.

Candidates: every row except row 0 (padding) and the target itself; with ``mask_history`` the
rows in the user's history are removed as well, *except the target*, which is never masked (for
top-k lists this means the target may appear in the list).

Tie rule (``ties``, see :mod:`~recsys_dist.eval.metrics`): ``"expected"`` (default, HR and NDCG
averaged exactly over a uniformly random order of the items tied with the target, so a collapsed
model scores like a random ranker), ``"optimistic"`` or ``"pessimistic"``. The rule is explicit
and independent of world size, chunking and item order. Top-k lists order by score descending,
then by item id ascending.

Guarantees: invalid or inconsistent inputs on any rank (NaN/inf queries or item rows included)
and overflowing scores raise on every rank; target scores are computed once, by the owner of the
target row, and a recomputed score chunk must reproduce them bit-for-bit; peak extra memory is
``O(B * item_chunk)`` for ``B`` gathered users.

Popularity baseline: the same machinery ranks items by a per-item count with ``d = 1``::

    lo, hi = row_partition(num_rows, world)[rank]
    block = popularity_block(counts, lo, hi)          # (hi - lo, 1) float32, counts as scores
    queries = torch.ones(b, 1)                         # every user gets score_j = counts[j]
    res = rank_targets(queries, targets, block, lo, num_rows, histories, mask_history=True)

Counts must be exactly representable in the score dtype (``< 2**24`` for float32; use
``dtype=torch.float64`` for both the block and the queries beyond that).

Devices: all tensors passed to one call must live on the same device, and that device must be
usable by the backend of ``group`` (CPU tensors for gloo, CUDA tensors for NCCL; the trainer's
``cpu:gloo,cuda:nccl`` groups take both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from recsys_dist.eval.checks import (
    _H_B,
    _H_L,
    _begin_call,
    _empty_2d,
    _exchange_headers,
    _make_header,
    _target_problems,
)
from recsys_dist.eval.metrics import RankResult, metrics_from_histogram, positions_summary
from recsys_dist.eval.onepass import CALLS, count_one_pass, fast_path_ok
from recsys_dist.eval.scoring import (
    DEFAULT_SCORE_CACHE_BYTES,
    _chunk_masks,
    _ChunkPasses,
    _gather_users,
    _pad_cols,
)
from recsys_dist.eval.topk import _RunningTopK

__all__ = ["RankResult", "rank_targets", "popularity_block", "DEFAULT_SCORE_CACHE_BYTES"]


def popularity_block(
    counts: torch.Tensor, lo: int, hi: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Item block for the popularity baseline: ``counts[lo:hi, None]`` as ``dtype``.

    Args:
        counts: ``(num_rows,)`` interaction counts per item (any numeric dtype); ``counts[0]``
            (padding) is ignored by the evaluator.
        lo, hi: this rank's half-open row range (from
            :func:`~recsys_dist.distributed.row_partition`).
        dtype: score dtype; counts must be exactly representable in it (``< 2**24`` for
            float32).

    Returns:
        ``(hi - lo, 1)`` tensor. Ranking with ``queries = torch.ones(b, 1, dtype=dtype)`` then
        scores every item by its count (see the module docstring).
    """
    return counts[lo:hi].reshape(-1, 1).to(dtype)


# --------------------------------------------------------------------------------------------
# pieces of rank_targets
# --------------------------------------------------------------------------------------------


def _normalise_inputs(
    queries: torch.Tensor, targets: torch.Tensor, item_block: torch.Tensor,
    histories: torch.Tensor | None, mask_history: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shapes of an empty batch (``b_r = 0``) made regular; ``histories`` dropped unless read."""
    d = item_block.shape[-1] if item_block.dim() == 2 else -1
    if queries.numel() == 0 and targets.numel() == 0 and d >= 0:
        queries = queries.reshape(0, d)
        targets = targets.reshape(0)
        histories = _empty_2d(histories)
    if not mask_history:
        histories = None
    elif histories is None and targets.numel() == 0:
        histories = torch.zeros(0, 0, dtype=torch.long, device=item_block.device)
    return queries, targets, histories


def _empty_result(ks: tuple[int, ...], ties: str, max_k: int, topk: int, dtype: torch.dtype,
                  device: torch.device) -> RankResult:
    """The result when no rank has users (no collectives needed)."""
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    zeros_hist = torch.zeros(max_k, dtype=torch.long)
    return RankResult(
        ranks=empty_long,
        ties_count=empty_long,
        target_scores=torch.zeros(0, dtype=dtype, device=device),
        ks=ks,
        ties=ties,
        local_rank_hist=zeros_hist,
        local_tied={},
        num_local_users=0,
        num_users=0,
        metrics=metrics_from_histogram(zeros_hist, 0, ks),
        topk_ids=torch.zeros(0, topk, dtype=torch.long, device=device) if topk else None,
        topk_scores=torch.zeros(0, topk, dtype=dtype, device=device) if topk else None,
    )


def _gather_targets(
    queries: torch.Tensor, targets: torch.Tensor, histories: torch.Tensor | None,
    headers: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None, world: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All ranks' ``(B, d)`` queries, ``(B,)`` targets and (``histories`` given) ``(B, L_max)``
    0-padded histories, in rank order."""
    queries = queries.to(device)
    targets = targets.to(device=device, dtype=torch.long)
    ids_local = targets[:, None]
    if histories is not None:
        l_max = int(headers[:, _H_L].max())
        ids_local = torch.cat([ids_local, _pad_cols(histories.to(torch.long), l_max)], dim=1)
    q_all, ids_all = _gather_users(queries, ids_local, sizes, group, world)
    t_all = ids_all[:, 0].contiguous()
    h_all = ids_all[:, 1:].contiguous() if histories is not None else None
    return q_all, t_all, h_all


def _count_candidates(
    passes: _ChunkPasses, t_scores: torch.Tensor, t_all: torch.Tensor, h_all: torch.Tensor | None,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor, _RunningTopK | None]:
    """Second pass over this rank's chunks: per gathered user, ``(B,)`` counts of its candidates
    scoring strictly higher than / exactly equal to the target score (this rank's rows only),
    and this rank's running top-k (``topk > 0``)."""
    total = int(t_all.shape[0])
    device = t_all.device
    counts = torch.zeros(total, dtype=torch.long, device=device)
    equal = torch.zeros(total, dtype=torch.long, device=device)
    top = _RunningTopK(total, topk, t_scores.dtype, device) if topk > 0 else None
    threshold = t_scores[:, None]
    target_col = t_all[:, None]
    for first_id, width, s in passes.all_chunks():
        is_target, masked = _chunk_masks(target_col, h_all, first_id, width)
        masked &= ~is_target  # the target is never masked ...
        excluded = masked | is_target  # ... but it never counts against itself
        counts += ((s > threshold) & ~excluded).sum(dim=1)
        equal += ((s == threshold) & ~excluded).sum(dim=1)
        if top is not None:
            top.add(s.masked_fill(masked, float("-inf")), first_id)
        del s
    return counts, equal, top


# --------------------------------------------------------------------------------------------
# the collective
# --------------------------------------------------------------------------------------------


def rank_targets(
    queries: torch.Tensor,
    targets: torch.Tensor,
    item_block: torch.Tensor,
    row_offset: int,
    num_rows: int,
    histories: torch.Tensor | None = None,
    mask_history: bool = False,
    ks: Sequence[int] = (5, 10, 20, 50),
    topk: int = 0,
    group: dist.ProcessGroup | None = None,
    item_chunk: int = 65536,
    score_cache_bytes: int = DEFAULT_SCORE_CACHE_BYTES,
    ties: str = "expected",
) -> RankResult:
    """Exact rank of every user's target among all catalog items (collective over ``group``).

    Every rank of ``group`` must call this the same number of times with consistent
    ``num_rows``, ``ks``, ``topk``, ``mask_history``, embedding width and query dtype. A rank
    without (more) users passes ``b_r = 0`` (``queries`` of shape ``(0, d)``, ``targets`` of
    shape ``(0,)``) and still takes part; loop ``max_over_ranks(n_local_batches)`` times (see
    :func:`~recsys_dist.distributed.max_over_ranks`). Without an initialised process group
    (or with a group of one rank) it runs single-process, without any communication.

    Args:
        queries: ``(b_r, d)`` floating query vectors of this rank's users (``b_r`` may differ
            between ranks and may be 0). Scores are computed in this dtype (the item block is
            cast to it chunk by chunk).
        targets: ``(b_r,)`` integer global item ids of the held-out targets, in
            ``[1, num_rows)``.
        item_block: ``(n_r, d)`` this rank's item rows, global ids
            ``row_offset .. row_offset + n_r - 1`` (``n_r`` may be 0). The blocks of all ranks
            must tile ``[0, num_rows)``, e.g. as given by
            :func:`~recsys_dist.distributed.row_partition`.
        row_offset: global id of ``item_block[0]``.
        num_rows: catalog size in rows, padding row 0 included.
        histories: ``(b_r, L)`` integer item ids per user to mask, ``0`` = padding; only read
            when ``mask_history`` (``L`` may differ between ranks). Pass the user's whole seen
            set (the trainer passes the shards' ``seen`` column), not the truncated input window.
        mask_history: remove the items of ``histories`` from each user's candidates (never the
            target itself).
        ks: metric cutoffs ``K`` for HR@K / NDCG@K.
        topk: if ``> 0``, also return each own user's ``topk`` best candidates (the target is a
            candidate here; padding and masked history are not).
        group: process group; ``None`` = default group (or no distribution at all).
        item_chunk: rows scored per matmul; peak extra memory is about
            ``B * item_chunk * (element size + a few bytes)`` where ``B = sum_r b_r``.
        score_cache_bytes: bytes of first-pass score chunks that may be kept for the second
            pass instead of being recomputed (see :mod:`~recsys_dist.eval.scoring`).
        ties: ``"expected"`` (default) | ``"optimistic"`` | ``"pessimistic"``: how candidates
            scoring exactly the target's score enter HR/NDCG (module docstring).

    Returns:
        A :class:`RankResult` for this rank's own users: ``ranks`` = number of candidates ``j``
        with ``score_j > score_target``, ``ties_count`` = number with ``score_j ==
        score_target``, where candidates are all rows except row 0, the target, and - with
        ``mask_history`` - the ids in ``histories``. HR@K = ``1[r < K]``, NDCG@K =
        ``1 / log2(r + 2)`` if ``r < K`` else 0 for the target's position ``r``, averaged over
        the tie positions under the expected rule.

    Raises:
        ValueError: on every rank, if any rank passed invalid or inconsistent inputs
            (including NaN/inf queries or item rows).
        RuntimeError: on every rank, if recomputing a score chunk did not reproduce the target
            scores bit-for-bit (non-deterministic matmul; raise ``score_cache_bytes``).
    """
    ks, ties, max_k, rank, world = _begin_call(ks, ties, group)
    device = item_block.device

    # ---- 1. input checks; headers: validate collectively, learn the batch sizes ------------
    queries, targets, histories = _normalise_inputs(queries, targets, item_block, histories,
                                                    mask_history)
    problems = _target_problems(queries, targets, item_block, row_offset, num_rows, histories,
                                mask_history, topk, item_chunk)
    b = int(targets.shape[0]) if targets.dim() == 1 else 0
    hist_len = int(histories.shape[1]) if histories is not None and histories.dim() == 2 else 0
    header = _make_header(problems, b=b, hist_len=hist_len, queries=queries, item_block=item_block,
                          row_offset=row_offset, num_rows=num_rows, topk=topk,
                          mask_history=mask_history, max_k=max_k, ties=ties)
    headers = _exchange_headers(header, problems, world, group, num_rows, "rank_targets")
    sizes = [int(s) for s in headers[:, _H_B].tolist()]
    total = sum(sizes)
    first_user = sum(sizes[:rank])
    dtype = queries.dtype
    if total == 0:  # nobody has users: identical decision on every rank, no more collectives
        return _empty_result(ks, ties, max_k, topk, dtype, device)

    # ---- 2. gather queries, targets (+ histories) -----------------------------------------
    q_all, t_all, h_all = _gather_targets(queries, targets, histories, headers, sizes, group,
                                          world, device)

    # ---- 3-4. count strictly higher / tied candidates: one pass without top-k (onepass.py),
    # else target scores from the owners' score matrices first, then the counts --------------
    fast = fast_path_ok(dtype, topk)
    one_pass = count_one_pass(q_all, t_all, h_all, item_block, row_offset, item_chunk, group, world) \
        if fast else None
    top = None
    if one_pass is not None:
        CALLS["one_pass"] += 1
        counts, equal, t_scores = one_pass
        packed = torch.cat([counts, equal])  # already summed over the ranks
    else:
        CALLS["fallback"] += int(fast)
        passes = _ChunkPasses(q_all, item_block, row_offset, item_chunk, t_all[:, None], None, dtype,
                              score_cache_bytes)
        t_scores = passes.target_scores((total, 1), group, world)[:, 0]
        counts, equal, top = _count_candidates(passes, t_scores, t_all, h_all, topk)
        packed = passes.reduce_counts([counts, equal], "rank_targets", group, world)
    all_ranks, all_equal = packed[:total], packed[total:2 * total]
    own = slice(first_user, first_user + b)
    ranks = all_ranks[own].clone()
    ties_count = all_equal[own].clone()

    # ---- 5. merge the per-rank top-k lists ------------------------------------------------
    topk_ids, topk_scores = top.merged(own, b, group, world) if top is not None else (None, None)

    # Every rank holds the ranks of *all* users after the all-reduce, so the global histogram
    # needs no further communication; each user appears exactly once in it.
    global_hist, global_tied = positions_summary(all_ranks, all_equal, max_k, ties)
    local_hist, local_tied = positions_summary(ranks, ties_count, max_k, ties)
    return RankResult(
        ranks=ranks,
        ties_count=ties_count,
        target_scores=t_scores[own].clone(),
        ks=ks,
        ties=ties,
        local_rank_hist=local_hist,
        local_tied=local_tied,
        num_local_users=b,
        num_users=total,
        metrics=metrics_from_histogram(global_hist, total, ks, global_tied),
        topk_ids=topk_ids,
        topk_scores=topk_scores,
    )
