"""Negative sampling for sampled softmax on very large catalogs, with logQ correction.

Two sources of negatives, shared by the whole global batch (Yang et al. 2020, "mixed negative
sampling"):

* sampled: ``n`` ids drawn i.i.d. from a proposal ``q``: uniform over 1..N-1 (``q_j = 1/(N-1)``),
  or popularity-aware ``q_j ∝ (count_j + 1) ** alpha`` (+1 so items with count 0 can still be
  drawn); row 0, the padding, never;
* in-batch: the targets of the global batch, which arrive with the target distribution
  ``p_j = count_j / sum(count)``. ``count`` must therefore be the number of times item ``j`` is a
  *training target*; with other counts (e.g. every occurrence in the histories) ``p`` and with it
  the correction are off.

logQ correction: every candidate's logit is lowered by the log of its expected number of copies
in the candidate set, so that ``sum_c exp(l_c - log E[count_c])`` over the candidates ``c`` is an
unbiased estimate of the partition sum ``sum_j exp(l_j)`` (E[sum_c f(c)] = sum_j E[count_j] f(j)).

* sampled only: ``E[count_j] = n q_j``: ``log(n q_j)``; for uniform sampling the constant
  ``log(n / (N-1))``, which does *not* cancel: the target's logit enters the softmax uncorrected;
* sampled + in-batch: the candidate set is the union of both draws, one mixture proposal with
  ``E[count_j] = n q_j + m p_j`` for every candidate, sampled or in-batch alike (correcting each
  part by its own ``log(n q_j)`` / ``log(m p_j)`` would make each part an estimate of the whole
  partition sum, and the two together an estimate of twice it). Here ``m = B - 1``: in the
  softmax of one sample its own target is among the B in-batch ids and is removed as an
  accidental hit, so only the other B - 1 targets are random draws from ``p``.

tests/test_negatives.py checks the estimates against the exact partition sum for every mix.
"""

from __future__ import annotations

import math

import torch

from recsys_dist.config import stream_seed


class NegativeSampler:
    """Draws the shared negatives of a step and their log expected counts."""

    def __init__(self, num_rows: int, counts: torch.Tensor | None = None, kind: str = "popularity",
                 alpha: float = 0.75) -> None:
        """num_rows: table rows incl. padding row 0 (N); counts: (num_rows,) how often each item is a
        training target (needed for ``popularity`` and for in-batch negatives); kind: ``uniform`` |
        ``popularity``."""
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"unknown negative sampler '{kind}' (uniform | popularity)")
        if kind == "popularity" and counts is None:
            raise ValueError("popularity sampling needs the train item counts")
        if num_rows < 2:
            raise ValueError(f"need at least one item besides the padding row, got num_rows={num_rows}")
        self.num_rows, self.kind = num_rows, kind
        if kind == "uniform":
            weights = torch.ones(num_rows, dtype=torch.float64)
        else:
            c = counts.to(torch.float64).clone()
            c[0] = 0.0
            weights = (c + 1.0) ** alpha
        weights[0] = 0.0
        self.q = weights / weights.sum()  # (num_rows,) float64 proposal, 0 at padding
        self.log_q = torch.log(self.q).float()  # (num_rows,), -inf at 0
        self.cdf = torch.cumsum(self.q, 0)
        if counts is not None:
            c = counts.to(torch.float64).clone()
            c[0] = 0.0
            self.p = c / c.sum().clamp_min(1.0)  # (num_rows,) float64 target distribution (in-batch)
        else:
            self.p = None

    def draw(self, n: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` ids (long, in 1..num_rows-1) for ``step`` and their log expected counts ``log(n q_j)``
        (n,) float32 (uniform: the constant ``log(n / (num_rows - 1))``).

        The same (seed, step) gives the same ids on every rank and world size."""
        gen = torch.Generator().manual_seed(stream_seed(seed, "negatives", step))
        log_n = math.log(n) if n > 0 else 0.0  # n = 0 (in-batch negatives only): empty tensors
        if self.kind == "uniform":
            ids = torch.randint(1, self.num_rows, (n,), generator=gen)
            return ids, torch.full((n,), log_n - math.log(self.num_rows - 1))
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        ids = torch.searchsorted(self.cdf, u, right=True).clamp_(1, self.num_rows - 1)
        return ids, self.log_q[ids] + log_n

    def mixture_log_count(self, ids: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """``log(n q_j + m p_j)`` (float32, shape of ``ids``): the log expected count of item ``j`` in
        a candidate set of ``n`` draws from ``q`` plus ``m`` draws from the target distribution ``p``."""
        if self.p is None:
            raise ValueError("in-batch negatives need the train target counts (NegativeSampler(counts=...))")
        ids = ids.cpu()
        # > 0 for every real item whenever n >= 1 (q_j > 0); with n = 0 an id whose count is 0 gets
        # -inf, i.e. an infinite logit, which train_step reports as a non-finite loss
        return torch.log(n * self.q[ids] + m * self.p[ids]).float()

    def candidates(self, n: int, seed: int, step: int,
                   in_batch_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate ids of ``step`` and their log expected counts, both (n [+ B],).

        in_batch_ids: (B,) long, the global batch's targets, or None for sampled negatives only.
        With them the ids are the ``n`` draws followed by the B in-batch ids, all corrected by the
        mixture ``log(n q_j + (B - 1) p_j)`` (module docstring: each sample's own target is removed
        from its softmax as an accidental hit, the other B - 1 are the random in-batch draws).
        """
        ids, log_counts = self.draw(n, seed, step)
        if in_batch_ids is None:
            return ids, log_counts
        in_batch_ids = in_batch_ids.cpu().long()
        ids = torch.cat([ids, in_batch_ids])
        return ids, self.mixture_log_count(ids, n, in_batch_ids.numel() - 1)
