"""SASRec (Kang & McAuley, 2018): causal self-attention over the history; the last position's
output is the query. Trained here with full-catalog softmax CE on the next item, the same
loss and harness as DiffuRec: on the last position only (``train.objective: last``, one
(prefix, target) sample at a time) or, as in the paper, on every position of the history in
one forward pass (``all_positions``: the causal encoder's output at position i predicts item
i+1). The paper's loss is a binary CE against one sampled negative per position; the harness
uses its softmax CE (full catalog or sampled) instead. The score is the dot product (the
paper's) or, with ``model.similarity: cosine``, HSTU's cosine over a temperature
(``similarity.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import nn

from recsys_dist.models.base import EncoderFields, ModelConfig, SequenceRecommender
from recsys_dist.models.similarity import Similarity, SimilarityFields
from recsys_dist.models.transformer import TransformerEncoder


class SASRec(SequenceRecommender):
    supports_all_positions = True  # causal attention: position i sees items <= i only

    def __init__(self, dim: int, max_len: int, num_blocks: int, num_heads: int,
                 dropout: float, emb_dropout: float, similarity: Similarity | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.similarity = similarity or Similarity()
        self.pos = nn.Embedding(max_len, dim)  # position L-1 = most recent item
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(emb_dropout)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=True)

    def _encode(self, hist: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, d): the causal encoder's output at every position ((B, 1, d): the last only)."""
        L = hist.shape[1]
        x = hist * math.sqrt(self.dim) + self.pos.weight[-L:][None]
        x = self.drop(x) * mask[..., None]
        return self.encoder(x, mask, last_only)

    def query(self, hist, mask, target, noise):
        return self.infer(hist, mask, noise)

    def query_all(self, hist, mask, noise):
        return self.similarity.query(self._encode(hist, mask))

    def infer(self, hist, mask, noise):
        return self.similarity.query(self._encode(hist, mask, last_only=True)[:, -1])

    def item_keys(self, rows):
        return self.similarity.keys(rows)


@dataclass
class SASRecConfig(SimilarityFields, EncoderFields, ModelConfig):
    """``model.name: sasrec``: a causal Transformer; the last position is the query."""

    name: str = "sasrec"

    def build(self, max_len: int) -> SASRec:
        return SASRec(self.dim, max_len, self.num_blocks, self.num_heads, self.dropout, self.emb_dropout,
                      Similarity(self.similarity, self.temperature))
