"""Exact full-catalog ranking of *sets* of held-out targets per user (DiffRec-style evaluation).

DiffRec-style protocols hold out several items per user and rank every item that is not
masked: for validation the user's training items are masked, for the test split the training
and validation items. :func:`rank_target_sets` does that exactly over a row-wise sharded item
table, with the same machinery as :func:`~recsys_dist.eval.ranking.rank_targets` (one small
header all-gathered for collective validation, queries and id lists all-gathered, target scores
read from the owner's score matrix and shared by an ``all_reduce`` of a tensor that is zero
except at the owner, integer counts all-reduced, two passes over the chunks with a score cache
and a bit-for-bit check of recomputed chunks).

Candidates of a user: every row except row 0 (padding) and the ids in ``masked_ids``; the
user's targets are always candidates (**a target is never masked**, even if its id also occurs
in ``masked_ids``). Target ids are a 0-padded ``(b, T)`` list; a repeated id counts once (the
first slot is the target, later copies are marked invalid). A user without targets is skipped:
not ranked, not in the means, but counted (``num_skipped_users``).

Counts per target ``t`` of a user (all exact integers):

* ``greater[t]`` = ``g_t``: non-target candidates scoring strictly higher than ``t``;
* ``equal[t]`` = ``e_t``: non-target candidates scoring exactly ``t``'s score;
* ``target_greater[t]`` = ``G_t``: other targets of the user scoring strictly higher;
* ``target_equal[t]`` = ``m_t - 1``: other targets of the user tied with ``t``;
* ``tie_index[t]`` = ``i_t``: tied targets before ``t`` in slot order (``0 .. m_t - 1``).

Metrics at cutoff ``K`` (binary relevance, as DiffRec's ``computeTopNAccuracy`` computes them
from a top-K list; ``P`` = the user's targets, positions 0-based):

* ``Recall@K`` = #targets in the top K / ``|P|``;
* ``NDCG@K`` = DCG@K / IDCG@K, ``DCG@K = sum over targets at position r < K of 1/log2(r+2)``,
  ``IDCG@K = sum_{r < min(|P|, K)} 1/log2(r+2)``;
* ``HR@K`` = 1 if any target is in the top K; ``Precision@K`` = #targets in the top K / ``K``;
* ``MRR@K`` = ``1/(r+1)`` for the best-placed target at ``r < K``, else 0.

Ties (``ties``), the same three rules as the single-target evaluator
(:mod:`~recsys_dist.eval.metrics`):

* The candidates fall into *tie groups* of equal score, ordered by score. The group of target
  ``t`` starts at position ``A_t = g_t + G_t`` (everything strictly higher comes first) and
  has ``n_t = e_t + m_t`` members, ``m_t`` of them targets.
* ``"optimistic"``: targets win ties against non-targets: ``pos_t = A_t + i_t``.
  ``"pessimistic"``: they lose them: ``pos_t = A_t + e_t + i_t``. (The order of targets among
  themselves does not matter: they are equally relevant.)
* ``"expected"`` (default): the exact expectation over a uniformly random order inside every
  tie group (independently per group). Derivation, all in closed form:

  - Recall, Precision, DCG are sums over targets of ``h(pos_t)`` (``h = 1[r < K]`` or
    ``1[r < K] / log2(r+2)``), and the normalisers ``|P|``, ``K`` and ``IDCG@K`` do not depend
    on the order. By linearity of expectation only the *marginal* law of each ``pos_t``
    matters, and under a uniform order of its group ``pos_t`` is uniform on
    ``A_t .. A_t + n_t - 1`` however many targets share the group. Hence
    ``E[1[pos_t < K]] = clip(K - A_t, 0, n_t) / n_t`` and
    ``E[1[pos_t < K] / log2(pos_t + 2)] = (D(min(A_t + n_t, K)) - D(min(A_t, K))) / n_t`` with
    ``D(x) = sum_{r < x} 1 / log2(r + 2)``. So NDCG with several targets in one group is *not*
    intractable: it is exact and costs O(1) per target.
  - HR@K: only one tie group can straddle the cutoff (contain positions ``K - 1`` and ``K``).
    If some group with a target lies entirely inside the top K, HR = 1. Otherwise, if the
    straddling group (start ``A``, ``n`` members, ``m`` targets, ``c = K - A`` of its slots in
    the top K) holds targets, its target slots are a uniformly random ``m``-subset of its
    ``n`` slots, so ``P(miss) = C(n - c, m) / C(n, m) = prod_{i < m} (n - c - i) / (n - i)``
    and ``E[HR] = 1 - P(miss)``; else 0.
  - MRR@K: the best-placed target lies in the first group holding targets (start ``A``, ``n``,
    ``m``); the smallest of ``m`` uniform slots out of ``n`` is ``j`` with probability
    ``S_j * m / (n - j)``, ``S_j = P(min >= j) = prod_{i < j} (n - m - i) / (n - i)``, so
    ``E[MRR@K] = sum_{j : A + j < K} S_j m / (n - j) / (A + j + 1)`` (at most K terms).

  A model whose scores collapsed to a constant therefore scores like a random ranker, e.g.
  ``Recall@K = min(K, N) / N`` for ``N`` candidates.

Exactness and reproducibility guarantee: the integer counts are exact (integer all-reduces).
Every user's (HR, MRR) and every target's (Recall, NDCG, Precision: the target's share of its
user's value) contribution is a float64 function of the user's integer counts computed
elementwise, in a fixed order, on the CPU (no float reduction whose grouping could depend on
batch shape). These contributions are summed *exactly* (every float64 is an integer multiple
of ``2**-1074``; the sums are Python integers, gathered across ranks at the end), and each
mean is a single correctly rounded division ``exact_sum / num_users``. The metrics are
therefore bit-identical for any world size, any split of users between ranks, any batching and
any user order, as long as the integer counts are the same. (As for the single-target
evaluator, the counts themselves come from the scores, and fp32 scores can differ in the last
bit between GEMM batchings; with exactly representable dot products they cannot.)

DiffRec's code divides by *all* evaluated users, including those without targets (who score
0). Its numbers are ours times ``num_users / (num_users + num_skipped_users)``.

Cost per call: as :func:`~recsys_dist.eval.ranking.rank_targets`, plus two ``searchsorted``
of every score against the user's sorted target scores (``O(log T)``), so peak extra memory is
about ``B * item_chunk * (element size + 17 bytes)`` for ``B`` gathered users with targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist

from recsys_dist.eval.metrics import TIE_RULES, check_ks, check_ties
from recsys_dist.distributed import gather_rows, rank_and_world
from recsys_dist.eval.ranking import (
    _FLOAT_DTYPES,
    _H_B,
    _H_D,
    _H_DTYPE,
    _H_KINDS,
    _H_L,
    _H_LO,
    _H_MASK,
    _H_MAXK,
    _H_NROWS_LOCAL,
    _H_NUM_ROWS,
    _H_OK,
    _H_TIES,
    _H_TOPK,
    _HEADER_LEN,
    DEFAULT_SCORE_CACHE_BYTES,
    _begin_call,
    _exchange_headers,
    _positions_mask,
    _problem_kinds,
    _scores,
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

#: Metric kinds reported per cutoff, in output order.
MULTI_METRIC_KINDS: tuple[str, ...] = ("Recall", "NDCG", "HR", "Precision", "MRR")

# Extra header columns after ranking.py's layout (its checks read only their own columns).
_X_T, _X_KEPT = _HEADER_LEN, _HEADER_LEN + 1
_MULTI_HEADER_LEN = _HEADER_LEN + 2

# Exact sums are kept as integers in units of 2**-_EXACT_BITS (the smallest float64 step).
_EXACT_BITS = 1074
_BIG = 1 << 40  # "no position" for min-reductions over positions (> any catalog size)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass
class MultiRankResult:
    """Outcome of one :func:`rank_target_sets` call, as seen by one rank.

    All per-target tensors are ``(b_r, T_r)`` ``torch.long`` (the caller's own ``target_ids``
    shape), on the CPU, ``0`` in slots that are not targets (``valid`` False: padding ``0`` or a
    repeated id).

    Attributes:
        valid: ``(b_r, T_r)`` bool, slot holds a target (non-zero, first occurrence of its id).
        num_targets: ``(b_r,)`` number of targets per own user (0 = skipped user).
        greater: non-target candidates scoring strictly higher than the target (``g``).
        equal: non-target candidates scoring exactly the target's score (``e``).
        target_greater: other targets of the user scoring strictly higher (``G``).
        target_equal: other targets of the user with exactly the same score (``m - 1``).
        tie_index: tied targets in earlier slots (``i``, ``0 .. m - 1``).
        target_scores: ``(b_r, T_r)`` target scores (query dtype), as computed by the owner of
            each target row; 0 in invalid slots.
        ks: metric cutoffs.
        ties: tie rule of ``metrics``.
        num_local_users: users with at least one target on this rank.
        num_local_skipped: users without targets on this rank.
        num_users: users with targets of this call, all ranks.
        num_skipped_users: users without targets of this call, all ranks.
        metrics: global means over this call's users with targets, identical on every rank
            (see :func:`multi_metrics_from_sums`).
    """

    valid: torch.Tensor
    num_targets: torch.Tensor
    greater: torch.Tensor
    equal: torch.Tensor
    target_greater: torch.Tensor
    target_equal: torch.Tensor
    tie_index: torch.Tensor
    target_scores: torch.Tensor
    ks: tuple[int, ...]
    ties: str
    num_local_users: int
    num_local_skipped: int
    num_users: int
    num_skipped_users: int
    metrics: dict[str, float] = field(default_factory=dict)

    def counts(self) -> tuple[torch.Tensor, ...]:
        """``(valid, greater, equal, target_greater, target_equal, tie_index)``."""
        return (self.valid, self.greater, self.equal, self.target_greater, self.target_equal,
                self.tie_index)

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(start, size)`` of every target's tie group: the target is at one of positions
        ``start .. start + size - 1`` (0-based); ``size == 1`` means untied."""
        m = self.target_equal + 1
        return self.greater + self.target_greater, self.equal + m


