"""DreamRec-style guided denoiser (Yang et al., NeurIPS 2023): generate the next item's
embedding instead of classifying it. The guidance c is a causal Transformer (SASRec) encoder
over the history, at its last position; the denoiser, the x0-MSE loss, classifier-free
guidance and the samplers are ``GuidedDenoiser``'s (``models/guided.py``). The sampled x_0
ranks the catalog by inner product.

Two forms, ``form`` (config ``model.dreamrec_form``):

- ``"ours"`` (default; this project's earlier form): history embeddings scaled by sqrt(d) plus
  learned positions N(0, 0.02^2) indexed from the most recent item, our pre-LN Transformer
  (GELU FFN 4d, LayerNorm eps 1e-5), a zero-initialised null vector, the denoiser
  [x_t, c, step] 3d -> 4d -> d (GELU) with a 2-layer GELU step MLP (d -> 2d -> d), torch default
  Linear init; CFG (1 + w) f(c) - w f(null); DDIM on the grid of ``ddim_timesteps``.
- ``"official"``: the code behind ``../shared/reference.md``'s DreamRec figures, the refined
  DreamRec, baiyimeng/DreamRec @ f77206d (file:line there; its recipe is
  ``configs/zhihu_dreamrec.yaml``):
    * guidance encoder (sasrec.py:78-140): history embedding * sqrt(d) (sasrec.py:108) + a
      learned position counted from the *oldest* item of the window, 0..n-1 (the rows are
      right-padded there, positions = column index, pads get position 0, sasrec.py:109-112),
      Dropout(dropout) (sasrec.py:86, 113); ``num_blocks`` pre-LN blocks x + Attn(LN(x)),
      x + FFN(LN(x)) (sasrec.py:115-119) with LayerNorm eps 1e-8 (sasrec.py:94, 98, 104);
      attention: separate q, k, v and output Linear(d, d), scores / sqrt(d / heads), causal and
      key-padding masks, dropout on the probabilities and after the output projection
      (sasrec.py:25-75); FFN Linear(d, d) -> Dropout -> ReLU -> Linear(d, d) -> Dropout: width d,
      not 4d (sasrec.py:7-22, 99-103); a final LayerNorm (sasrec.py:121); c = the row of the
      last real item (sasrec.py:131-140). Official Zhihu defaults: 2 blocks, 1 head, dropout
      0.1 (run_dreamrec.py:23-26).
    * denoiser (dreamrec.py:41-55): Linear(3d, d) -> SiLU -> Linear(d, d) on [x_t, step, c], in
      that order (192 -> 64 -> 64 at d 64); step embedding (dreamrec.py:8-38): the sinusoid of
      width d (cos | sin, frequencies exp(-ln(1e4) i / (d/2)), = ``timestep_embedding``) ->
      Linear(d, d) -> SiLU -> Linear(d, d).
    * init (dreamrec.py:88-98): every Linear xavier-normal with zero bias; every embedding
      N(0, 1): positions, the null vector (``none_emb``, dreamrec.py:65) and the item table
      (the table is the trainer's: ``sparse.init_std: 1.0``), padding row zero.
    * training (dreamrec.py:100-119): t ~ U{0..T-1}, x_t = q(x_t | e_target), the guidance is
      replaced by the null vector with probability ``uncon_ratio`` (0.1), loss = MSE(x0_hat, e).
    * sampling (dreamrec.py:121-170): x_T ~ N(0, I); DDIM over the grid
      ``linspace(T, 0, n + 1)`` (integer) minus one, i.e. T-1, T-1-T/n, ..., T/n - 1 and then
      the clean end (dreamrec.py:130-147) -- not ours, which ends at t = 0; CFG
      x0 = f(null) + s (f(c) - f(null)) with s = ``cfg_scale`` (dreamrec.py:140), s = 1 + w
      here; n = 20, eta = 0 (dreamrec.py:122, utils.py:48).
  Kept from this project rather than the official code: the rows arrive left-padded (so
  positions are recomputed from the mask, which gives the official indices); padded positions
  are zero embeddings masked as attention keys, and a padded query may attend to itself (no
  all-masked softmax; its row is never used); an empty history (Zhihu's first interaction of a
  session, stored there as len_seq 1 over the pad item, whose row is zero) is encoded as the
  official code does: one zero item at position 0; the official code's unused LayerNorms
  (``norm`` in its FFN and attention modules, sasrec.py:14, 40) are left out. The noise
  schedule stays ``model.schedule``: our ``linear`` equals the official betas at T = 1000 only
  (ours rescales them by 1000 / T, dreamrec.py:72-73 does not). The item table and its
  optimizer are the trainer's (configs/zhihu_dreamrec.yaml says what differs).
  Checked once against the official modules themselves (imported from a checkout outside this
  repository, weights copied over, d 16, 2 blocks x 2 heads, T 1000, right- vs left-padded rows
  with an empty history): guidance, denoiser, the 20-step guided DDIM sample and the training
  loss under the same draws agree to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys_dist.diffusion import timestep_embedding
from recsys_dist.diffusion.samplers import ddim_step
from recsys_dist.models.base import EncoderFields, ModelConfig
from recsys_dist.models.guided import GuidanceFields, GuidedDenoiser
from recsys_dist.models.transformer import TransformerEncoder, attention_mask

FORMS = ("ours", "official")
OFFICIAL_LN_EPS = 1e-8  # baiyimeng/DreamRec sasrec.py:94, 98, 104


class OfficialBlock(nn.Module):
    """One pre-LN block of the official guidance encoder (sasrec.py:7-75, 115-119)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.p = heads, dropout
        self.attn_norm = nn.LayerNorm(dim, eps=OFFICIAL_LN_EPS)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn_norm = nn.LayerNorm(dim, eps=OFFICIAL_LN_EPS)
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)  # FFN width d (sasrec.py:99-103)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        h = self.attn_norm(x)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(B, L, self.heads, d // self.heads).transpose(1, 2)

        # softmax(q k^T / sqrt(d_head)) with dropout on the probabilities (sasrec.py:55-66)
        y = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), attn_mask=attn,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(B, L, d)))  # sasrec.py:72-73, 117
        h = self.ffn_norm(x)
        return x + self.drop(self.fc2(F.relu(self.drop(self.fc1(h)))))  # sasrec.py:16-22, 118-119


