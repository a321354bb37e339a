"""The contract every dense model fulfils, whatever its math.

The trainer looks item embeddings up in the sharded table and hands a model dense tensors:
``hist`` (B, L, d) left-padded history embeddings (zeros at padding), ``mask`` (B, L) True at
real items, ``target`` (B, d) target embeddings.

- ``forward(hist, mask, target, noise, scorer)`` returns the training loss (a scalar). The
  ``scorer`` maps queries (B, d) to the mean softmax CE of the batch's targets over the item
  catalog -- full-catalog and exact across shards, or sampled, as the job configures; a model
  never sees where the rows live. The default forward is ``scorer(self.query(...))``;
  generative models (DreamRec, AREAL) return their own reconstruction loss instead, and
  DimeRec combines both.
- ``infer(hist, mask, noise)`` returns the query (B, d) whose inner product with every item
  row is that item's score at evaluation.

Randomness is explicit: ``draw_noise`` / ``draw_eval_noise`` draw every per-sample random
tensor a step needs from a given generator, so the trainer can draw them for the *global*
batch (or per user at evaluation) and slice, which makes a 1-rank and an N-rank run see the
same noise (dropout aside).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""queries (B, d) -> scalar mean softmax CE of the batch's targets over the catalog."""


class SequenceRecommender(nn.Module):
    """Base class: training loss, inference query and their noise."""

    uses_scorer: bool = True  # False: the trainer skips the catalog lookup the scorer needs

    def draw_noise(self, batch_size: int, max_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample random tensors for one training step, leading dim = batch_size (CPU)."""
        return {}

    def draw_eval_noise(self, batch_size: int, max_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample random tensors for inference, leading dim = batch_size (CPU)."""
        return {}

    def query(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
              noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training query (B, d) for models trained by softmax CE."""
        raise NotImplementedError

    def forward(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                noise: dict[str, torch.Tensor], scorer: Scorer) -> torch.Tensor:
        """Training loss (scalar)."""
        return scorer(self.query(hist, mask, target, noise))

    def infer(self, hist: torch.Tensor, mask: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inference query (B, d) from the history alone."""
        raise NotImplementedError
