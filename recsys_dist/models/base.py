"""The contract every dense model fulfils, whatever its math.

The trainer looks item embeddings up in the sharded table and hands a model dense tensors:
``hist`` (B, L, d) left-padded history embeddings, ``mask`` (B, L) True at real items,
``target`` (B, d) target embeddings. A model returns a query vector (B, d) whose inner
product with every item row is that item's score.

Randomness is explicit: ``draw_noise`` draws every per-sample random tensor a step needs from
a given generator, so the trainer can draw them for the *global* batch and slice its rows,
which makes a 1-rank and an N-rank run see the same noise (dropout aside).
"""

from __future__ import annotations

import torch
from torch import nn


class SequenceRecommender(nn.Module):
    """Base class: training query, inference query and their noise."""

    def draw_noise(self, batch_size: int, max_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample random tensors for one training step, leading dim = batch_size (CPU)."""
        return {}

    def draw_eval_noise(self, batch_size: int, max_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample random tensors for inference, leading dim = batch_size (CPU)."""
        return {}

    def forward(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training query (B, d)."""
        raise NotImplementedError

    def infer(self, hist: torch.Tensor, mask: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inference query (B, d) from the history alone."""
        raise NotImplementedError
