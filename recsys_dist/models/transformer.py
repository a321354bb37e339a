"""A small pre-LayerNorm Transformer encoder over left-padded item sequences.

Sequences are (B, L, d) with the most recent item in the last column; ``mask`` (B, L) is True
where a real item sits. Every position may always attend to itself, so a padded query row
never sees an all-masked softmax (no NaNs to leak into gradients).

``last_only``: a model that reads only the last position's output (every next-item query of
a (prefix, target) sample, every DiffuRec reverse step) need not compute the other positions'
rows in the last block: their keys and values feed the last query, their outputs feed nothing.
With ``last_only`` the last block projects queries, mixes, and runs its FFN for the last row
alone, returning (B, 1, d): the same values up to float rounding (a different GEMM shape), at
about 3/12 of the last block's per-position cost (its query/key/value projection stays: one
call of the ``qkv`` module, so ZeRO-3's per-module parameter gathering sees it).
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

    def forward(self, x: torch.Tensor, attn: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, d) -> (B, L, d), or (B, 1, d) for the last query alone (``last_only``)."""
        B, L, d = x.shape
        p = self.dropout if self.training else 0.0
        if not last_only:
            q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=p)
            return self.out(y.transpose(1, 2).reshape(B, L, d))
        # Through the module, not its weight: ZeRO-3 gathers a module's parameters only when the
        # module itself is called (slicing qkv.weight here would read a partitioned, empty tensor).
        qkv = self.qkv(x)  # (B, L, 3d): queries, keys, values; only the last row's query is used
        q = qkv[:, -1:, :d].reshape(B, 1, self.heads, d // self.heads).transpose(1, 2)
        k, v = qkv[..., d:].reshape(B, L, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn[:, :, -1:], dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, 1, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, d) -> (B, L, d), or the last position's row (B, 1, d) (``last_only``)."""
        x = (x[:, -1:] if last_only else x) + self.drop(self.attn(self.ln1(x), attn, last_only))
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, d), or only the last position (B, 1, d) with ``last_only`` (module docstring)."""
        attn = attention_mask(mask, self.causal)
        for i, block in enumerate(self.blocks):
            x = block(x, attn, last_only and i == len(self.blocks) - 1)
        return self.ln(x)
