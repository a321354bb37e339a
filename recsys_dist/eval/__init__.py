"""Exact, distributed full-catalog evaluation for sequential recommenders.

* :mod:`~recsys_dist.distributed` - which rank owns which item rows (TorchRec row-wise
  sharding layout) and small process-group helpers (:func:`max_over_ranks`).
* :mod:`~recsys_dist.eval.ranking` - :func:`rank_targets`, the collective that ranks every
  user's held-out target against the whole catalog (exact integer ranks, an explicit tie rule,
  optional top-k lists); also the popularity baseline via ``d = 1``.
* :mod:`~recsys_dist.eval.metrics` - HR@K / NDCG@K from integer rank histograms and
  :class:`MetricAccumulator`, which all-reduces once at the end of an evaluation.
* :mod:`~recsys_dist.eval.multi` - :func:`rank_target_sets`, several held-out targets per user
  (DiffRec-style: Recall / NDCG / HR / Precision / MRR @K over all unmasked items, the same
  tie rules, exact sums) and :class:`MultiMetricAccumulator`.

Only ``torch``, ``torch.distributed`` and :mod:`recsys_dist.distributed` (row partition,
collectives) are used; item blocks are plain dense tensors.
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
