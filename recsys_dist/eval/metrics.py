"""Ranking metrics for a single relevant item per user, accumulated exactly across ranks.

With one held-out target per user and its 0-based rank ``r`` among the candidates
(``r = 0`` is the best position):

* ``HR@K   = 1[r < K]``
* ``NDCG@K = 1 / log2(r + 2)`` if ``r < K`` else ``0`` (the ideal DCG of one relevant item is 1)

Both only depend on how many users landed at each rank ``r < max(ks)``. So instead of summing
floats (whose result depends on summation order, hence on world size and batching), each rank
keeps an integer histogram ``hist[r] = #{own users with rank r}`` for ``r < max(ks)`` plus its
user count; those integers are all-reduced (exact) and the means are formed once from the
global histogram. The final numbers are therefore bit-identical for any world size, any split
of users between ranks and any batching, and every user counts exactly once (each rank only
counts its own users).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from recsys_dist.eval.partition import collective_device, group_rank_and_size

if TYPE_CHECKING:  # pragma: no cover - import for annotations only
    from recsys_dist.eval.ranking import RankResult

__all__ = [
    "check_ks",
    "metric_names",
    "rank_histogram",
    "metric_sums_from_histogram",
    "metrics_from_histogram",
    "per_user_metrics",
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
    hist: torch.Tensor | Sequence[int], ks: Sequence[int]
) -> dict[str, float]:
    """Sums over users of HR@K and NDCG@K from a rank histogram (see :func:`rank_histogram`).

    ``HR@K`` sums are integers (returned as floats); ``NDCG@K`` sums are accumulated in Python
    floats in a fixed order (rank position ascending), so equal histograms give bit-identical
    sums.
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
        out[f"HR@{k}"] = float(sum(counts[:k]))
        out[f"NDCG@{k}"] = dcg
    return out


def metrics_from_histogram(
    hist: torch.Tensor | Sequence[int], num_users: int, ks: Sequence[int]
) -> dict[str, float]:
    """Mean HR@K and NDCG@K from a (global) rank histogram.

    Args:
        hist: ``(>= max(ks),)`` integer counts of users per rank position (see
            :func:`rank_histogram`).
        num_users: total number of users the histogram was built from (users with rank
            ``>= max(ks)`` included).
        ks: cutoffs.

    Returns:
        ``{"HR@K": mean, "NDCG@K": mean, ...}`` as Python floats (unitless, in ``[0, 1]``), plus
        ``"num_users"`` (an int). The means are ``nan`` when ``num_users == 0``. The arithmetic
        is done in Python floats in a fixed order, so equal inputs give bit-identical outputs.
    """
    sums = metric_sums_from_histogram(hist, ks)
    out: dict[str, float] = {}
    for name, total in sums.items():
        out[name] = total / num_users if num_users > 0 else math.nan
    out["num_users"] = int(num_users)
    return out


def per_user_metrics(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-user HR@K and NDCG@K (float64, shape ``(b,)`` each) from ``(b,)`` 0-based ranks."""
    r = ranks.reshape(-1).long()
    gain = 1.0 / torch.log2(r.to(torch.float64) + 2.0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = hit.to(torch.float64)
        out[f"NDCG@{k}"] = torch.where(hit, gain, torch.zeros_like(gain))
    return out


class MetricAccumulator:
    """Accumulates rank histograms over many eval batches; all-reduces once at the end.

    Each rank calls :meth:`update` with the :class:`~recsys_dist.eval.ranking.RankResult` of
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

    def __init__(self, ks: Sequence[int] = (5, 10, 20, 50)) -> None:
        self.ks: tuple[int, ...] = check_ks(ks)
        self.max_k: int = max(self.ks, default=0)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far (local, not collective)."""
        self.hist: torch.Tensor = torch.zeros(self.max_k, dtype=torch.long)
        self.num_users: int = 0

    def update(self, result: RankResult) -> None:
        """Add one batch's local histogram and local user count (no communication).

        ``result`` must have been computed with cutoffs whose maximum is at least
        ``max(self.ks)``.
        """
        hist = result.local_rank_hist.detach().to("cpu", torch.long)
        if hist.numel() < self.max_k:
            raise ValueError(
                f"result has a rank histogram of {hist.numel()} bins (ks={result.ks}); "
                f"this accumulator needs {self.max_k} (ks={self.ks})"
            )
        self.hist += hist[: self.max_k]
        self.num_users += int(result.num_local_users)

    def update_ranks(self, ranks: torch.Tensor) -> None:
        """Add this rank's own users given directly as ``(b,)`` 0-based ranks (no communication)."""
        self.hist += rank_histogram(ranks.detach().to("cpu"), self.max_k)
        self.num_users += int(ranks.numel())

    def local_sums(self) -> dict[str, float]:
        """This rank's own (not reduced) metric *sums* over its users, plus ``"num_users"``."""
        out = metric_sums_from_histogram(self.hist, self.ks)
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
        _, world = group_rank_and_size(group)
        if world > 1:
            packed = packed.to(collective_device(group))
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            packed = packed.cpu()
        return metrics_from_histogram(packed[: self.max_k], int(packed[self.max_k]), self.ks)
