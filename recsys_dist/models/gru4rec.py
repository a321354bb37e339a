"""GRU4Rec (Hidasi et al., 2016) as a next-item baseline: a GRU over the history, its final
state is the query; trained with the harness's softmax CE, on the last position
(``train.objective: last``) or on every step of the history at once (``all_positions``: the
GRU output after item i, through ``out``, predicts item i+1). The score: the dot product, or
a cosine over a temperature (``model.similarity``, ``similarity.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from recsys_dist.models.base import ModelConfig, SequenceRecommender
from recsys_dist.models.similarity import Similarity, SimilarityFields


def left_to_right_padded(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real items to the front: x (B, L, d), mask (B, L) -> (B, L, d), lengths (B,)."""
    B, L = mask.shape
    lengths = mask.sum(1)
    idx = (torch.arange(L, device=x.device)[None, :] + (L - lengths)[:, None]) % L
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), lengths


class GRU4Rec(SequenceRecommender):
    supports_all_positions = True  # a recurrence: the output after item i depends on items <= i only

    def __init__(self, dim: int, num_layers: int, dropout: float, emb_dropout: float,
                 similarity: Similarity | None = None) -> None:
        super().__init__()
        self.similarity = similarity or Similarity()
        self.drop = nn.Dropout(emb_dropout)
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.out = nn.Linear(dim, dim)

    def query(self, hist, mask, target, noise):
        return self.infer(hist, mask, noise)

    def _run(self, hist, mask):
        """The GRU over each row's real items (moved to the front): (packed outputs, h_n, lengths)."""
        x, lengths = left_to_right_padded(self.drop(hist) * mask[..., None], mask)
        lengths = lengths.clamp(min=1)  # empty history: one zero step
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.gru(packed)
        return out, h_n, lengths

    def infer(self, hist, mask, noise):
        _, h_n, _ = self._run(hist, mask)
        return self.similarity.query(self.out(h_n[-1]))

    def item_keys(self, rows):
        return self.similarity.keys(rows)

    def query_all(self, hist, mask, noise):
        """(B, L, d): the output after each step, back at its left-padded position (row L-1 is
        the final state, as in ``infer``; padded positions read zeros, i.e. ``out``'s bias)."""
        L = hist.shape[1]
        out, _, lengths = self._run(hist, mask)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, d), real steps first
        # inverse of left_to_right_padded: left position i holds step (i + len) mod L
        idx = (torch.arange(L, device=out.device)[None, :] + lengths.to(out.device)[:, None]) % L
        return self.similarity.query(self.out(out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))))


@dataclass
class GRU4RecConfig(SimilarityFields, ModelConfig):
    """``model.name: gru4rec``: a GRU over the history; the last state is the query."""

    name: str = "gru4rec"
    num_layers: int = 1
    dropout: float = 0.1  # between GRU layers
    emb_dropout: float = 0.3  # on item embeddings

    def build(self, max_len: int) -> GRU4Rec:
        return GRU4Rec(self.dim, self.num_layers, self.dropout, self.emb_dropout,
                       Similarity(self.similarity, self.temperature))
