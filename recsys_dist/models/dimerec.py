"""DimeRec (Li et al., 2024, "DimeRec: A Unified Framework for Enhanced Sequential
Recommendation via Generative Diffusion Models"): a multi-interest guidance extraction module
(GEM) and a diffusion aggregation module (DAM) on the unit sphere, trained jointly.

GEM, g^u = GEM(S^u) in R^{K x d} (Eq. 13, 15-17). ``gem`` selects one of two variants:
- "model" (ComiRec-SA, the paper's choice, Sec. 5.1.4): H = F(S) (B, L, d) and
      A = Softmax_over_positions(W2 tanh(W1 (H + P)))   (B, L, K)   MLP([4d, K], Tanh)  (Eq. 16)
      g = A^T H                                           (B, K, d)                     (Eq. 17)
  P is a learned positional embedding, counted from the most recent item because histories
  are left-padded. The softmax runs over real positions only. F is the item embedding (with
  emb_dropout) when num_blocks = 0, which is ComiRec-SA exactly and the paper's setting. When
  num_blocks > 0, F is a bidirectional Transformer over sqrt(d) e + P (an option; the paper's
  Table 3 ablates SASRec as the GEM and finds it weaker).
- "rule" (Eq. 15): g = the K most recent item embeddings (no parameters, so num_blocks,
  num_heads and emb_dropout go unused). Slots beyond a shorter history are zero and are never
  selected.

GEM loss (Eq. 18-19): k* = argmax_k g_k . e_a (the selection carries no gradient), and
L_gem = scorer(g_{k*}). The paper uses a sampled softmax with uniform negatives. Here the
scorer is whatever the job configures: the exact full-catalog CE or the sampled softmax.

DAM, x0_hat = f(x_t, t, g) = MLP([x_t, d_t, vec(g~)]) (Eq. 14, 20). d_t is a sinusoidal step
embedding followed by a 2-layer MLP. The K guidance vectors are concatenated in a fixed order,
not pooled: interest k always comes from attention row k of W2 (and rule slot k is always the
k-th most recent item), so their order means something. With ``sphere`` on, every g_k is
L2-normalised (g~ = g / |g|, zero slots stay zero) so that the condition has the unit scale
of x_t, whatever the norms of the item table. One hidden layer of width 4d with GELU and
dropout.

Training (Algorithm 1), with t ~ U{0..T-1} and eps ~ N(0, I):
- sphere=True: x_0 = e_a / |e_a|; x_t = exp_{x_0}(sigma_t P_{x_0} eps), the geodesic random
  walk with sigma_t = walk_scale sqrt(1 - abar_t) (``recsys_dist.diffusion.sphere``);
  x0_hat = f(...) / |f(...)|;
      L_recon = mean_b ||x0_hat - x_0||^2           (Eq. 21; squared L2 norm, summed over d)
      L_ssm   = scorer(ssm_scale * x0_hat)          (Eq. 22)
  The paper gives no temperature for Eq. 22. A unit query against raw item rows gives logits
  |e_i| cos, which are tiny at the usual init (std 0.02). The default ssm_scale = sqrt(d)
  gives the query the norm of a LayerNorm output, the same as the Transformer queries of the
  other models here. Ranking does not depend on this scale.
- sphere=False (the "w/o GRW" ablation): x_0 = e_a, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t)
  eps, x0_hat unnormalised, L_ssm = scorer(x0_hat).
- L = L_gem + lambda_recon L_recon + mu_ssm L_ssm                                 (Eq. 23)

walk_scale: the paper's sigma_t = sqrt(1 - abar_t) (walk_scale = 1) makes a geodesic of about
sqrt((1 - abar_t)(d - 1)) radians. For d = 64 that wraps around the sphere, so the noisiest
steps land near x_0 again. The default walk_scale = pi / (2 sqrt(d - 1)) keeps the spread
monotone in t and ends near the equator of x_0, where uniform points lie (see
``sphere.py``).

Inference (Algorithm 2): x_T = a normalised Gaussian (uniform on the sphere). DDIM (eta = 0)
runs ``sample_steps`` steps, or DDPM ancestral sampling when sample_steps = T. Each step uses
the normalised x0_hat and is followed by an L2 normalisation. The final x_0 (unit norm) is the
query. sphere=False runs the same samplers in Euclidean space without normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import nn

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule, timestep_embedding
from recsys_dist.diffusion.samplers import ddim_sample, ddpm_sample
from recsys_dist.diffusion.sphere import (equator_scale, geodesic_random_walk, l2_normalize,
                                          sphere_ddim_sample, sphere_ddpm_sample, walk_sigma)
from recsys_dist.models.base import DiffusionFields, EncoderFields, ModelConfig, SequenceRecommender
from recsys_dist.models.transformer import TransformerEncoder
from recsys_dist.noise import randn

GEM_KINDS = ("model", "rule")


class DimeRec(SequenceRecommender):
    uses_scorer = True  # L_gem and L_ssm are catalog softmax losses

    def __init__(self, dim: int, max_len: int, num_blocks: int, num_heads: int, dropout: float,
                 emb_dropout: float, steps: int, schedule: str, sample_steps: int, num_interests: int,
                 gem: str, lambda_recon: float, mu_ssm: float, sphere: bool, *,
                 walk_scale: float | None = None, ssm_scale: float | None = None) -> None:
        super().__init__()
        if gem not in GEM_KINDS:
            raise ValueError(f"unknown GEM '{gem}' (known: {list(GEM_KINDS)})")
        if num_interests < 1:
            raise ValueError(f"num_interests must be >= 1, got {num_interests}")
        if not 1 <= sample_steps <= steps:
            raise ValueError(f"sample_steps must be in [1, {steps}], got {sample_steps}")
        self.dim, self.max_len, self.K, self.gem = dim, max_len, num_interests, gem
        self.lambda_recon, self.mu_ssm, self.sphere = lambda_recon, mu_ssm, bool(sphere)
        self.sample_steps = sample_steps
        self.walk_scale = equator_scale(dim) if walk_scale is None else float(walk_scale)
        self.ssm_scale = math.sqrt(dim) if ssm_scale is None else float(ssm_scale)
        self.diffusion = GaussianDiffusion(NoiseSchedule.named(schedule, steps))

        # GEM (model-based only; rule-based has no parameters)
        if gem == "model":
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=0.02)
            self.drop = nn.Dropout(emb_dropout)
            self.encoder = (TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=False)
                            if num_blocks > 0 else None)
            self.att_hidden = nn.Linear(dim, 4 * dim)  # W1, Eq. 16: MLP([4d, K], Tanh)
            self.att_out = nn.Linear(4 * dim, num_interests, bias=False)  # W2 (a bias cancels in the softmax)

        # DAM
        self.step_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.denoiser = nn.Sequential(nn.Linear((num_interests + 2) * dim, 4 * dim), nn.GELU(),
                                      nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    # ------------------------------------------------------------------ GEM
    def interests(self, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guidance g^u (B, K, d) and its validity mask (B, K) from history (B, L, d), mask (B, L).

        Padded positions never reach the output. An empty history gives g = 0 with all slots
        invalid.
        """
        if self.gem == "rule":
            return self._rule_interests(hist, mask)
        B, L, d = hist.shape
        if L > self.max_len:
            raise ValueError(f"history length {L} exceeds max_len {self.max_len}")
        m = mask[..., None].to(hist.dtype)
        P = self.pos.weight[-L:][None].to(hist.dtype)  # right-aligned: P[-1] = most recent
        if self.encoder is None:
            H = self.drop(hist) * m  # F = embedding lookup (ComiRec-SA)
        else:
            H = self.encoder(self.drop(hist * math.sqrt(d) + P) * m, mask) * m
        scores = self.att_out(torch.tanh(self.att_hidden(H + P)))  # (B, L, K), Eq. 16
        scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        A = torch.softmax(scores, dim=1) * m  # * m: an empty history gives A = 0 (not uniform)
        g = torch.einsum("blk,bld->bkd", A, H)  # Eq. 17
        return g, mask.any(dim=1, keepdim=True).expand(B, self.K)

    def _rule_interests(self, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K most recent items (Eq. 15): last K columns of the left-padded history."""
        B, L, d = hist.shape
        if L < self.K:  # left-pad to K columns
            hist = torch.cat([hist.new_zeros(B, self.K - L, d), hist], dim=1)
            mask = torch.cat([mask.new_zeros(B, self.K - L), mask], dim=1)
        g_mask = mask[:, -self.K:]
        return hist[:, -self.K:] * g_mask[..., None].to(hist.dtype), g_mask

    @staticmethod
    def select_interest(g: torch.Tensor, g_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """g_u = g[argmax_k g_k . e_a] (Eq. 18): (B, K, d), (B, K), (B, d) -> (B, d).

        The argmax runs on detached scores over valid slots; the gradient flows into the
        selected interest only.
        """
        with torch.no_grad():
            sim = torch.einsum("bkd,bd->bk", g, target)
            sim = sim.masked_fill(~g_mask, torch.finfo(sim.dtype).min)
            k = sim.argmax(dim=1)
        return g.gather(1, k[:, None, None].expand(-1, 1, g.shape[-1])).squeeze(1)

    # ------------------------------------------------------------------ DAM
    def condition(self, g: torch.Tensor) -> torch.Tensor:
        """DAM condition vec(g~) (B, K*d): guidance normalised onto the sphere when ``sphere``."""
        if self.sphere:
            g = l2_normalize(g)
        return g.flatten(1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Raw x0_hat (B, d) = MLP([x_t, d_t, cond]) (Eq. 20); x_t (B, d), t (B,), cond (B, K*d)."""
        d_t = self.step_mlp(timestep_embedding(t, self.dim).to(x_t.dtype))
        return self.denoiser(torch.cat([x_t, d_t, cond], dim=-1))

    # ------------------------------------------------------------------ noise
    def draw_noise(self, batch_size, max_len, generator):
        return {"t": torch.randint(0, self.diffusion.steps, (batch_size,), generator=generator),
                "eps": torch.randn(batch_size, self.dim, generator=generator)}

    def draw_eval_noise(self, batch_size, max_len, generator):
        return {"x_T": randn((batch_size, self.dim), generator),
                "eps": randn((batch_size, self.sample_steps, self.dim), generator)}

    # ------------------------------------------------------------------ training / inference
    def losses(self, hist, mask, target, noise, scorer) -> dict[str, torch.Tensor]:
        """The three terms of Eq. 23 (scalars): ``gem``, ``recon``, ``ssm``."""
        g, g_mask = self.interests(hist, mask)
        l_gem = scorer(self.select_interest(g, g_mask, target))  # Eq. 18-19
        t, eps = noise["t"], noise["eps"].to(target.dtype)
        if self.sphere:
            x0 = l2_normalize(target)
            x_t = geodesic_random_walk(x0, eps, walk_sigma(self.diffusion, t, self.walk_scale))
            x0_hat = l2_normalize(self.denoise(x_t, t, self.condition(g)))
            query = self.ssm_scale * x0_hat
        else:
            x0 = target
            x_t = self.diffusion.q_sample(x0, t, eps)
            x0_hat = query = self.denoise(x_t, t, self.condition(g))
        l_recon = (x0_hat - x0).pow(2).sum(-1).mean()  # Eq. 21
        return {"gem": l_gem, "recon": l_recon, "ssm": scorer(query)}  # Eq. 22

    def forward(self, hist, mask, target, noise, scorer):
        parts = self.losses(hist, mask, target, noise, scorer)
        return parts["gem"] + self.lambda_recon * parts["recon"] + self.mu_ssm * parts["ssm"]  # Eq. 23

    @torch.no_grad()
    def infer(self, hist, mask, noise):
        g, _ = self.interests(hist, mask)
        cond = self.condition(g)
        x_T = noise["x_T"].to(hist.dtype)
        ddpm = self.sample_steps == self.diffusion.steps
        if self.sphere:
            def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return l2_normalize(self.denoise(x_t, t, cond))

            if ddpm:
                return sphere_ddpm_sample(denoise, self.diffusion, x_T, noise["eps"], self.walk_scale)
            return sphere_ddim_sample(denoise, self.diffusion, x_T, self.sample_steps)

        def denoise_euclid(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.denoise(x_t, t, cond)

        if ddpm:
            return ddpm_sample(denoise_euclid, self.diffusion, x_T, noise["eps"])
        return ddim_sample(denoise_euclid, self.diffusion, x_T, self.sample_steps, 0.0, noise["eps"])


@dataclass
class DimeRecConfig(DiffusionFields, EncoderFields, ModelConfig):
    """``model.name: dimerec``: GEM (K interests) guiding DAM on the sphere."""

    name: str = "dimerec"
    sample_steps: int = 20  # reverse steps at evaluation
    num_interests: int = 4  # K guidance vectors
    gem: str = "model"  # model (self-attentive multi-interest) | rule (last-K items)
    lambda_recon: float = 0.1  # weight of the reconstruction loss
    mu_ssm: float = 1.0  # weight of the sampled-softmax loss on the denoised embedding
    sphere: bool = True  # geodesic random walk on the unit sphere (False: Euclidean DDPM)

    def build(self, max_len: int) -> DimeRec:
        return DimeRec(self.dim, max_len, self.num_blocks, self.num_heads, self.dropout, self.emb_dropout,
                       self.diffusion_steps, self.schedule, self.sample_steps, self.num_interests, self.gem,
                       self.lambda_recon, self.mu_ssm, self.sphere)
