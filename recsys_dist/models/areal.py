"""AREAL (arXiv 2312.10885): a guided x0-predicting diffusion recommender whose guidance h is
produced by the MCRL encoder (Multi-scale CNN + Residual LSTM, attention fusion).

Equation numbers refer to the paper (``/work/shared/papers/areal-mcrl-full-paper.txt``).

MCRL encoder (Sec. 4.1), one block l on H^l (B, L, d), L = ``num_blocks`` blocks stacked:

- Multi-scale CNN, local features (Eq. 10-15)::

      H'    = LN(Linear(H^l))                                              (Eq. 11)
      out_k = LN(Pool(Conv1D_k(H')))      k in {1, 3, 5}                   (Eq. 12-14)
      S_cnn = Linear(Atten(out_1, out_2, out_3))                           (Eq. 15)

- Residual LSTM, global features (Eq. 16-19)::

      H''   = LN(Linear(H^l))                                              (Eq. 17)
      out   = LN(LSTM(H''))                                                (Eq. 18)
      S_lstm = LN(Linear(out ⊕ H''))      ⊕ = concatenation, 2d -> d       (Eq. 19)

- Attention fusion and block output (Eq. 20-21)::

      z       = Atten(S_cnn ⊕ S_lstm)     prior weights (w, 1 - w)         (Eq. 20)
      H^{l+1} = LN(Linear(z))                                              (Eq. 21)

- h = Linear_out(H^L[:, -1]): the most recent position through the output layer (Fig. 3).

Diffusion (Sec. 3, 4.2), exactly as ``DreamRec`` does it:

- Forward process q(x_t | x_0) (Eq. 1-3) on x_0 = target embedding, any schedule (paper: sqrt,
  T = 1000 -- config values, not defaults of this class).
- Reverse process conditioned on h (Eq. 22-23): a denoiser f(x_t, t, h) -> x0_hat, an MLP on
  [x_t, h, step embedding]; p_theta(x_{t-1} | x_t, h) is the posterior q(x_{t-1} | x_t, x0_hat)
  (Eq. 4-6).
- Objective (Eq. 24): with an x0-parameterised Gaussian reverse process every KL term of the
  VLB is a t-dependent multiple of ||x0_hat - x_0||^2; like DreamRec / DiffuRec we drop the
  weights and train the plain MSE ``mean((x0_hat - e_target)^2)`` with t ~ U{0..T-1}; no
  negatives, so ``uses_scorer = False`` (unless the opt-in guidance CE of ``models/guided.py``
  is on; off by default).
- Classifier-free guidance (not in the paper; the project's guided-denoiser convention): with
  probability ``p_uncond`` a sample's h is replaced by a learned null vector (per-sample
  ``torch.where``, so every parameter gets a gradient every step); at sampling
  x0_guided = (1 + w) f(x_t, t, h) - w f(x_t, t, null), DDIM with ``sample_steps`` steps and
  ``eta``, DDPM ancestral sampling when sample_steps == T and eta == 1.

Choices where the paper is vague (also listed in the class docstrings):

1. Pool (Eq. 12-14): max-pool, kernel 3, stride 1, padding 1 -- length preserving, so every
   position keeps a feature and the last position can be read out. Padded positions are set to
   -inf before pooling, which is exactly what MaxPool1d's own border padding does, so a real
   position pools over real neighbours only.
2. Eq. 11 / Eq. 17 (the same formula written twice): each branch has its own input projection
   LN(Linear(.)), so an ablated branch takes its projection with it.
3. Atten in Eq. 15 and Eq. 20: position-wise additive attention over the branches,
   a_b = softmax_b(v^T tanh(W s_b) + log prior_b), output sum_b a_b s_b. In Eq. 20 the prior is
   (w, 1 - w) with w = ``local_weight`` (Table 3's local:global ratio, paper best 3:7): the
   configured ratio is the fusion weight of a neutral attention score, and the learned scores
   re-weight it per user and position (the paper motivates attention fusion by "personalised
   weights" of long/short-term preferences). w = 0 or 1 switches a branch off exactly.
4. Eq. 19 concatenates the LSTM output and the identity skip (2d) and projects back to d with
   the Linear that Eq. 19 already has.
5. Eq. 21 ``Linear(z w_l + b_l)`` is two affine maps in a row, i.e. one affine map: one Linear,
   followed by LayerNorm (the "normalization layer" of the fusion paragraph). No extra residual
   around the block (the paper names none; the R-lstm skip carries the input through).
6. Embedding (Eq. 10/16): item embeddings scaled by sqrt(d) (as SASRec/DreamRec here) and
   ``emb_dropout``; ``dropout`` acts on each branch output and on the block's Linear. No
   positional embedding: convolutions and the LSTM are order-aware (``max_len`` is accepted
   for the uniform builder signature and is unused).
7. Ablations (Table 3): ``use_cnn=False`` -> global only (no fusion attention), ``use_lstm=False``
   -> local only, both False -> no history encoder: h = Linear_out(mean of the history's item
   embeddings).
8. Padding: histories are left-padded. Padded positions are zeroed at the input of every block
   (after the branch input projections, before the convolutions -- the zeros are then exactly
   the convolutions' own 'same' padding) and at the output of every block; the LSTM runs on a
   packed sequence with the real items moved to the front. The encoder's h is therefore
   *exactly* the h of the unpadded history, whatever the padded positions hold.
9. Empty history (mask all False): the encoder returns a finite vector (the output layer's
   bias); AREAL replaces it by the learned null vector, i.e. it samples unconditionally.
10. Initialisation: PyTorch defaults (the paper initialises everything with N(0, 0.1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from recsys_dist.models.base import ModelConfig
from recsys_dist.models.guided import GuidanceFields, GuidedDenoiser

CNN_KERNELS = (1, 3, 5)  # Eq. 12-14


def zero_padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, L, d) with padded positions (mask (B, L) False) set to exactly 0.

    ``torch.where`` rather than a multiplication, so inf / NaN garbage at padding cannot leak.
    """
    return torch.where(mask[..., None], x, x.new_zeros(()))


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-row circular shift along dim 1: out[b, j] = x[b, (j + shift[b]) % L].

    x (B, L, d), shift (B,) long. For a left-padded row with n real items, shift = L - n moves
    the items to the front (right padding) and shift = n moves them back.
    """
    L = x.shape[1]
    idx = (torch.arange(L, device=x.device)[None, :] + shift[:, None]) % L
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class BranchAttention(nn.Module):
    """Position-wise additive attention over n branch features (the Atten of Eq. 15 and 20).

    feats: n tensors (B, L, d) -> (sum_b a_b feats_b (B, L, d), a (B, L, n)) with
    a = softmax_b(v^T tanh(W feats_b + c) + log prior_b). ``prior`` (n weights summing to 1)
    defaults to uniform; a zero prior weight switches its branch off exactly.
    """

    def __init__(self, dim: int, n: int, prior: Sequence[float] | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)
        prior_t = torch.full((n,), 1.0 / n) if prior is None else torch.tensor(prior, dtype=torch.float32)
        if prior_t.shape != (n,) or (prior_t < 0).any() or not math.isclose(float(prior_t.sum()), 1.0, abs_tol=1e-6):
            raise ValueError(f"prior must be {n} non-negative weights summing to 1, got {prior}")
        self.register_buffer("log_prior", prior_t.log(), persistent=False)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack(list(feats), dim=-2)  # (B, L, n, d)
        logits = self.score(torch.tanh(self.proj(x))).squeeze(-1) + self.log_prior.to(x.dtype)
        a = logits.softmax(dim=-1)  # (B, L, n)
        return (a[..., None] * x).sum(dim=-2), a


class MultiScaleCNN(nn.Module):
    """Local branch, Eq. 11-15: (B, L, d), mask (B, L) -> S_cnn (B, L, d).

    H' = LN(Linear(H)) (Eq. 11), zeroed at padding; for k in (1, 3, 5):
    out_k = LN(MaxPool_{3,1,1}(Conv1d_k(H'))) on (B, d, L) with 'same' zero padding
    (Eq. 12-14); S_cnn = Linear(Atten(out_1, out_2, out_3)) (Eq. 15). Padded positions enter the
    convolutions as zeros and the max-pool as -inf, so a real position's output depends only on
    real items; padded positions of the output are finite but meaningless.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.inp_norm = nn.LayerNorm(dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, k, padding=k // 2) for k in CNN_KERNELS)
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in CNN_KERNELS)
        self.attn = BranchAttention(dim, len(CNN_KERNELS))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = zero_padded(self.inp_norm(self.inp(x)), mask).transpose(1, 2)  # (B, d, L)
        pad = ~mask[:, None, :]
        outs = []
        for conv, norm in zip(self.convs, self.norms):
            y = self.pool(conv(h).masked_fill(pad, float("-inf"))).transpose(1, 2)  # (B, L, d)
            outs.append(norm(zero_padded(y, mask)))  # -inf never reaches the LayerNorm
        return self.out(self.attn(outs)[0])


class ResidualLSTM(nn.Module):
    """Global branch, Eq. 17-19: (B, L, d), mask (B, L) -> S_lstm (B, L, d).

    H'' = LN(Linear(H)) (Eq. 17); out = LN(LSTM(H'')) (Eq. 18), a one-layer unidirectional LSTM
    (hidden d) run on the packed real items only (moved to the front, then back to left padding);
    S_lstm = LN(Linear([out, H''])) (Eq. 19: the identity skip is concatenated, 2d -> d).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.inp_norm = nn.LayerNorm(dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.lstm_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(2 * dim, dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        h = zero_padded(self.inp_norm(self.inp(x)), mask)
        n = mask.sum(1)
        # an empty row is run for one (zeroed) step and masked out later; pack needs lengths >= 1
        packed = pack_padded_sequence(roll_rows(h, L - n), n.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=L)
        out = self.lstm_norm(roll_rows(y.to(h.dtype), n))
        return self.out_norm(self.out(torch.cat([out, h], dim=-1)))


class MCRLBlock(nn.Module):
    """One MCRL block (Fig. 3): (B, L, d), mask -> (B, L, d), zero at padded positions.

    Branches as switched on; with both, z = Atten(S_cnn ⊕ S_lstm) with prior (w, 1 - w)
    (Eq. 20), with one, z is that branch's output. Output LN(Linear(z)) (Eq. 21). ``dropout``
    on each branch output and after the Linear.
    """

    def __init__(self, dim: int, dropout: float, use_cnn: bool, use_lstm: bool, local_weight: float) -> None:
        super().__init__()
        if not (use_cnn or use_lstm):
            raise ValueError("an MCRL block needs at least one branch")
        self.cnn = MultiScaleCNN(dim) if use_cnn else None
        self.lstm = ResidualLSTM(dim) if use_lstm else None
        self.fusion = BranchAttention(dim, 2, prior=(local_weight, 1.0 - local_weight)) if use_cnn and use_lstm else None
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feats = []
        if self.cnn is not None:
            feats.append(self.drop(self.cnn(x, mask)))
        if self.lstm is not None:
            feats.append(self.drop(self.lstm(x, mask)))
        z = self.fusion(feats)[0] if self.fusion is not None else feats[0]
        return zero_padded(self.norm(self.drop(self.out(z))), mask)


class MCRLEncoder(nn.Module):
    """MCRL history encoder: hist (B, L, d) left-padded, mask (B, L) -> h (B, d).

    ``num_blocks`` MCRL blocks, then the output layer (a Linear) on the last (most recent)
    position. ``use_cnn`` / ``use_lstm`` are Table 3's module switches; with both off there are
    no blocks and h = Linear(mean of the masked history rows). ``local_weight`` is the fusion
    prior w of the local branch (global: 1 - w), used only with both branches.

    h is exactly the h of the same history without padding: padded positions never matter. An
    empty history gives a finite h (the output layer's bias).
    """

    def __init__(self, dim: int, num_blocks: int, dropout: float = 0.0, use_cnn: bool = True,
                 use_lstm: bool = True, local_weight: float = 0.3) -> None:
        super().__init__()
        if not 0.0 <= local_weight <= 1.0:
            raise ValueError(f"local_weight must be in [0, 1], got {local_weight}")
        self.use_cnn, self.use_lstm, self.local_weight = use_cnn, use_lstm, local_weight
        if use_cnn or use_lstm:
            if num_blocks < 1:
                raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
            self.blocks = nn.ModuleList(MCRLBlock(dim, dropout, use_cnn, use_lstm, local_weight)
                                        for _ in range(num_blocks))
        else:
            self.blocks = nn.ModuleList()
        self.out = nn.Linear(dim, dim)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = zero_padded(hist, mask)
        if len(self.blocks) == 0:  # Table 3, no M-cnn and no R-lstm
            n = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
            return self.out(x.sum(1) / n)
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x[:, -1])


class AREAL(GuidedDenoiser):
    """AREAL: MCRL guidance h (Eq. 10-21) + x0-predicting guided diffusion (Eq. 22-24).

    ``dim, max_len, num_blocks, dropout, emb_dropout`` configure the encoder (``max_len`` is
    unused: no positional embedding); ``steps, schedule`` the diffusion (paper: 1000, "sqrt");
    ``p_uncond, guidance`` classifier-free guidance; ``sample_steps, eta`` the sampler (DDPM when
    sample_steps == steps and eta == 1, else DDIM); ``use_cnn, use_lstm, local_weight`` the
    Table 3 ablations. Noise: ``draw_noise`` -> t (B,), eps (B, d), uncond (B,) bool;
    ``draw_eval_noise`` -> x_T (B, d), eps (B, sample_steps, d).
    """

    def __init__(self, dim: int, max_len: int, num_blocks: int, dropout: float, emb_dropout: float,
                 steps: int, schedule: str, p_uncond: float, guidance: float, sample_steps: int,
                 eta: float, use_cnn: bool, use_lstm: bool, local_weight: float,
                 guidance_ce_weight: float = 0.0, rank_by: str = "generated") -> None:
        super().__init__(dim, steps, schedule, p_uncond, guidance, sample_steps, eta, guidance_ce_weight,
                         rank_by)
        self.max_len = max_len
        self.drop = nn.Dropout(emb_dropout)
        self.encoder = MCRLEncoder(dim, num_blocks, dropout, use_cnn, use_lstm, local_weight)

    def guidance(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, d) from the history (B, L, d); the null vector for an empty history."""
        x = zero_padded(self.drop(hist * math.sqrt(self.dim)), mask)
        h = self.encoder(x, mask)
        return torch.where(mask.any(1)[:, None], h, self.null.to(h.dtype).expand_as(h))


@dataclass
class AREALConfig(GuidanceFields, ModelConfig):
    """``model.name: areal``: the MCRL encoder (Table 3's ablations are the ``mcrl_*`` switches)
    guiding DreamRec's denoiser."""

    name: str = "areal"
    num_blocks: int = 2
    dropout: float = 0.1
    emb_dropout: float = 0.3
    mcrl_use_cnn: bool = True  # multi-scale CNN branch (local features)
    mcrl_use_lstm: bool = True  # residual LSTM branch (global features)
    mcrl_local_weight: float = 0.3  # fusion weight of the local branch (global gets 1 - w); paper: 3:7

    def build(self, max_len: int) -> AREAL:
        return AREAL(self.dim, max_len, self.num_blocks, self.dropout, self.emb_dropout, self.diffusion_steps,
                     self.schedule, self.p_uncond, self.guidance_w, self.sample_steps, self.eta,
                     self.mcrl_use_cnn, self.mcrl_use_lstm, self.mcrl_local_weight,
                     self.guidance_ce_weight, self.rank_by)
