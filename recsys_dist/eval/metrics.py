"""Ranking metrics for a single relevant item per user, accumulated exactly across ranks.

This is the leaf of :mod:`recsys_dist.eval`: the integer counts of a ranking call
(:class:`RankResult`, from :func:`~recsys_dist.eval.ranking.rank_targets`) go in, HR@K / NDCG@K
come out; nothing here imports the ranking code.

With one held-out target per user, let ``g`` be the number of candidates scoring *strictly
higher* than the target and ``e`` the number scoring *exactly equal* (ties). The target's
0-based position ``r`` (``r = 0`` is the best) depends on how ties are ordered:

* ``"expected"`` (default): the expectation over a uniformly random order of the tied items:
  ``r`` is uniform on ``g .. g + e``, and HR@K / NDCG@K are averaged *exactly* over those
  ``e + 1`` positions. A collapsed model (all scores equal) therefore scores like a random
  ranker (``HR@K = K / (n_candidates + 1)``), never like a perfect one.
* ``"optimistic"``: ``r = g`` (the target wins every tie; what ``s > target`` counting gives).
* ``"pessimistic"``: ``r = g + e`` (the target loses every tie).

Per position: ``HR@K = 1[r < K]``, ``NDCG@K = 1 / log2(r + 2)`` if ``r < K`` else ``0``.

Exactness: each rank keeps integers only - a histogram ``hist[r]`` of its own users with a single
position ``r < max(ks)`` and, under the expected rule, a count of tied users per ``(g, e)`` with
``g < max(ks)`` - reduced exactly across ranks; the means are formed once, in a fixed order. The
metrics are therefore bit-identical for any world size, split of users between ranks and
batching, and every user counts exactly once. (The integer counts themselves come from fp32
scores, which can differ in the last bit between GEMM batchings.)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from recsys_dist.distributed import collective_device, gather_objects, rank_and_world, sum_over_ranks

__all__ = [
    "TIE_RULES",
    "TieCounts",
    "check_ks",
    "check_ties",
    "positions_summary",
    "metric_names",
    "rank_histogram",
    "metric_sums_from_histogram",
    "metrics_from_histogram",
    "per_user_metrics",
    "RankResult",
    "MetricAccumulator",
]


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Validate cutoffs: positive ints, returned as a de-duplicated tuple in the given order."""
    out: list[int] = []
    for k in ks:
        k = int(k)
        if k < 1:
            raise ValueError(f"metric cutoffs must be >= 1, got {k}")
        if k not in out:
            out.append(k)
    return tuple(out)


TIE_RULES: tuple[str, ...] = ("expected", "optimistic", "pessimistic")

TieCounts = dict[tuple[int, int], int]
"""``{(g, e): number of users}`` for tied users (``e > 0``, ``g < max(ks)``), expected rule."""


def check_ties(ties: str) -> str:
    """Validate a tie rule name (one of :data:`TIE_RULES`)."""
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r} (known: {', '.join(TIE_RULES)})")
    return ties


def positions_summary(
    greater: torch.Tensor, equal: torch.Tensor, max_k: int, ties: str = "expected"
) -> tuple[torch.Tensor, TieCounts]:
    """Integer summary of ``b`` users' target positions under a tie rule.

    Args:
        greater: ``(b,)`` integer counts of candidates scoring strictly higher than the target.
        equal: ``(b,)`` integer counts of candidates scoring exactly the target's score.
        max_k: the largest cutoff.
        ties: ``"expected"`` | ``"optimistic"`` | ``"pessimistic"`` (module docstring).

    Returns:
        ``(hist, tied)``: ``hist`` is a ``(max_k,)`` ``torch.long`` histogram of users with a
        single position (see :func:`rank_histogram`); ``tied`` counts the other users (expected
        rule, ``e > 0``) per ``(g, e)``; users whose every position is ``>= max_k`` appear in
        neither (they contribute 0 at every cutoff) but still count in the caller's user total.
    """
    check_ties(ties)
    g = greater.reshape(-1).long().cpu()
    e = equal.reshape(-1).long().cpu()
    if (g < 0).any() or (e < 0).any():
        raise ValueError("rank counts must be >= 0")
    if ties == "optimistic":
        return rank_histogram(g, max_k), {}
    if ties == "pessimistic":
        return rank_histogram(g + e, max_k), {}
    single = e == 0
    tied_sel = (~single) & (g < max_k)
    tied: TieCounts = dict(Counter(zip(g[tied_sel].tolist(), e[tied_sel].tolist())))
    return rank_histogram(g[single], max_k), tied


