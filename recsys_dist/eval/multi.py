"""Exact full-catalog ranking of *sets* of held-out targets per user (DiffRec-style evaluation).

DiffRec-style protocols hold out several items per user and rank every item that is not
masked: for validation the user's training items are masked, for the test split the training
and validation items. :func:`rank_target_sets` does that exactly over a row-wise sharded item
table, with the machinery of :func:`~recsys_dist.eval.ranking.rank_targets`
(:mod:`~recsys_dist.eval.checks`, :mod:`~recsys_dist.eval.scoring`); the metrics from its
integer counts (definitions, tie rules, exactness) are in :mod:`~recsys_dist.eval.multi_metrics`.

Candidates of a user: every row except row 0 (padding) and the ids in ``masked_ids``; the
user's targets are always candidates (**a target is never masked**, even if its id also occurs
in ``masked_ids``). Target ids are a 0-padded ``(b, T)`` list; a repeated id counts once (the
first slot is the target, later copies are marked invalid). A user without targets is skipped:
not ranked, not in the means, but counted (``num_skipped_users``).

Per target ``t`` the call counts exactly, over the whole catalog: ``greater`` (``g_t``, non-target
candidates scoring strictly higher), ``equal`` (``e_t``, non-target candidates with exactly
``t``'s score), ``target_greater`` (``G_t``, other targets scoring strictly higher),
``target_equal`` (``m_t - 1``, other targets tied with ``t``) and ``tie_index`` (``i_t``, tied
targets in earlier slots).

Cost per call: as :func:`~recsys_dist.eval.ranking.rank_targets`, plus two ``searchsorted``
of every score against the user's sorted target scores (``O(log T)``), so peak extra memory is
about ``B * item_chunk * (element size + 17 bytes)`` for ``B`` gathered users with targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from recsys_dist.eval.checks import (
    _H_B,
    _H_L,
    _HEADER_LEN,
    _begin_call,
    _empty_2d,
    _exchange_headers,
    _make_header,
    _target_set_problems,
)
from recsys_dist.eval.multi_metrics import (
    MULTI_METRIC_KINDS,
    MultiMetricAccumulator,
    MultiRankResult,
    multi_metric_names,
    multi_metric_sums,
    multi_metrics_from_sums,
    per_user_multi_metrics,
)
from recsys_dist.eval.scoring import (
    DEFAULT_SCORE_CACHE_BYTES,
    _chunk_masks,
    _ChunkPasses,
    _gather_users,
    _pad_cols,
)

__all__ = [
    "MULTI_METRIC_KINDS",
    "MultiRankResult",
    "MultiMetricAccumulator",
    "rank_target_sets",
    "multi_metric_names",
    "multi_metric_sums",
    "multi_metrics_from_sums",
    "per_user_multi_metrics",
]

# Extra header columns after checks.py's layout (its checks read only their own columns).
_X_T, _X_KEPT = _HEADER_LEN, _HEADER_LEN + 1


# --------------------------------------------------------------------------------------------
# pieces of rank_target_sets
# --------------------------------------------------------------------------------------------


def _dedupe(ids: torch.Tensor) -> torch.Tensor:
    """``(b, T)`` ids with every repeated id after its first slot replaced by 0 (padding)."""
    if ids.shape[1] <= 1:
        return ids.clone()
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    dup_sorted = torch.zeros_like(ids, dtype=torch.bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
    return ids.masked_fill(dup, 0)


def _suffix_counts(hist: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: entry ``p`` = sum of the ``(B, T + 1)`` histogram over bins ``> p``."""
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def _candidate_counts(
    passes: _ChunkPasses, t_scores: torch.Tensor, valid_all: torch.Tensor, t_all: torch.Tensor,
    h_all: torch.Tensor | None, group: dist.ProcessGroup | None, world: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second pass and all-reduce: ``(greater, equal)``, ``(B, T)`` CPU ``torch.long`` counts of
    every target's non-target candidates over all ranks, and the ``(B, T)`` thresholds (target
    scores, ``-inf`` in invalid slots).

    For a user with target scores sorted ascending ``thr[0] <= ... <= thr[T-1]``, an item with
    score ``s`` satisfies ``s > thr[p]`` iff ``searchsorted_left(thr, s) > p``, and
    ``s >= thr[p]`` iff ``searchsorted_right(thr, s) > p``. So per-target counts are suffix sums
    of the histograms of the two searchsorted indices over the user's non-target candidates.
    Invalid slots hold ``-inf`` (harmless: the identities hold for any sorted sequence; their
    counts are dropped).
    """
    total, t_max = t_all.shape
    device, dtype = t_scores.device, t_scores.dtype
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    thr = torch.where(valid_all, t_scores, neg_inf)
    thr_sorted, thr_order = torch.sort(thr, dim=1)
    thr_sorted = thr_sorted.contiguous()
    hist_gt = torch.zeros(total, t_max + 1, dtype=torch.long, device=device)
    hist_ge = torch.zeros(total, t_max + 1, dtype=torch.long, device=device)
    for first_id, width, s in passes.all_chunks():
        is_target, masked = _chunk_masks(t_all, h_all, first_id, width)
        keep_col = (~(is_target | masked)).to(torch.long)  # targets (and id 0) never count
        hist_gt.scatter_add_(1, torch.searchsorted(thr_sorted, s), keep_col)
        hist_ge.scatter_add_(1, torch.searchsorted(thr_sorted, s, right=True), keep_col)
        del s

    packed = passes.reduce_counts([hist_gt.reshape(-1), hist_ge.reshape(-1)], "rank_target_sets",
                                  group, world)
    n_hist = total * (t_max + 1)
    gt_sorted = _suffix_counts(packed[:n_hist].view(total, t_max + 1).cpu())
    ge_sorted = _suffix_counts(packed[n_hist:2 * n_hist].view(total, t_max + 1).cpu())
    order = thr_order.cpu()
    greater = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, order, gt_sorted)
    equal = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, order, ge_sorted) - greater
    return greater, equal, thr


def _target_order(thr_cpu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets among themselves, from the shared ``(B, T)`` thresholds (the same on every
    rank): ``(target_greater, target_equal, tie_index)``, ``(B, T)`` ``torch.long``; tied
    targets are ordered by slot."""
    total, t_max = thr_cpu.shape
    desc, d_order = torch.sort(thr_cpu, dim=1, descending=True, stable=True)  # ties: slot order
    asc = (-desc).contiguous()  # ascending
    n_above = torch.searchsorted(asc, asc)  # targets strictly higher (invalid slots are -inf)
    n_upto = torch.searchsorted(asc, asc, right=True)
    pos_in_sorted = torch.arange(t_max).expand(total, t_max)
    target_greater = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, d_order, n_above)
    target_equal = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, d_order, n_upto - n_above - 1)
    tie_index = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, d_order, pos_in_sorted - n_above)
    return target_greater, target_equal, tie_index


