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
  key is that item's score at evaluation. An item's key is its table row passed through
  ``item_keys`` (the row itself, except for models scored by cosine: ``similarity.py``); the
  trainer's scorer applies the same ``item_keys`` to the rows it scores.
- Causal models (SASRec, GRU4Rec) may also train on every position at once
  (``train.objective: all_positions``, the SASRec/HSTU recipe): they set
  ``supports_all_positions = True`` and implement ``query_all(hist, mask, noise)`` -> (B, L, d),
  whose row i uses the items at positions <= i only and whose row L-1 equals ``query``. The
  trainer then calls ``forward(..., all_positions=True)`` with a scorer that maps those
  (B, L, d) queries to the mean CE of every real position's next item (position i < L-1
  predicts history item i+1, position L-1 the sample's target).

Randomness is explicit: ``draw_noise`` / ``draw_eval_noise`` draw every per-sample random
tensor a step needs from a given generator, so the trainer can draw them for the *global*
batch (or per user at evaluation) and slice, which makes a 1-rank and an N-rank run see the
same noise (dropout aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class ModelConfig:
    """The ``model:`` section every model's config extends: which model (``name``, the
    registry key) and the width ``dim`` of the item table and of the model. A model's config is
    a subclass next to its code with the model's own fields; ``build`` makes the model."""

    name: str = ""
    dim: int = 64  # embedding and hidden size (the item table's row width)

    def build(self, max_len: int) -> "SequenceRecommender":
        raise NotImplementedError(f"{type(self).__name__} builds no sequence model")


@dataclass
class EncoderFields:
    """A Transformer-style sequence encoder's shape (mixin of model configs)."""

    num_blocks: int = 2
    num_heads: int = 2
    dropout: float = 0.1  # inside the blocks
    emb_dropout: float = 0.3  # on item embeddings (DiffuRec paper: 0.3)


@dataclass
class DiffusionFields:
    """The forward process of a diffusion model (mixin of model configs)."""

    diffusion_steps: int = 32
    schedule: str = "trunc_linear"  # recsys_dist/diffusion/schedules.py


Scorer = Callable[[torch.Tensor], torch.Tensor]
"""queries (B, d) -> scalar mean softmax CE of the batch's targets over the catalog; under the
all-positions objective queries (B, L, d) -> mean CE over the real positions' next items."""


class SequenceRecommender(nn.Module):
    """Base class: training loss, inference query and their noise."""

    uses_scorer: bool = True  # False: the trainer skips the catalog lookup the scorer needs
    supports_all_positions: bool = False  # True: query_all exists (train.objective: all_positions)

    def draw_noise(self, batch_size: int, max_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample random tensors for one training step, leading dim = batch_size (CPU)."""
        return {}

    def draw_eval_noise(self, batch_size: int, max_len: int, generator) -> dict[str, torch.Tensor]:
        """Per-sample random tensors for inference, leading dim = batch_size (CPU). Draw them
        with ``recsys_dist.noise.randn(shape, generator)`` (standard normals only): the
        generator is a ``torch.Generator`` or the batched per-user streams of ``eval.noise:
        counter``."""
        return {}

    def query(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
              noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training query (B, d) for models trained by softmax CE."""
        raise NotImplementedError

    def query_all(self, hist: torch.Tensor, mask: torch.Tensor,
                  noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Causal models: the query (B, L, d) at every position, row i from items <= i only;
        row L-1 equals ``query``. Rows at padded positions are finite and never trained."""
        raise NotImplementedError(f"{type(self).__name__} has no all-position query (not a causal model)")

    def forward(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                noise: dict[str, torch.Tensor], scorer: Scorer, all_positions: bool = False) -> torch.Tensor:
        """Training loss (scalar). ``all_positions``: score every position's query (``query_all``)."""
        if all_positions:
            return scorer(self.query_all(hist, mask, noise))
        return scorer(self.query(hist, mask, target, noise))

    def infer(self, hist: torch.Tensor, mask: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inference query (B, d) from the history alone."""
        raise NotImplementedError

    def item_keys(self, rows: torch.Tensor) -> torch.Tensor:
        """The vectors (n, d) a query is scored against, from item table rows (n, d): the rows
        themselves (no copy) unless the model scores by cosine (``similarity.py``)."""
        return rows
