"""DreamRec-style guided denoiser (Yang et al., NeurIPS 2023): generate the next item's
embedding instead of classifying it. The guidance c is a causal Transformer (SASRec) encoder
over the history, at its last position; the denoiser, the x0-MSE loss, classifier-free
guidance and the samplers are ``GuidedDenoiser``'s (``models/guided.py``). The sampled x_0
ranks the catalog by inner product.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recsys_dist.models.guided import GuidedDenoiser
from recsys_dist.models.transformer import TransformerEncoder


class DreamRec(GuidedDenoiser):
    """Guidance c: a causal Transformer over the history, at its last position."""

    def __init__(self, dim: int, max_len: int, num_blocks: int, num_heads: int, dropout: float,
                 emb_dropout: float, steps: int, schedule: str, p_uncond: float, guidance: float,
                 sample_steps: int, eta: float, guidance_ce_weight: float = 0.0, rank_by: str = "generated") -> None:
        super().__init__(dim, steps, schedule, p_uncond, guidance, sample_steps, eta, guidance_ce_weight, rank_by)
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(emb_dropout)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=True)

    def guidance(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c (B, d) from the history (B, L, d)."""
        L = hist.shape[1]
        x = self.drop(hist * math.sqrt(self.dim) + self.pos.weight[-L:][None]) * mask[..., None]
        return self.encoder(x, mask)[:, -1]
