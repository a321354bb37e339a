"""Metrics of *sets* of held-out targets per user (DiffRec-style) from exact integer counts.

This is the metric side of :func:`~recsys_dist.eval.multi.rank_target_sets` (which produces the
counts of a :class:`MultiRankResult`); it depends only on :mod:`~recsys_dist.eval.metrics`.

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

Ties (``ties``): target ``t``'s tie group starts at ``A_t = g_t + G_t`` and has
``n_t = e_t + m_t`` members. ``"optimistic"``: ``pos_t = A_t + i_t`` (targets win ties against
non-targets); ``"pessimistic"``: ``pos_t = A_t + e_t + i_t``; ``"expected"`` (default): the exact
expectation over a uniformly random order inside every tie group, in closed form (derivation in
``docs/evaluation.md``). A model whose scores collapsed to a constant scores like a random ranker,
e.g. ``Recall@K = min(K, N) / N`` for ``N`` candidates.

Exactness: every user's (HR, MRR) and every target's (Recall, NDCG, Precision: its share of its
user's value) contribution is a float64 function of the user's integer counts, computed
elementwise in a fixed order on the CPU. The contributions are summed *exactly* (as Python
integers in units of ``2**-1074``, the smallest float64 step), gathered across ranks at the end,
and each mean is one correctly rounded division ``exact_sum / num_users``: bit-identical for any
world size, split of users between ranks, batching and user order, given the same counts.

Users without targets are skipped (not in the means) and counted (``num_skipped_users``);
DiffRec's code divides by *all* users, so its numbers are ours times
``num_users / (num_users + num_skipped_users)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist

from recsys_dist.distributed import gather_objects
from recsys_dist.eval.metrics import check_ks, check_ties

__all__ = [
    "MULTI_METRIC_KINDS",
    "MultiRankResult",
    "MultiMetricAccumulator",
    "multi_metric_names",
    "multi_metric_sums",
    "multi_metrics_from_sums",
    "per_user_multi_metrics",
]

#: Metric kinds reported per cutoff, in output order.
MULTI_METRIC_KINDS: tuple[str, ...] = ("Recall", "NDCG", "HR", "Precision", "MRR")

# Exact sums are kept as integers in units of 2**-_EXACT_BITS (the smallest float64 step).
_EXACT_BITS = 1074
_BIG = 1 << 40  # "no position" for min-reductions over positions (> any catalog size)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass
class MultiRankResult:
    """Outcome of one :func:`~recsys_dist.eval.multi.rank_target_sets` call, as seen by one rank.

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
        parts: list[Any] = gather_objects(state, group)
        configs = [(p["ks"], p["ties"]) for p in parts]
        if len(set(configs)) > 1:
            raise ValueError(f"MultiMetricAccumulator.compute: ranks disagree on (ks, ties): {configs}")
        sums = {name: sum(p["sums"][name] for p in parts) for name in multi_metric_names(self.ks)}
        return multi_metrics_from_sums(
            sums, sum(p["users"] for p in parts), self.ks, sum(p["skipped"] for p in parts),
            sum(p["targets"] for p in parts),
        )
