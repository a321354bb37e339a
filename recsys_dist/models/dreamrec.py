"""DreamRec-style guided denoiser (Yang et al., NeurIPS 2023): generate the next item's
embedding instead of classifying it.

- Guidance c: a causal Transformer (SASRec) encoder over the history, last position.
- Denoiser f(x_t, t, c) -> x0_hat: an MLP on [x_t, c, step embedding].
- Training: t ~ U{0..T-1}, x_t = q(x_t | e_target); loss = ||x0_hat - e_target||^2 (mean over
  dims and samples); no negatives. Classifier-free guidance: with probability p_u a sample's
  c is replaced by a learned null vector (per-sample ``torch.where``, so every parameter
  receives a gradient every step, whatever the dropout draw).
- Sampling: x0_guided = (1 + w) f(x_t, t, c) - w f(x_t, t, null), DDIM with ``sample_steps``
  steps (DDPM ancestral when sample_steps = T); the output ranks the catalog by inner product.
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
                 sample_steps: int, eta: float) -> None:
        super().__init__(dim, steps, schedule, p_uncond, guidance, sample_steps, eta)
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(emb_dropout)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=True)

    def guidance(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c (B, d) from the history (B, L, d)."""
        L = hist.shape[1]
        x = self.drop(hist * math.sqrt(self.dim) + self.pos.weight[-L:][None]) * mask[..., None]
        return self.encoder(x, mask)[:, -1]