def _tied_contribution(g: int, e: int, k: int) -> tuple[float, float]:
    """Expected (HR@k, NDCG@k) of one user whose position is uniform on ``g .. g + e``."""
    last = min(k - 1, g + e)
    if last < g:
        return 0.0, 0.0
    dcg = 0.0
    for r in range(g, last + 1):
        dcg += 1.0 / math.log2(r + 2)
    return (last - g + 1) / (e + 1), dcg / (e + 1)


def merge_tie_counts(parts: Iterable[Mapping[tuple[int, int], int]]) -> TieCounts:
    """Sum several :data:`TieCounts` (exact: integer counts)."""
    out: Counter[tuple[int, int]] = Counter()
    for part in parts:
        out.update({(int(g), int(e)): int(n) for (g, e), n in part.items()})
    return dict(out)


def metric_names(ks: Sequence[int]) -> list[str]:
    """Keys produced by :func:`metrics_from_histogram`, e.g. ``["HR@10", "NDCG@10"]``."""
    names: list[str] = []
    for k in ks:
        names += [f"HR@{k}", f"NDCG@{k}"]
    return names


def rank_histogram(ranks: torch.Tensor, max_k: int) -> torch.Tensor:
    """Count users per rank position below ``max_k``.

    Args:
        ranks: ``(b,)`` integer tensor of 0-based target ranks (``0`` = best).
        max_k: histogram length (the largest metric cutoff).

    Returns:
        ``(max_k,)`` ``torch.long`` tensor on ``ranks.device``; entry ``r`` is the number of
        users whose rank equals ``r``. Users with ``rank >= max_k`` contribute nothing (their
        HR and NDCG are 0 at every cutoff) but still count in the user total kept by callers.
    """
    ranks = ranks.reshape(-1).long()
    if max_k <= 0:
        return torch.zeros(0, dtype=torch.long, device=ranks.device)
    if (ranks < 0).any():
        raise ValueError("ranks must be >= 0")
    inside = ranks[ranks < max_k]
    return torch.bincount(inside, minlength=max_k).to(torch.long)


def metric_sums_from_histogram(
    hist: torch.Tensor | Sequence[int], ks: Sequence[int],
    tied: Mapping[tuple[int, int], int] | None = None,
) -> dict[str, float]:
    """Sums over users of HR@K and NDCG@K from a rank histogram (see :func:`rank_histogram`)
    and, under the expected tie rule, the tied users' counts (see :func:`positions_summary`).

    Accumulated in Python floats in a fixed order (histogram position ascending, then tied
    ``(g, e)`` pairs ascending), so equal inputs give bit-identical sums.
    """
    counts = [int(c) for c in (hist.tolist() if isinstance(hist, torch.Tensor) else hist)]
    out: dict[str, float] = {}
    for k in ks:
        if k > len(counts):
            raise ValueError(f"histogram has {len(counts)} bins, cutoff {k} needs {k}")
        dcg = 0.0
        for r in range(k):
            if counts[r]:
                dcg += counts[r] / math.log2(r + 2)
        hr = float(sum(counts[:k]))
        for (g, e) in sorted(tied or {}):
            n = int(tied[(g, e)])  # type: ignore[index]
            h, c = _tied_contribution(g, e, k)
            hr += n * h
            dcg += n * c
        out[f"HR@{k}"] = hr
        out[f"NDCG@{k}"] = dcg
    return out


