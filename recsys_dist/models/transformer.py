"""A small pre-LayerNorm Transformer encoder over left-padded item sequences.

Sequences are (B, L, d) with the most recent item in the last column; ``mask`` (B, L) is True
where a real item sits. Every position may always attend to itself, so a padded query row
never sees an all-masked softmax (no NaNs to leak into gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True = query i may attend key j.

    Keys must be real items (mask), optionally j <= i (causal); the diagonal is always allowed.
    """
    B, L = mask.shape
    allowed = mask[:, None, None, :].expand(B, 1, L, L)
    if causal:
        tri = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        allowed = allowed & tri
    eye = torch.eye(L, dtype=torch.bool, device=mask.device)
    return allowed | eye


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn))
        return x + self.drop(self.ffn(self.ln2(x)))


class TransformerEncoder(nn.Module):
    """Stack of ``num_blocks`` pre-LN blocks and a final LayerNorm: (B, L, d) -> (B, L, d)."""

    def __init__(self, dim: int, num_blocks: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(num_blocks))
        self.ln = nn.LayerNorm(dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = attention_mask(mask, self.causal)
        for block in self.blocks:
            x = block(x, attn)
        return self.ln(x)