class OfficialEncoder(nn.Module):
    """``num_blocks`` official blocks and the final LayerNorm (sasrec.py:93-104, 115-121)."""

    def __init__(self, dim: int, num_blocks: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(OfficialBlock(dim, heads, dropout) for _ in range(num_blocks))
        self.ln = nn.LayerNorm(dim, eps=OFFICIAL_LN_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = attention_mask(mask, causal=True)
        for block in self.blocks:
            x = block(x, attn)
        return self.ln(x)


class DreamRec(GuidedDenoiser):
    """Guidance c: a causal Transformer over the history, at its last position (module docstring)."""

    def __init__(self, dim: int, max_len: int, num_blocks: int, num_heads: int, dropout: float,
                 emb_dropout: float, steps: int, schedule: str, p_uncond: float, guidance: float,
                 sample_steps: int, eta: float, guidance_ce_weight: float = 0.0, rank_by: str = "generated",
                 form: str = "ours") -> None:
        if form not in FORMS:
            raise ValueError(f"DreamRec form (model.dreamrec_form) must be one of {FORMS}, got {form!r}")
        super().__init__(dim, steps, schedule, p_uncond, guidance, sample_steps, eta, guidance_ce_weight, rank_by)
        self.form = form
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(emb_dropout)
        if form == "ours":
            nn.init.normal_(self.pos.weight, std=0.02)
            self.encoder = TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=True)
            return
        if not 1 <= sample_steps <= steps:
            raise ValueError(f"sample_steps must be in [1, {steps}], got {sample_steps}")
        self.encoder = OfficialEncoder(dim, num_blocks, num_heads, dropout)
        # replaces GuidedDenoiser's step MLP and denoiser (dreamrec.py:8-17, 41-49)
        self.step_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.denoiser = nn.Sequential(nn.Linear(3 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for module in self.modules():  # dreamrec.py:88-95
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos.weight, std=1.0)
        nn.init.normal_(self.null, std=1.0)

    def guidance(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c (B, d) from the history (B, L, d)."""
        if self.form == "official":
            return self._official_guidance(hist, mask)
        L = hist.shape[1]
        x = self.drop(hist * math.sqrt(self.dim) + self.pos.weight[-L:][None]) * mask[..., None]
        return self.encoder(x, mask, last_only=True)[:, -1]

    def _official_guidance(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # an empty history is the official len_seq 1 over the (zero) pad row: the last column
        # counts as a real position holding a zero embedding
        real = mask.clone()
        real[:, -1] |= ~mask.any(1)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)  # 0 = oldest item in the window (sasrec.py:109-112)
        x = (hist * mask[..., None]) * math.sqrt(self.dim) + self.pos(pos)  # sasrec.py:107-112
        return self.encoder(self.drop(x), real)[:, -1]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.form == "ours":
            return super().denoise(x_t, t, c)
        d_t = self.step_mlp(timestep_embedding(t, self.dim).to(x_t.dtype))
        return self.denoiser(torch.cat([x_t, d_t, c], dim=-1))  # dreamrec.py:51-55: [z, t_emb, c]

    def cfg(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        if self.form == "ours":
            return super().cfg(cond, uncond)
        return uncond + (1 + self.w) * (cond - uncond)  # dreamrec.py:140, cfg_scale = 1 + w

    def official_timesteps(self) -> list[int]:
        """The official DDIM grid, noisy end first, ending at T/n - 1 (dreamrec.py:130-136):
        e.g. T 1000, n 20 -> 999, 949, ..., 49; the last step goes to the clean end."""
        grid = torch.linspace(self.diffusion.steps, 0, self.sample_steps + 1, dtype=torch.long) - 1
        return [int(v) for v in grid[:-1]]

    def sample(self, guided, x_T: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.form == "ours":
            return super().sample(guided, x_T, eps)
        grid = self.official_timesteps()
        x, B = x_T, x_T.shape[0]
        for i, t in enumerate(grid):
            t_next = grid[i + 1] if i + 1 < len(grid) else -1  # -1: abar = 1 (dreamrec.py:143-148)
            x0_hat = guided(x, torch.full((B,), t, dtype=torch.long, device=x.device))
            x = ddim_step(self.diffusion, x0_hat, x, t, t_next, self.eta, eps[:, i].to(x.dtype))  # :150-166
        return x


@dataclass
class DreamRecConfig(GuidanceFields, EncoderFields, ModelConfig):
    """``model.name: dreamrec``; ``dreamrec_form``: ours | official (baiyimeng/DreamRec @ f77206d:
    its encoder, 192 -> 64 -> 64 denoiser, init, CFG, DDIM grid)."""

    name: str = "dreamrec"
    dreamrec_form: str = "ours"

    def build(self, max_len: int) -> DreamRec:
        return DreamRec(self.dim, max_len, self.num_blocks, self.num_heads, self.dropout, self.emb_dropout,
                        self.diffusion_steps, self.schedule, self.p_uncond, self.guidance_w, self.sample_steps,
                        self.eta, self.guidance_ce_weight, self.rank_by, self.dreamrec_form)