def metrics_from_histogram(
    hist: torch.Tensor | Sequence[int], num_users: int, ks: Sequence[int],
    tied: Mapping[tuple[int, int], int] | None = None,
) -> dict[str, float]:
    """Mean HR@K and NDCG@K from a (global) rank histogram.

    Args:
        hist: ``(>= max(ks),)`` integer counts of users per rank position (see
            :func:`rank_histogram`).
        num_users: total number of users the histogram was built from (users with rank
            ``>= max(ks)`` included).
        ks: cutoffs.
        tied: tied users per ``(g, e)`` (expected tie rule; see :func:`positions_summary`).

    Returns:
        ``{"HR@K": mean, "NDCG@K": mean, ...}`` as Python floats (unitless, in ``[0, 1]``), plus
        ``"num_users"`` (an int). The means are ``nan`` when ``num_users == 0``. The arithmetic
        is done in Python floats in a fixed order, so equal inputs give bit-identical outputs.
    """
    sums = metric_sums_from_histogram(hist, ks, tied)
    out: dict[str, float] = {}
    for name, total in sums.items():
        out[name] = total / num_users if num_users > 0 else math.nan
    out["num_users"] = int(num_users)
    return out


def per_user_metrics(ranks: torch.Tensor, ks: Sequence[int], equal: torch.Tensor | None = None,
                     ties: str = "optimistic") -> dict[str, torch.Tensor]:
    """Per-user HR@K and NDCG@K (float64, shape ``(b,)`` each) from ``(b,)`` counts of strictly
    higher candidates ``ranks`` and (for the expected / pessimistic rules) ``equal`` ties."""
    check_ties(ties)
    g = ranks.reshape(-1).long()
    e = torch.zeros_like(g) if equal is None else equal.reshape(-1).long()
    if ties == "pessimistic":
        g, e = g + e, torch.zeros_like(g)
    elif ties == "optimistic":
        e = torch.zeros_like(g)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hr, nd = zip(*(_tied_contribution(int(a), int(b), k) for a, b in zip(g.tolist(), e.tolist()))) \
            if g.numel() else ((), ())
        out[f"HR@{k}"] = torch.tensor(hr, dtype=torch.float64)
        out[f"NDCG@{k}"] = torch.tensor(nd, dtype=torch.float64)
    return out


@dataclass
class RankResult:
    """Outcome of one :func:`~recsys_dist.eval.ranking.rank_targets` call, as seen by one rank.

    Attributes:
        ranks: ``(b_r,)`` ``torch.long``, the number of candidates scoring strictly higher
            than each own user's target (its best possible 0-based position), in input order.
        ties_count: ``(b_r,)`` ``torch.long``, the number of candidates scoring exactly the
            target's score.
        target_scores: ``(b_r,)`` target scores (dot products in the query dtype), as computed
            by the owner of the target row.
        ks: metric cutoffs.
        ties: the tie rule the metrics use.
        local_rank_hist: ``(max(ks),)`` ``torch.long`` histogram of this rank's own users
            with a single position under ``ties`` (see :func:`positions_summary`).
        local_tied: the other own users (expected rule) per ``(g, e)``.
        num_local_users: ``b_r``.
        num_users: users of this call summed over all ranks (each counted once).
        metrics: ``{"HR@K": mean, "NDCG@K": mean, ..., "num_users": N}`` over all users of
            this call on all ranks (identical on every rank; ``nan`` means when ``N == 0``).
        topk_ids: ``(b_r, topk)`` ``torch.long`` global item ids of each own user's best
            candidates (score descending, then id ascending), or ``None`` when ``topk == 0``.
            Slots beyond the number of candidates hold ``-1``.
        topk_scores: ``(b_r, topk)`` matching scores (``-inf`` in empty slots), or ``None``.
    """

    ranks: torch.Tensor
    ties_count: torch.Tensor
    target_scores: torch.Tensor
    ks: tuple[int, ...]
    ties: str
    local_rank_hist: torch.Tensor
    local_tied: TieCounts
    num_local_users: int
    num_users: int
    metrics: dict[str, float] = field(default_factory=dict)
    topk_ids: torch.Tensor | None = None
    topk_scores: torch.Tensor | None = None

    def local_sums(self) -> dict[str, float]:
        """Sums (not means) of HR@K / NDCG@K over this rank's own users, plus ``"num_users"``."""
        out = metric_sums_from_histogram(self.local_rank_hist, self.ks, self.local_tied)
        out["num_users"] = self.num_local_users
        return out


