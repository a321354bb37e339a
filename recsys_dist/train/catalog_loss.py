"""The catalog loss of a job: which item rows a step scores (its candidates) and the loss over
them. One object is built per job (:func:`build_catalog_loss`); the step asks it for the
step's candidates, looks them up with the batch, and calls it -- it never branches on a name.

* :class:`FullCE` (``train.loss=full_ce``): softmax over every item; the candidates are this
  rank's rows of the table (padding excluded), the log-sum-exp is combined exactly across ranks.
* :class:`SampledSoftmax` (``train.loss=sampled_softmax``): ``num_negatives`` ids shared by the
  global batch (+ its targets with ``in_batch_negatives``), logQ-corrected (docs/negatives.md).
* :class:`NoCatalogLoss`: models whose training loss does not score the catalog (MSE-only
  denoisers, ``uses_scorer = False``): no candidates, nothing looked up.
* :class:`ShardedColumnMSE`: DiffRec's reconstruction error over every item column, each rank
  holding one column block (``recsys_dist/sparse/wide.py``); with
  :meth:`ShardedColumnMSE.multinomial_nll`, L-DiffRec's multinomial reconstruction.

Shapes: ``query`` (b, d) float; ``target_logits`` (b,) = q . e_target; ``target_ids`` (b,) long;
``candidate_emb`` (n, d) the looked-up candidate rows; ``weights`` (b,) optional per-row weights
(given: the weighted sum of per-row CEs instead of the mean; see ``losses.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from recsys_dist.distributed import gather_rows, multi_rank
from recsys_dist.train.losses import sampled_softmax_ce, sharded_logsumexp, sharded_softmax_ce
from recsys_dist.train.negatives import NegativeSampler

LOSSES = ("full_ce", "sampled_softmax")


@dataclass
class Candidates:
    """The rows one step scores: ``ids`` (n,) long global row ids; ``log_counts`` (n,) the log
    expected count of each in the candidate set (logQ correction), None when every item
    appears exactly once."""

    ids: torch.Tensor
    log_counts: torch.Tensor | None = None


class CatalogLoss(Protocol):
    def candidates(self, step: int, target: torch.Tensor) -> Candidates: ...

    def __call__(self, query: torch.Tensor, target_logits: torch.Tensor, target_ids: torch.Tensor,
                 cands: Candidates, candidate_emb: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor: ...


class FullCE:
    """Exact softmax CE over the whole catalog; this rank scores its own rows."""

    def __init__(self, table) -> None:
        lo, hi = table.score_block()
        self._ids = torch.arange(max(lo, 1), hi)  # padding is never a candidate

    def candidates(self, step: int, target: torch.Tensor) -> Candidates:
        return Candidates(self._ids)

    def __call__(self, query, target_logits, target_ids, cands, candidate_emb, weights=None):
        return sharded_softmax_ce(query, target_logits, candidate_emb.float(), weights=weights)


class SampledSoftmax:
    """Sampled softmax with shared negatives drawn from a (seed, step) stream: the same ids on
    every rank and world size."""

    def __init__(self, sampler: NegativeSampler, num_negatives: int, seed: int,
                 in_batch_negatives: bool = False) -> None:
        self.sampler, self.num_negatives, self.seed = sampler, num_negatives, seed
        self.in_batch_negatives = in_batch_negatives

    def candidates(self, step: int, target: torch.Tensor) -> Candidates:
        # n sampled ids (+ the global batch's B targets), each with its log expected count in the
        # candidate set: log(n q_j), or the mixture log(n q_j + (B - 1) p_j) with in-batch ids
        batch_ids = gather_rows(target).cpu() if self.in_batch_negatives else None
        return Candidates(*self.sampler.candidates(self.num_negatives, self.seed, step, batch_ids))

    def __call__(self, query, target_logits, target_ids, cands, candidate_emb, weights=None):
        device = query.device
        log_counts = None if cands.log_counts is None else cands.log_counts.to(device)
        return sampled_softmax_ce(query, target_logits, target_ids, candidate_emb.float(), cands.ids.to(device),
                                  log_counts, weights=weights)


class NoCatalogLoss:
    """For models that never call the scorer: no candidates are looked up."""

    def candidates(self, step: int, target: torch.Tensor) -> Candidates:
        return Candidates(torch.empty(0, dtype=torch.long))

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this model trains without a catalog loss (uses_scorer = False) but called the scorer")


def build_catalog_loss(loss: str, table, model, seed: int = 0, num_negatives: int = 1024,
                       sampler: NegativeSampler | None = None, in_batch_negatives: bool = False) -> CatalogLoss:
    """The job's catalog loss (``train.loss``); ``sampler`` defaults to uniform negatives."""
    if not getattr(model, "uses_scorer", True):
        return NoCatalogLoss()
    if loss == "full_ce":
        return FullCE(table)
    if loss == "sampled_softmax":
        sampler = sampler or NegativeSampler(table.num_rows, kind="uniform")
        return SampledSoftmax(sampler, num_negatives, seed, in_batch_negatives)
    raise ValueError(f"unknown train.loss '{loss}' ({' | '.join(LOSSES)})")


class ShardedColumnMSE:
    """DiffRec's losses over the item columns of a batch, each rank holding the column block
    ``[wide.item_lo, wide.item_hi)``; sums over columns are all-reduced across ranks."""

    def __init__(self, wide) -> None:
        self.wide = wide

    def __call__(self, x0: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(B,) mean squared error per user over every item column: x0, out (B, block)."""
        return self.wide.sum_columns(((x0 - out) ** 2).sum(dim=1)) / self.wide.num_items

    def multinomial_nll(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B,) -sum_j x_j log softmax_j(logits) over every rank's columns: x, logits (B, block)."""
        hits = self.wide.sum_columns((x * logits).sum(dim=1))
        mass = x.sum(dim=1)
        if multi_rank():
            torch.distributed.all_reduce(mass)
        return mass * sharded_logsumexp(logits) - hits
