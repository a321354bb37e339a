"""Exact, distributed full-catalog evaluation for sequential recommenders.

* :mod:`~recsys_dist.eval.ranking` - :func:`rank_targets`, the collective that ranks every
  user's held-out target against the whole catalog (exact integer ranks, an explicit tie rule,
  optional top-k lists); also the popularity baseline via ``d = 1``.
* :mod:`~recsys_dist.eval.multi` - :func:`rank_target_sets`, several held-out targets per user
  (DiffRec-style), the same machinery and tie rules.
* :mod:`~recsys_dist.eval.metrics` - HR@K / NDCG@K from integer rank histograms,
  :class:`RankResult` and :class:`MetricAccumulator` (all-reduces once at the end of an
  evaluation); the leaf of the package.
* :mod:`~recsys_dist.eval.multi_metrics` - Recall / NDCG / HR / Precision / MRR @K of target
  sets from exact sums, :class:`MultiRankResult` and :class:`MultiMetricAccumulator`.
* internals of the two collectives: :mod:`~recsys_dist.eval.checks` (input checks, the header
  agreement across ranks), :mod:`~recsys_dist.eval.scoring` (the two chunked scoring passes),
  :mod:`~recsys_dist.eval.topk` (exact top-k lists).

Only ``torch``, ``torch.distributed`` and :mod:`recsys_dist.distributed` (row partition,
collectives) are used; item blocks are plain dense tensors.

Import graph (no cycles): ``metrics`` <- ``multi_metrics``, ``checks``; ``ranking`` <- ``checks``,
``scoring``, ``topk``, ``metrics``; ``multi`` <- ``checks``, ``scoring``, ``multi_metrics``.
"""

from recsys_dist.eval.metrics import (
    TIE_RULES,
    MetricAccumulator,
    check_ties,
    metric_names,
    metric_sums_from_histogram,
    metrics_from_histogram,
    per_user_metrics,
    rank_histogram,
)
from recsys_dist.eval.multi import (
    MultiMetricAccumulator,
    MultiRankResult,
    multi_metric_names,
    multi_metric_sums,
    multi_metrics_from_sums,
    per_user_multi_metrics,
    rank_target_sets,
)
from recsys_dist.eval.ranking import RankResult, popularity_block, rank_targets

__all__ = [
    "TIE_RULES",
    "MetricAccumulator",
    "MultiMetricAccumulator",
    "MultiRankResult",
    "check_ties",
    "RankResult",
    "metric_names",
    "metric_sums_from_histogram",
    "metrics_from_histogram",
    "multi_metric_names",
    "multi_metric_sums",
    "multi_metrics_from_sums",
    "per_user_metrics",
    "per_user_multi_metrics",
    "popularity_block",
    "rank_histogram",
    "rank_target_sets",
    "rank_targets",
]