class MetricAccumulator:
    """Accumulates rank histograms over many eval batches; all-reduces once at the end.

    Each rank calls :meth:`update` with the :class:`RankResult` of
    every batch (only the rank's *own* users are added, so nobody is counted twice), then every
    rank calls :meth:`compute` collectively. Ranks may have processed different numbers of
    batches (or of users); only the final :meth:`compute` is collective. State is a
    ``(max(ks),)`` ``torch.long`` histogram plus a user count, on the CPU.

    Example::

        acc = MetricAccumulator(ks=(5, 10))
        for i in range(max_over_ranks(len(batches), group)):
            ...
            acc.update(rank_targets(q, t, block, lo, num_rows, group=group, ks=(5, 10)))
        print(acc.compute(group))  # {"HR@5": .., "NDCG@5": .., ..., "num_users": 12345}
    """

    def __init__(self, ks: Sequence[int] = (5, 10, 20, 50), ties: str = "expected") -> None:
        self.ks: tuple[int, ...] = check_ks(ks)
        self.max_k: int = max(self.ks, default=0)
        self.ties: str = check_ties(ties)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far (local, not collective)."""
        self.hist: torch.Tensor = torch.zeros(self.max_k, dtype=torch.long)
        self.tied: TieCounts = {}
        self.num_users: int = 0

    def update(self, result: RankResult) -> None:
        """Add one batch's local histogram and local user count (no communication).

        ``result`` must have been computed with cutoffs whose maximum is at least
        ``max(self.ks)``.
        """
        if max(result.ks, default=0) < self.max_k:
            raise ValueError(
                f"result was ranked with ks={result.ks}; this accumulator needs max {self.max_k} "
                f"(ks={self.ks})"
            )
        self.update_ranks(result.ranks, result.ties_count)

    def update_ranks(self, ranks: torch.Tensor, equal: torch.Tensor | None = None) -> None:
        """Add this rank's own users given directly as ``(b,)`` counts of strictly higher
        candidates and ``(b,)`` counts of tied ones (``None``: no ties); no communication."""
        ranks = ranks.detach().reshape(-1)
        equal = torch.zeros_like(ranks) if equal is None else equal.detach().reshape(-1)
        hist, tied = positions_summary(ranks, equal, self.max_k, self.ties)
        self.hist += hist
        self.tied = merge_tie_counts([self.tied, tied])
        self.num_users += int(ranks.numel())

    def local_sums(self) -> dict[str, float]:
        """This rank's own (not reduced) metric *sums* over its users, plus ``"num_users"``."""
        out = metric_sums_from_histogram(self.hist, self.ks, self.tied)
        out["num_users"] = self.num_users
        return out

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Global means over every user of every rank (collective: all ranks must call it).

        Returns:
            ``{"HR@K": .., "NDCG@K": .., ..., "num_users": N}``; identical on every rank and
            bit-identical for any world size / batching of the same users. Means are ``nan``
            when no user was evaluated anywhere. The accumulator is not reset.
        """
        packed = torch.cat([self.hist, torch.tensor([self.num_users], dtype=torch.long)])
        tied = self.tied
        _, world = rank_and_world(group)
        if world > 1:
            packed = sum_over_ranks(packed.to(collective_device(group)), group).cpu()
            if self.ties == "expected":
                tied = merge_tie_counts(p or {} for p in gather_objects(tied, group))
        return metrics_from_histogram(packed[: self.max_k], int(packed[self.max_k]), self.ks, tied)