# --------------------------------------------------------------------------------------------
# metrics from integer counts
# --------------------------------------------------------------------------------------------


def multi_metric_names(ks: Sequence[int]) -> list[str]:
    """Metric keys in output order, e.g. ``["Recall@10", "NDCG@10", "HR@10", ...]``."""
    return [f"{kind}@{k}" for k in ks for kind in MULTI_METRIC_KINDS]


@lru_cache(maxsize=16)
def _gain_tables(max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``F[r] = 1/log2(r+2)`` for ``r < max_k`` and prefix sums ``D[x] = sum_{r<x} F[r]``
    (``x <= max_k``), float64, summed sequentially in Python (deterministic)."""
    f = [1.0 / math.log2(r + 2) for r in range(max_k)]
    d = [0.0]
    for v in f:
        d.append(d[-1] + v)
    return torch.tensor(f + [0.0], dtype=torch.float64), torch.tensor(d, dtype=torch.float64)


def _as_cpu_long(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.long)


def _contributions(
    valid: torch.Tensor,
    greater: torch.Tensor,
    equal: torch.Tensor,
    target_greater: torch.Tensor,
    target_equal: torch.Tensor,
    tie_index: torch.Tensor,
    ks: Sequence[int],
    ties: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-target (Recall, NDCG, Precision: ``(b, T)``, 0 in invalid slots) and per-user
    (HR, MRR: ``(b,)``, 0 for users without targets) float64 contributions, plus ``(b,)``
    target counts. Elementwise float64 arithmetic only (plus sequential loops), so every
    entry is a deterministic function of its user's integers (module docstring)."""
    valid = valid.detach().cpu().bool()
    g, e = _as_cpu_long(greater), _as_cpu_long(equal)
    tg, te, ti = _as_cpu_long(target_greater), _as_cpu_long(target_equal), _as_cpu_long(tie_index)
    if valid.dim() != 2 or any(t.shape != valid.shape for t in (g, e, tg, te, ti)):
        raise ValueError("target-set counts must all be (b, T) tensors of one shape")
    if valid.shape[1] == 0:  # no target slots at all: one empty slot keeps reductions simple
        valid = torch.zeros(valid.shape[0], 1, dtype=torch.bool)
        g = e = tg = te = ti = torch.zeros(valid.shape, dtype=torch.long)
    b = valid.shape[0]
    nt = valid.sum(dim=1)
    a = torch.where(valid, g + tg, 0)  # start of the target's tie group
    m = torch.where(valid, te + 1, 0)  # targets in the group
    n = torch.where(valid, e + te + 1, 1)  # members of the group
    if ties == "expected":
        lo, cnt = a, n
    elif ties == "optimistic":
        lo, cnt = a + ti, torch.ones_like(n)
    else:
        lo, cnt = a + e + ti, torch.ones_like(n)
    lo = torch.where(valid, lo, _BIG)
    cnt_f = cnt.double()
    nt_f = nt.clamp(min=1).double()[:, None]
    max_k = max(ks, default=0)
    f_tab, d_tab = _gain_tables(max_k)
    zero = torch.zeros((), dtype=torch.float64)

    # first group holding targets (for MRR): start, size, targets
    a1 = torch.where(valid, a, _BIG).amin(dim=1)
    first = valid & (a == a1[:, None])
    n1 = torch.where(first, n, 0).amax(dim=1)
    m1 = torch.where(first, m, 0).amax(dim=1)
    best = lo.amin(dim=1)  # best position under the deterministic rules

    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hits = torch.minimum((k - lo).clamp(min=0), cnt)  # expected: slots of the group < k
        hits = torch.where(valid, hits, 0).double()
        out[f"Recall@{k}"] = hits / (cnt_f * nt_f)
        out[f"Precision@{k}"] = hits / (cnt_f * k)
        single = torch.where(lo < k, f_tab[lo.clamp(max=max_k)], zero)
        spread = (d_tab[(lo + cnt).clamp(max=k)] - d_tab[lo.clamp(max=k)]) / cnt_f
        dcg = torch.where(valid, torch.where(cnt == 1, single, spread), zero)
        idcg = d_tab[torch.minimum(nt, torch.tensor(k)).clamp(min=1)][:, None]
        out[f"NDCG@{k}"] = dcg / idcg

        if ties == "expected":
            full = valid & (a + n <= k)
            strad = valid & (a < k) & (a + n > k)
            # at most one group straddles the cutoff: every straddling target shares a, n, m
            a_s = torch.where(strad, a, 0).amax(dim=1)
            n_s = torch.where(strad, n, 0).amax(dim=1)
            m_s = torch.where(strad, m, 0).amax(dim=1)
            c = k - a_s
            p_miss = torch.ones(b, dtype=torch.float64)
            for i in range(int(m_s.max()) if b else 0):  # sequential product: deterministic
                factor = (n_s - c - i).clamp(min=0).double() / (n_s - i).clamp(min=1).double()
                p_miss = p_miss * torch.where(i < m_s, factor, torch.ones((), dtype=torch.float64))
            hr = torch.where(full.any(dim=1), torch.ones((), dtype=torch.float64),
                             torch.where(strad.any(dim=1), 1.0 - p_miss, zero))
        else:
            hr = (best < k).double()
        out[f"HR@{k}"] = hr

    # MRR: one pass over positions j < max_k, accumulated per cutoff in a fixed order
    if ties == "expected":
        mrr = {k: torch.zeros(b, dtype=torch.float64) for k in ks}
        s = torch.ones(b, dtype=torch.float64)  # P(best slot of the first group >= j)
        m1f = m1.double()
        for j in range(max_k):
            den = (n1 - j).clamp(min=1).double()
            p_j = torch.where(n1 - j > 0, s * m1f / den, zero)  # P(best slot == j)
            term = p_j / (a1 + j + 1).double()
            for k in ks:
                mrr[k] = mrr[k] + torch.where(a1 + j < k, term, zero)
            s = s * ((n1 - m1 - j).clamp(min=0).double() / den)
        for k in ks:
            out[f"MRR@{k}"] = mrr[k]
    else:
        for k in ks:
            out[f"MRR@{k}"] = torch.where(best < k, 1.0 / (best + 1).double(), zero)
    return out, nt


def _exact_sum(values: torch.Tensor) -> int:
    """``sum(values) * 2**1074`` exactly, as a Python int (``values``: finite floats).

    Every finite float64 is ``M * 2**(E - 53)`` with an integer ``|M| < 2**53``; values are
    bucketed by ``E`` and their ``M`` summed in two 27-bit limbs (exact in int64 for up to
    ``2**36`` values), then the buckets are shifted into place with Python integers.
    """
    v = values.detach().to("cpu", torch.float64).reshape(-1)
    v = v[v != 0]
    if v.numel() == 0:
        return 0
    if not bool(torch.isfinite(v).all()):
        raise ValueError("exact sum of non-finite values")
    mant, expo = torch.frexp(v)
    mant_int = (mant * 2.0**53).to(torch.long)  # exact: |mant| in [0.5, 1)
    hi = torch.div(mant_int, 1 << 26, rounding_mode="floor")
    lo = mant_int - hi * (1 << 26)
    uniq, inv = torch.unique(expo.to(torch.long), return_inverse=True)
    hi_sum = torch.zeros(uniq.numel(), dtype=torch.long).scatter_add_(0, inv, hi)
    lo_sum = torch.zeros(uniq.numel(), dtype=torch.long).scatter_add_(0, inv, lo)
    total = 0
    for ex, h, l in zip(uniq.tolist(), hi_sum.tolist(), lo_sum.tolist()):
        s = (h << 26) + l
        shift = ex - 53 + _EXACT_BITS
        total += s << shift if shift >= 0 else s >> -shift  # exact: s is a multiple of 2**-shift
    return total


def multi_metric_sums(
    valid: torch.Tensor,
    greater: torch.Tensor,
    equal: torch.Tensor,
    target_greater: torch.Tensor,
    target_equal: torch.Tensor,
    tie_index: torch.Tensor,
    ks: Sequence[int],
    ties: str = "expected",
) -> tuple[dict[str, int], int, int, int]:
    """Exact metric sums of ``b`` users from their ``(b, T)`` target-set counts.

    Returns:
        ``(sums, num_users, num_skipped, num_targets)``: ``sums[name]`` is the exact sum over
        users with targets, as a Python int in units of ``2**-1074`` (module docstring);
        ``num_users`` counts users with targets, ``num_skipped`` those without.
    """
    ks = check_ks(ks)
    ties = check_ties(ties)
    contrib, nt = _contributions(valid, greater, equal, target_greater, target_equal,
                                 tie_index, ks, ties)
    sums = {name: _exact_sum(contrib[name]) for name in multi_metric_names(ks)}
    has = int((nt > 0).sum())
    return sums, has, int(nt.numel()) - has, int(nt.sum())


def multi_metrics_from_sums(
    sums: dict[str, int], num_users: int, ks: Sequence[int], num_skipped: int = 0,
    num_targets: int | None = None,
) -> dict[str, float]:
    """Means from exact sums (one correctly rounded division each; ``nan`` when
    ``num_users == 0``), plus ``"num_users"``, ``"num_skipped_users"`` (and ``"num_targets"``)."""
    out: dict[str, float] = {}
    for name in multi_metric_names(ks):
        out[name] = sums[name] / (num_users << _EXACT_BITS) if num_users > 0 else math.nan
    out["num_users"] = int(num_users)
    out["num_skipped_users"] = int(num_skipped)
    if num_targets is not None:
        out["num_targets"] = int(num_targets)
    return out


def per_user_multi_metrics(
    valid: torch.Tensor,
    greater: torch.Tensor,
    equal: torch.Tensor,
    target_greater: torch.Tensor,
    target_equal: torch.Tensor,
    tie_index: torch.Tensor,
    ks: Sequence[int],
    ties: str = "expected",
) -> dict[str, torch.Tensor]:
    """Per-user metrics, float64 ``(b,)`` each (``nan`` for users without targets); the
    per-target shares are added in slot order. For inspection: the means of
    :class:`MultiMetricAccumulator` use exact sums instead."""
    ks = check_ks(ks)
    ties = check_ties(ties)
    contrib, nt = _contributions(valid, greater, equal, target_greater, target_equal,
                                 tie_index, ks, ties)
    out: dict[str, torch.Tensor] = {}
    for name in multi_metric_names(ks):
        c = contrib[name]
        if c.dim() == 2:
            acc = torch.zeros(c.shape[0], dtype=torch.float64)
            for t in range(c.shape[1]):
                acc = acc + c[:, t]
            c = acc
        out[name] = torch.where(nt > 0, c, torch.full((), math.nan, dtype=torch.float64))
    return out


class MultiMetricAccumulator:
    """Accumulates exact target-set metric sums over eval batches; one collective at the end.

    Each rank calls :meth:`update` with every batch's :class:`MultiRankResult` (only the rank's
    own users are added); then every rank calls :meth:`compute` collectively. The metrics are
    recomputed from the integer counts under this accumulator's ``ks`` and ``ties``, so the
    result may have been ranked with any cutoffs and rule. State: Python integers.

    Example::

        acc = MultiMetricAccumulator(ks=(10, 20))
        for i in range(max_over_ranks(len(batches), group)):
            ...
            acc.update(rank_target_sets(q, tgt, block, lo, num_rows, masked, group=group))
        acc.compute(group)  # {"Recall@10": .., "NDCG@10": .., ..., "num_skipped_users": 3}
    """

    def __init__(self, ks: Sequence[int] = (10, 20), ties: str = "expected") -> None:
        self.ks: tuple[int, ...] = check_ks(ks)
        self.ties: str = check_ties(ties)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far (local, not collective)."""
        self.sums: dict[str, int] = {name: 0 for name in multi_metric_names(self.ks)}
        self.num_users: int = 0
        self.num_skipped: int = 0
        self.num_targets: int = 0

    def update(self, result: MultiRankResult) -> None:
        """Add one batch's own users (no communication)."""
        self.update_counts(*result.counts())

    def update_counts(
        self,
        valid: torch.Tensor,
        greater: torch.Tensor,
        equal: torch.Tensor,
        target_greater: torch.Tensor,
        target_equal: torch.Tensor,
        tie_index: torch.Tensor,
    ) -> None:
        """Add users given directly as ``(b, T)`` target-set counts (no communication)."""
        sums, users, skipped, targets = multi_metric_sums(
            valid, greater, equal, target_greater, target_equal, tie_index, self.ks, self.ties
        )
        for name, v in sums.items():
            self.sums[name] += v
        self.num_users += users
        self.num_skipped += skipped
        self.num_targets += targets

    def local_metrics(self) -> dict[str, float]:
        """Means over this rank's own users only (no communication)."""
        return multi_metrics_from_sums(self.sums, self.num_users, self.ks, self.num_skipped,
                                       self.num_targets)

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Global means over every user with targets on every rank (collective).

        Returns ``{"Recall@K": .., "NDCG@K": .., "HR@K": .., "Precision@K": .., "MRR@K": ..,
        ..., "num_users": N, "num_skipped_users": S, "num_targets": T}``, identical on every
        rank and bit-identical for any world size / split / batching of the same users. Raises
        ``ValueError`` on every rank if the ranks' accumulators disagree on ``ks`` or ``ties``.
        The accumulator is not reset.
        """
        state: dict[str, Any] = {
            "ks": self.ks, "ties": self.ties, "sums": self.sums, "users": self.num_users,
            "skipped": self.num_skipped, "targets": self.num_targets,
        }
        _, world = rank_and_world(group)
        parts: list[Any] = [state]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, state, group=group)
        configs = [(p["ks"], p["ties"]) for p in parts]
        if len(set(configs)) > 1:
            raise ValueError(f"MultiMetricAccumulator.compute: ranks disagree on (ks, ties): {configs}")
        sums = {name: sum(p["sums"][name] for p in parts) for name in multi_metric_names(self.ks)}
        return multi_metrics_from_sums(
            sums, sum(p["users"] for p in parts), self.ks, sum(p["skipped"] for p in parts),
            sum(p["targets"] for p in parts),
        )


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_ids(ids: torch.Tensor | None, name: str, b: int | None, num_rows: int) -> list[str]:
    if ids is None:
        return []
    if ids.dim() != 2 or (b is not None and ids.shape[0] != b):
        return [f"{name} must be (b_r, width) with b_r = {b}, got {tuple(ids.shape)}"]
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        return [f"{name} must be integer ids, got {ids.dtype}"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        return [f"{name} must lie in [0, {num_rows}) (0 = padding)"]
    return []


def _local_problems(
    queries: torch.Tensor,
    target_ids: torch.Tensor,
    item_block: torch.Tensor,
    row_offset: int,
    num_rows: int,
    masked_ids: torch.Tensor | None,
    item_chunk: int,
) -> list[str]:
    """Everything wrong with this rank's inputs (empty list when fine). NaN/inf messages use
    the prefixes that :func:`recsys_dist.eval.ranking._problem_kinds` recognises."""
    problems: list[str] = []
    if item_block.dim() != 2:
        return [f"item_block must be 2-D (n_r, d), got shape {tuple(item_block.shape)}"]
    n_r, d = item_block.shape
    if queries.dim() != 2 or queries.shape[1] != d:
        problems.append(f"queries must be (b_r, {d}), got shape {tuple(queries.shape)}")
    if queries.dtype not in _FLOAT_DTYPES:
        problems.append(f"queries must be floating point, got {queries.dtype}")
    elif queries.numel() and not bool(torch.isfinite(queries).all()):
        bad = int((~torch.isfinite(queries)).any(dim=-1).sum()) if queries.dim() == 2 else -1
        problems.append(f"queries hold NaN/inf values ({bad} of {queries.shape[0]} users)")
    if item_block.dtype in _FLOAT_DTYPES and item_block.numel() and not bool(torch.isfinite(item_block).all()):
        bad = int((~torch.isfinite(item_block)).any(dim=-1).sum())
        problems.append(f"item rows hold NaN/inf values ({bad} rows from global id {row_offset})")
    b = int(queries.shape[0]) if queries.dim() == 2 else None
    problems += _check_ids(target_ids, "target_ids", b, num_rows)
    problems += _check_ids(masked_ids, "masked_ids", b, num_rows)
    if not 0 <= row_offset <= num_rows or row_offset + n_r > num_rows:
        problems.append(f"rows [{row_offset}, {row_offset + n_r}) exceed num_rows={num_rows}")
    if item_chunk < 1:
        problems.append(f"item_chunk must be >= 1, got {item_chunk}")
    devices = {t.device for t in (queries, target_ids, item_block)}
    if masked_ids is not None:
        devices.add(masked_ids.device)
    if len(devices) > 1:
        problems.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return problems


def _dedupe(ids: torch.Tensor) -> torch.Tensor:
    """``(b, T)`` ids with every repeated id after its first slot replaced by 0 (padding)."""
    if ids.shape[1] <= 1:
        return ids.clone()
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    dup_sorted = torch.zeros_like(ids, dtype=torch.bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
    return ids.masked_fill(dup, 0)


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    out = x.new_zeros((x.shape[0], width))
    out[:, : x.shape[1]] = x
    return out


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
    (collective over ``group``; see the module docstring for candidates, ties and metrics).

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

    # ---- normalise an empty batch (b_r = 0) ------------------------------------------------
    d = item_block.shape[-1] if item_block.dim() == 2 else -1
    if queries.numel() == 0 and target_ids.numel() == 0 and d >= 0:
        queries = queries.reshape(0, d)
        target_ids = target_ids.reshape(0, target_ids.shape[-1] if target_ids.dim() == 2 else 0)
        if masked_ids is not None and masked_ids.numel() == 0:
            masked_ids = masked_ids.reshape(0, masked_ids.shape[-1] if masked_ids.dim() == 2 else 0)

    problems = _local_problems(queries, target_ids, item_block, row_offset, num_rows,
                               masked_ids, item_chunk)
    ok = not problems
    b = int(queries.shape[0]) if ok else 0
    t_local = int(target_ids.shape[1]) if ok else 0
    m_local = int(masked_ids.shape[1]) if ok and masked_ids is not None else 0
    n_local = int(item_block.shape[0]) if item_block.dim() == 2 else 0
    dtype_code = _FLOAT_DTYPES.index(queries.dtype) if queries.dtype in _FLOAT_DTYPES else -1
    if ok:
        clean = _dedupe(target_ids.to(device=device, dtype=torch.long))
        keep = (clean != 0).any(dim=1)
        kept = int(keep.sum())
    else:
        clean, keep, kept = None, None, 0

    # ---- 1. headers: validate collectively, learn the batch sizes -------------------------
    header = [0] * _MULTI_HEADER_LEN
    header[_H_OK], header[_H_B], header[_H_L], header[_H_D] = int(ok), b, m_local, d
    header[_H_DTYPE], header[_H_LO], header[_H_NROWS_LOCAL] = dtype_code, row_offset, n_local
    header[_H_NUM_ROWS], header[_H_TOPK], header[_H_MASK] = num_rows, 0, 1
    header[_H_MAXK], header[_H_TIES] = max_k, TIE_RULES.index(ties)
    header[_H_KINDS], header[_X_T], header[_X_KEPT] = _problem_kinds(problems), t_local, kept
    header_t = torch.tensor(header, dtype=torch.long, device=device)
    headers = _exchange_headers(header_t, problems, world, group, num_rows, "rank_target_sets")
    assert clean is not None and keep is not None

    sizes = [int(s) for s in headers[:, _X_KEPT].tolist()]
    total = sum(sizes)
    num_skipped = int(headers[:, _H_B].sum()) - total
    first_user = sum(sizes[:rank])
    dtype = queries.dtype
    t_max = int(headers[:, _X_T].max())
    m_max = int(headers[:, _H_L].max())

    def zeros_bt(dt: torch.dtype = torch.long) -> torch.Tensor:
        return torch.zeros(b, t_local, dtype=dt)

    if total == 0:  # nobody has targets: identical decision on every rank, no more collectives
        z = zeros_bt()
        return MultiRankResult(
            valid=zeros_bt(torch.bool), num_targets=torch.zeros(b, dtype=torch.long), greater=z,
            equal=z.clone(), target_greater=z.clone(), target_equal=z.clone(),
            tie_index=z.clone(), target_scores=zeros_bt(dtype), ks=ks, ties=ties,
            num_local_users=0, num_local_skipped=b, num_users=0, num_skipped_users=num_skipped,
            metrics=multi_metrics_from_sums({n: 0 for n in multi_metric_names(ks)}, 0, ks,
                                            num_skipped, 0),
        )

    # ---- 2. gather queries and id lists of the users with targets -------------------------
    q_local = queries.to(device)[keep]
    ids_local = _pad_cols(clean[keep], t_max)
    if m_max:
        masked = masked_ids.to(device=device, dtype=torch.long)[keep] if masked_ids is not None \
            else torch.zeros(kept, 0, dtype=torch.long, device=device)
        ids_local = torch.cat([ids_local, _pad_cols(masked, m_max)], dim=1)
    if world > 1:
        q_all = gather_rows(q_local.detach(), sizes, group)
        ids_all = gather_rows(ids_local, sizes, group)
    else:
        q_all, ids_all = q_local.contiguous(), ids_local
    t_all = ids_all[:, :t_max].contiguous()
    h_all = ids_all[:, t_max:].contiguous() if m_max else None
    valid_all = t_all != 0

    # ---- 3. first pass: target scores from the owners' score matrices --------------------
    lo = int(row_offset)
    chunks = [(c0, min(c0 + item_chunk, n_local)) for c0 in range(0, n_local, item_chunk)]
    local_pos = t_all - lo
    owned = valid_all & (local_pos >= 0) & (local_pos < n_local)
    own_u, own_s = owned.nonzero(as_tuple=True)
    own_pos = local_pos[own_u, own_s]
    chunk_of = torch.div(own_pos, item_chunk, rounding_mode="floor")
    target_chunks = sorted(set(chunk_of.tolist()))

    t_scores = torch.zeros(total, t_max, dtype=dtype, device=device)
    cache: dict[int, torch.Tensor] = {}
    cache_used = 0
    for ci in target_chunks:
        c0, c1 = chunks[ci]
        s = _scores(q_all, item_block, c0, c1, dtype)
        sel = chunk_of == ci
        t_scores[own_u[sel], own_s[sel]] = s[own_u[sel], own_pos[sel] - c0]
        nbytes = s.numel() * s.element_size()
        if cache_used + nbytes <= score_cache_bytes:
            cache[ci] = s
            cache_used += nbytes
    if world > 1:
        # Zero everywhere except at the owner of each target: the sum is exact.
        dist.all_reduce(t_scores, op=dist.ReduceOp.SUM, group=group)

    # ---- 4. second pass: per user, histogram of "how many target scores are below" --------
    # For a user with target scores sorted ascending thr[0] <= ... <= thr[T-1], an item with
    # score s satisfies s > thr[p] iff searchsorted_left(thr, s) > p, and s >= thr[p] iff
    # searchsorted_right(thr, s) > p. So per-target counts are suffix sums of the histograms
    # of the two searchsorted indices over the user's non-target candidates. Invalid slots
    # hold -inf (harmless: the identities hold for any sorted sequence; their counts are
    # dropped).
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    thr = torch.where(valid_all, t_scores, neg_inf)
    thr_sorted, thr_order = torch.sort(thr, dim=1)
    thr_sorted = thr_sorted.contiguous()
    hist_gt = torch.zeros(total, t_max + 1, dtype=torch.long, device=device)
    hist_ge = torch.zeros(total, t_max + 1, dtype=torch.long, device=device)
    mismatch = torch.zeros(1, dtype=torch.long, device=device)
    nonfinite = torch.zeros(1, dtype=torch.long, device=device)
    for ci, (c0, c1) in enumerate(chunks):
        s = cache.pop(ci, None)
        if s is None:
            s = _scores(q_all, item_block, c0, c1, dtype)
            if ci in target_chunks:  # recomputed: must reproduce the shared target scores
                sel = chunk_of == ci
                again = s[own_u[sel], own_pos[sel] - c0]
                mismatch += (again != t_scores[own_u[sel], own_s[sel]]).sum()
        first_id = lo + c0
        width = c1 - c0
        excluded = _positions_mask(t_all, first_id, width)  # targets (and id 0 = padding)
        if h_all is not None:
            excluded |= _positions_mask(h_all, first_id, width)
        if first_id == 0:
            excluded[:, 0] = True  # padding row
        keep_col = (~excluded).to(torch.long)
        hist_gt.scatter_add_(1, torch.searchsorted(thr_sorted, s), keep_col)
        hist_ge.scatter_add_(1, torch.searchsorted(thr_sorted, s, right=True), keep_col)
        nonfinite += (~torch.isfinite(s)).sum()
        del s

    packed = torch.cat([hist_gt.reshape(-1), hist_ge.reshape(-1), mismatch, nonfinite])
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    if int(packed[-1]) != 0:
        raise ValueError(
            f"rank_target_sets: {int(packed[-1])} scores are NaN/inf (finite queries and rows "
            f"whose dot products overflow {dtype}); refusing to rank them"
        )
    if int(packed[-2]) != 0:
        raise RuntimeError(
            "rank_target_sets: recomputed score chunks did not reproduce the target scores "
            f"({int(packed[-2])} mismatches): the matmul is not deterministic here; raise "
            "score_cache_bytes so that the first-pass scores are reused"
        )
    n_hist = total * (t_max + 1)
    hist_gt = packed[:n_hist].view(total, t_max + 1).cpu()
    hist_ge = packed[n_hist:2 * n_hist].view(total, t_max + 1).cpu()
    # count for sorted position p = sum of the histogram over bins > p (suffix sums)
    gt_sorted = hist_gt.flip(1).cumsum(1).flip(1)[:, 1:]
    ge_sorted = hist_ge.flip(1).cumsum(1).flip(1)[:, 1:]
    order = thr_order.cpu()
    greater = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, order, gt_sorted)
    equal = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, order, ge_sorted) - greater

    # ---- 5. targets among themselves (from the shared scores; same on every rank) ---------
    valid_cpu = valid_all.cpu()
    thr_cpu = thr.cpu()
    desc, d_order = torch.sort(thr_cpu, dim=1, descending=True, stable=True)  # ties: slot order
    asc = (-desc).contiguous()  # ascending
    n_above = torch.searchsorted(asc, asc)  # targets strictly higher (invalid slots are -inf)
    n_upto = torch.searchsorted(asc, asc, right=True)
    pos_in_sorted = torch.arange(t_max).expand(total, t_max)
    target_greater = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, d_order, n_above)
    target_equal = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, d_order, n_upto - n_above - 1)
    tie_index = torch.zeros(total, t_max, dtype=torch.long).scatter_(1, d_order, pos_in_sorted - n_above)
    zero = torch.zeros((), dtype=torch.long)
    greater = torch.where(valid_cpu, greater, zero)
    equal = torch.where(valid_cpu, equal, zero)
    target_greater = torch.where(valid_cpu, target_greater, zero)
    target_equal = torch.where(valid_cpu, target_equal, zero)
    tie_index = torch.where(valid_cpu, tie_index, zero)

    # ---- 6. global metrics (every rank holds every user's counts) and own users -----------
    sums, users, _, n_targets = multi_metric_sums(
        valid_cpu, greater, equal, target_greater, target_equal, tie_index, ks, ties
    )
    metrics = multi_metrics_from_sums(sums, users, ks, num_skipped, n_targets)

    own = slice(first_user, first_user + kept)
    keep_cpu = keep.cpu()

    def scatter_own(x: torch.Tensor, dt: torch.dtype = torch.long) -> torch.Tensor:
        out = zeros_bt(dt)
        out[keep_cpu] = x[own, :t_local].to(dt)
        return out

    valid_own = scatter_own(valid_cpu, torch.bool)
    scores_cpu = torch.where(valid_all, t_scores, torch.zeros((), dtype=dtype, device=device)).cpu()
    return MultiRankResult(
        valid=valid_own,
        num_targets=valid_own.sum(dim=1),
        greater=scatter_own(greater),
        equal=scatter_own(equal),
        target_greater=scatter_own(target_greater),
        target_equal=scatter_own(target_equal),
        tie_index=scatter_own(tie_index),
        target_scores=scatter_own(scores_cpu, dtype),
        ks=ks,
        ties=ties,
        num_local_users=kept,
        num_local_skipped=b - kept,
        num_users=total,
        num_skipped_users=num_skipped,
        metrics=metrics,
    )