def _empty_sets_result(b: int, t_local: int, dtype: torch.dtype, ks: tuple[int, ...], ties: str,
                       num_skipped: int) -> MultiRankResult:
    """The result when no rank has a user with targets (no collectives needed)."""
    z = torch.zeros(b, t_local, dtype=torch.long)
    return MultiRankResult(
        valid=torch.zeros(b, t_local, dtype=torch.bool), num_targets=torch.zeros(b, dtype=torch.long),
        greater=z, equal=z.clone(), target_greater=z.clone(), target_equal=z.clone(),
        tie_index=z.clone(), target_scores=torch.zeros(b, t_local, dtype=dtype), ks=ks, ties=ties,
        num_local_users=0, num_local_skipped=b, num_users=0, num_skipped_users=num_skipped,
        metrics=multi_metrics_from_sums({n: 0 for n in multi_metric_names(ks)}, 0, ks,
                                        num_skipped, 0),
    )


def _gather_target_sets(
    queries: torch.Tensor, clean: torch.Tensor, keep: torch.Tensor, masked_ids: torch.Tensor | None,
    t_max: int, m_max: int, sizes: list[int], group: dist.ProcessGroup | None, world: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All ranks' ``(B, d)`` queries, ``(B, t_max)`` target ids and (``m_max > 0``)
    ``(B, m_max)`` masked ids of the users with targets (``keep``), 0-padded, in rank order."""
    q_local = queries.to(device)[keep]
    ids_local = _pad_cols(clean[keep], t_max)
    if m_max:
        masked = masked_ids.to(device=device, dtype=torch.long)[keep] if masked_ids is not None \
            else torch.zeros(q_local.shape[0], 0, dtype=torch.long, device=device)
        ids_local = torch.cat([ids_local, _pad_cols(masked, m_max)], dim=1)
    q_all, ids_all = _gather_users(q_local, ids_local, sizes, group, world)
    t_all = ids_all[:, :t_max].contiguous()
    h_all = ids_all[:, t_max:].contiguous() if m_max else None
    return q_all, t_all, h_all


def _own_sets_result(
    counts: tuple[torch.Tensor, ...], t_scores: torch.Tensor, valid_all: torch.Tensor,
    own: slice, keep: torch.Tensor, b: int, t_local: int, **summary,
) -> MultiRankResult:
    """This rank's :class:`MultiRankResult` from every gathered user's ``(valid, greater, equal,
    target_greater, target_equal, tie_index)`` CPU counts: the rows ``own`` are scattered back
    to the ``(b, t_local)`` layout of the caller's ``target_ids`` (skipped users: zeros)."""
    keep_cpu = keep.cpu()

    def scatter_own(x: torch.Tensor, dt: torch.dtype = torch.long) -> torch.Tensor:
        out = torch.zeros(b, t_local, dtype=dt)
        out[keep_cpu] = x[own, :t_local].to(dt)
        return out

    valid, greater, equal, target_greater, target_equal, tie_index = counts
    valid_own = scatter_own(valid, torch.bool)
    zero = torch.zeros((), dtype=t_scores.dtype, device=t_scores.device)
    scores_cpu = torch.where(valid_all, t_scores, zero).cpu()
    return MultiRankResult(
        valid=valid_own,
        num_targets=valid_own.sum(dim=1),
        greater=scatter_own(greater),
        equal=scatter_own(equal),
        target_greater=scatter_own(target_greater),
        target_equal=scatter_own(target_equal),
        tie_index=scatter_own(tie_index),
        target_scores=scatter_own(scores_cpu, t_scores.dtype),
        **summary,
    )


# --------------------------------------------------------------------------------------------
# the collective
# --------------------------------------------------------------------------------------------


def rank_target_sets(
    queries: torch.Tensor,
    target_ids: torch.Tensor,
    item_block: torch.Tensor,
    row_offset: int,
    num_rows: int,
    masked_ids: torch.Tensor | None = None,
    ks: Sequence[int] = (10, 20),
    ties: str = "expected",
    group: dist.ProcessGroup | None = None,
    item_chunk: int = 65536,
    score_cache_bytes: int = DEFAULT_SCORE_CACHE_BYTES,
) -> MultiRankResult:
    """Exact positions of every user's held-out targets among all unmasked catalog items
    (collective over ``group``; see the module docstring for candidates and counts, and
    :mod:`~recsys_dist.eval.multi_metrics` for ties and metrics).

    Every rank of ``group`` must call this the same number of times with consistent
    ``num_rows``, ``ks``, ``ties``, embedding width and query dtype; a rank without (more)
    users passes ``b_r = 0`` and still takes part (loop ``max_over_ranks(n_batches)`` times).
    Without a process group (or with a one-rank group) it runs without communication.

    Args:
        queries: ``(b_r, d)`` floating query vectors (scores are computed in this dtype).
        target_ids: ``(b_r, T_r)`` integer target ids per user, ``0`` = padding; repeated ids
            count once. ``T_r`` may differ between ranks. Users whose row is all padding are
            skipped (not ranked) and counted.
        item_block: ``(n_r, d)`` this rank's rows, global ids ``row_offset ..``; the blocks of
            all ranks must tile ``[0, num_rows)`` (e.g. :func:`row_partition`).
        row_offset: global id of ``item_block[0]``.
        num_rows: catalog size in rows, padding row 0 included.
        masked_ids: ``(b_r, M_r)`` integer ids removed from each user's candidates (``0`` =
            padding; ``M_r`` may differ between ranks), e.g. the training items (validation)
            or training + validation items (test). Targets are never masked. ``None``: none.
        ks: cutoffs of ``metrics``.
        ties: ``"expected"`` (default) | ``"optimistic"`` | ``"pessimistic"``.
        group: process group; ``None`` = default group (or no distribution at all).
        item_chunk: rows scored per matmul.
        score_cache_bytes: first-pass score chunks kept for the second pass (as in
            :func:`~recsys_dist.eval.ranking.rank_targets`).

    Returns:
        A :class:`MultiRankResult` for this rank's own users.

    Raises:
        ValueError: on every rank, if any rank passed invalid or inconsistent inputs (NaN/inf
            queries or item rows included) or a score overflowed to inf.
        RuntimeError: on every rank, if a recomputed score chunk did not reproduce the target
            scores bit-for-bit.
    """
    ks, ties, max_k, rank, world = _begin_call(ks, ties, group)
    device = item_block.device

    # ---- 1. input checks; headers: validate collectively, learn the batch sizes ------------
    d = item_block.shape[-1] if item_block.dim() == 2 else -1
    if queries.numel() == 0 and target_ids.numel() == 0 and d >= 0:  # empty batch (b_r = 0)
        queries = queries.reshape(0, d)
        target_ids = _empty_2d(target_ids)
        masked_ids = _empty_2d(masked_ids)
    problems = _target_set_problems(queries, target_ids, item_block, row_offset, num_rows,
                                    masked_ids, item_chunk)
    ok = not problems
    b = int(queries.shape[0]) if ok else 0
    t_local = int(target_ids.shape[1]) if ok else 0
    m_local = int(masked_ids.shape[1]) if ok and masked_ids is not None else 0
    if ok:
        clean = _dedupe(target_ids.to(device=device, dtype=torch.long))
        keep = (clean != 0).any(dim=1)
        kept = int(keep.sum())
    else:
        clean, keep, kept = None, None, 0
    header = _make_header(problems, b=b, hist_len=m_local, queries=queries, item_block=item_block,
                          row_offset=row_offset, num_rows=num_rows, topk=0, mask_history=True,
                          max_k=max_k, ties=ties, extra=(t_local, kept))
    headers = _exchange_headers(header, problems, world, group, num_rows, "rank_target_sets")
    assert clean is not None and keep is not None

    sizes = [int(s) for s in headers[:, _X_KEPT].tolist()]
    total = sum(sizes)
    num_skipped = int(headers[:, _H_B].sum()) - total
    first_user = sum(sizes[:rank])
    dtype = queries.dtype
    t_max = int(headers[:, _X_T].max())
    m_max = int(headers[:, _H_L].max())

    if total == 0:  # nobody has targets: identical decision on every rank, no more collectives
        return _empty_sets_result(b, t_local, dtype, ks, ties, num_skipped)

    # ---- 2. gather queries and id lists of the users with targets -------------------------
    q_all, t_all, h_all = _gather_target_sets(queries, clean, keep, masked_ids, t_max, m_max,
                                              sizes, group, world, device)
    valid_all = t_all != 0

    # ---- 3. first pass: target scores from the owners' score matrices --------------------
    passes = _ChunkPasses(q_all, item_block, row_offset, item_chunk, t_all, valid_all, dtype,
                          score_cache_bytes)
    t_scores = passes.target_scores((total, t_max), group, world)

    # ---- 4. second pass: non-target candidates above / tied with every target ------------
    greater, equal, thr = _candidate_counts(passes, t_scores, valid_all, t_all, h_all, group, world)

    # ---- 5. targets among themselves (from the shared scores; same on every rank) ---------
    valid_cpu = valid_all.cpu()
    zero = torch.zeros((), dtype=torch.long)
    counts = (valid_cpu,) + tuple(
        torch.where(valid_cpu, c, zero) for c in (greater, equal, *_target_order(thr.cpu()))
    )

    # ---- 6. global metrics (every rank holds every user's counts) and own users -----------
    sums, users, _, n_targets = multi_metric_sums(*counts, ks, ties)
    return _own_sets_result(
        counts, t_scores, valid_all, slice(first_user, first_user + kept), keep, b, t_local,
        ks=ks, ties=ties, num_local_users=kept, num_local_skipped=b - kept, num_users=total,
        num_skipped_users=num_skipped,
        metrics=multi_metrics_from_sums(sums, users, ks, num_skipped, n_targets),
    )
