"""Negative sampling for sampled softmax on very large catalogs, with logQ correction.

Two sources of negatives, shared by the whole global batch (Yang et al. 2020, "mixed negative
sampling"):

* sampled: ``n`` ids drawn i.i.d. from a proposal ``q``: uniform over 1..N-1, or
  popularity-aware ``q_j ∝ (count_j + 1) ** alpha`` (train-split counts; +1 so items never seen
  in train can still be drawn; row 0, the padding, never);
* in-batch: the targets of the global batch, which arrive with the unigram probability
  ``p_j = count_j / sum(count)``.

logQ correction: a negative's logit is lowered by the log of its expected number of copies in
the candidate set, ``log(n q_j)`` (sampled) or ``log(B p_j)`` (in-batch), which makes
``sum_j exp(l_j - log(n q_j))`` an unbiased estimate of the full partition sum ``sum_j exp(l_j)``
(tests/test_negatives.py checks the estimate against the exact value).
"""

from __future__ import annotations

import torch

from recsys_dist.config import stream_seed


class NegativeSampler:
    """Draws the shared negatives of a step and their log expected counts."""

    def __init__(self, num_rows: int, counts: torch.Tensor | None = None, kind: str = "popularity",
                 alpha: float = 0.75) -> None:
        """num_rows: table rows incl. padding row 0; counts: (num_rows,) train counts (needed for
        ``popularity`` and for in-batch correction); kind: ``uniform`` | ``popularity``."""
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"unknown negative sampler '{kind}' (uniform | popularity)")
        if kind == "popularity" and counts is None:
            raise ValueError("popularity sampling needs the train item counts")
        self.num_rows, self.kind = num_rows, kind
        if counts is not None:
            counts = counts.to(torch.float64).clone()
            counts[0] = 0.0
            weights = (counts + 1.0) ** alpha
            weights[0] = 0.0
            self.log_q = torch.log(weights / weights.sum()).float()  # (num_rows,), -inf at 0
            self.cdf = torch.cumsum(weights / weights.sum(), 0)
            total = counts.sum().clamp_min(1.0)
            self.log_p_unigram = torch.log(counts.clamp_min(0.5) / total).float()  # in-batch proposal
        else:
            self.log_q, self.cdf, self.log_p_unigram = None, None, None

    def draw(self, n: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` ids (long, in 1..num_rows-1) for ``step`` and their ``log(n q_j)`` (None if uniform).

        The same (seed, step) gives the same ids on every rank and world size."""
        gen = torch.Generator().manual_seed(stream_seed(seed, "negatives", step))
        if self.kind == "uniform":
            return torch.randint(1, self.num_rows, (n,), generator=gen), None
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        ids = torch.searchsorted(self.cdf, u, right=True).clamp_(1, self.num_rows - 1)
        return ids, self.log_q[ids] + float(torch.log(torch.tensor(float(n))))

    def in_batch_log_count(self, ids: torch.Tensor) -> torch.Tensor:
        """``log(B p_j)`` for the B in-batch negatives ``ids`` (unigram arrival probability)."""
        if self.log_p_unigram is None:  # uniform sampler without counts: constant, cancels
            return torch.zeros(ids.shape[0])
        return self.log_p_unigram[ids.cpu()] + float(torch.log(torch.tensor(float(ids.shape[0]))))
