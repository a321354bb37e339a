"""GRU4Rec (Hidasi et al., 2016) as a next-item baseline: a GRU over the history, its final
state is the query; trained with the harness's softmax CE."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from recsys_dist.models.base import SequenceRecommender


def left_to_right_padded(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real items to the front: x (B, L, d), mask (B, L) -> (B, L, d), lengths (B,)."""
    B, L = mask.shape
    lengths = mask.sum(1)
    idx = (torch.arange(L, device=x.device)[None, :] + (L - lengths)[:, None]) % L
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), lengths


class GRU4Rec(SequenceRecommender):
    def __init__(self, dim: int, num_layers: int, dropout: float, emb_dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(emb_dropout)
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.out = nn.Linear(dim, dim)

    def query(self, hist, mask, target, noise):
        return self.infer(hist, mask, noise)

    def infer(self, hist, mask, noise):
        x, lengths = left_to_right_padded(self.drop(hist) * mask[..., None], mask)  # empty: one zero step
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)
        return self.out(h_n[-1])
