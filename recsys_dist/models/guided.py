"""The guided x0-denoiser shared by DreamRec and AREAL: everything but the history encoder.

A subclass builds its encoder and implements ``guidance(hist, mask) -> c`` (B, d).
- Denoiser f(x_t, t, c) -> x0_hat: an MLP on [x_t, c, step embedding].
- Training: t ~ U{0..T-1}, x_t = q(x_t | e_target); loss = ||x0_hat - e_target||^2 (mean over
  dims and samples); no negatives. Classifier-free guidance: with probability p_u a sample's
  c is replaced by a learned null vector (per-sample ``torch.where``, so every parameter
  receives a gradient every step, whatever the dropout draw).
- Sampling: x0_guided = (1 + w) f(x_t, t, c) - w f(x_t, t, null), DDIM with ``sample_steps``
  steps (DDPM ancestral when sample_steps = T and eta = 1). ``w`` is ``model.guidance_w`` in
  the convention of DreamRec's original code (YangZhengyi98/DreamRec @ 454133c, DreamRec.py:198,
  ``--w``); the refined fork's ``cfg_scale`` s (baiyimeng/DreamRec @ f77206d, dreamrec.py:140:
  uncond + s (cond - uncond)) is s = 1 + w, so its default s = 2 is w = 1 here.
  A subclass may override ``cfg`` (the combination) and ``sample`` (the reverse process), as
  DreamRec's official form does.
- Optional guidance CE (``guidance_ce_weight`` > 0; 0, the papers' MSE-only design, by
  default): loss = MSE + weight * CE(c), the softmax CE of the target over the catalog with the
  guidance c as the query (the job's scorer: full CE or sampled softmax). It is DimeRec's L_gem
  (its Eq. 19) for one guidance vector: the encoder learns from the target directly instead of
  only through the denoiser. The denoiser and the generation stay MSE-only. Why: docs/results.md,
  "DreamRec and AREAL at CPU budgets".
- ``rank_by = "guidance"`` (an evaluation-time ablation) returns c itself instead of the
  generated x0: what the reverse diffusion adds over its own guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule, timestep_embedding
from recsys_dist.diffusion.samplers import ddim_sample, ddpm_sample
from recsys_dist.models.base import DiffusionFields, SequenceRecommender
from recsys_dist.noise import randn


class GuidedDenoiser(SequenceRecommender):
    def __init__(self, dim: int, steps: int, schedule: str, p_uncond: float, guidance: float,
                 sample_steps: int, eta: float, guidance_ce_weight: float = 0.0,
                 rank_by: str = "generated") -> None:
        super().__init__()
        if guidance_ce_weight < 0:
            raise ValueError(f"guidance_ce_weight must be >= 0, got {guidance_ce_weight}")
        if rank_by not in ("generated", "guidance"):
            raise ValueError(f"rank_by must be 'generated' or 'guidance', got '{rank_by}'")
        self.rank_by = rank_by
        self.dim, self.p_uncond, self.w = dim, p_uncond, guidance
        self.guidance_ce_weight = guidance_ce_weight
        self.uses_scorer = guidance_ce_weight > 0  # MSE only: no negatives, no candidate rows looked up
        self.sample_steps, self.eta = sample_steps, eta
        self.diffusion = GaussianDiffusion(NoiseSchedule.named(schedule, steps))
        self.null = nn.Parameter(torch.zeros(dim))
        self.step_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.denoiser = nn.Sequential(nn.Linear(3 * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def guidance(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c (B, d) from the history (B, L, d) and its mask (B, L)."""
        raise NotImplementedError

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x0_hat (B, d) from x_t (B, d), steps t (B,), guidance c (B, d)."""
        d_t = self.step_mlp(timestep_embedding(t, self.dim).to(x_t.dtype))
        return self.denoiser(torch.cat([x_t, c, d_t], dim=-1))

    def draw_noise(self, batch_size, max_len, generator):
        return {"t": torch.randint(0, self.diffusion.steps, (batch_size,), generator=generator),
                "eps": torch.randn(batch_size, self.dim, generator=generator),
                "uncond": torch.rand(batch_size, generator=generator) < self.p_uncond}

    def draw_eval_noise(self, batch_size, max_len, generator):
        return {"x_T": randn((batch_size, self.dim), generator),
                "eps": randn((batch_size, self.sample_steps, self.dim), generator)}

    def forward(self, hist, mask, target, noise, scorer=None):
        c = self.guidance(hist, mask)
        aux = self.guidance_ce_weight * scorer(c) if self.guidance_ce_weight > 0 else 0.0
        c = torch.where(noise["uncond"][:, None], self.null.to(c.dtype).expand_as(c), c)
        x_t = self.diffusion.q_sample(target, noise["t"], noise["eps"].to(target.dtype))
        return (self.denoise(x_t, noise["t"], c) - target).pow(2).mean() + aux

    @torch.no_grad()
    def infer(self, hist, mask, noise):
        c = self.guidance(hist, mask)
        if self.rank_by == "guidance":
            return c
        null = self.null.to(c.dtype).expand_as(c)

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.cfg(self.denoise(x_t, t, c), self.denoise(x_t, t, null))

        return self.sample(guided, noise["x_T"].to(hist.dtype), noise["eps"])

    def cfg(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: the guided x0 from f(x_t, t, c) and f(x_t, t, null)."""
        return (1 + self.w) * cond - self.w * uncond

    def sample(self, guided, x_T: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 (B, d) by the reverse process over ``guided(x_t, t) -> x0_hat`` from x_T (B, d),
        with noise eps (B, sample_steps, d): DDPM when sample_steps = T and eta = 1, else DDIM."""
        if self.sample_steps == self.diffusion.steps and self.eta == 1.0:
            return ddpm_sample(guided, self.diffusion, x_T, eps)
        return ddim_sample(guided, self.diffusion, x_T, self.sample_steps, self.eta, eps)


@dataclass
class GuidanceFields(DiffusionFields):
    """Classifier-free-guided x0-denoisers' sampling and training switches (DreamRec, AREAL)."""

    p_uncond: float = 0.1  # probability of dropping the guidance in training
    guidance_w: float = 2.0  # guidance strength w at sampling: (1 + w) f(c) - w f(null)
    sample_steps: int = 20  # reverse steps at evaluation (DDIM when < diffusion_steps)
    eta: float = 0.0  # DDIM eta (0 = deterministic; 1 with sample_steps = T = DDPM)
    guidance_ce_weight: float = 0.0  # + weight * CE(guidance c) over the catalog (0 = MSE only, the papers')
    rank_by: str = "generated"  # at eval: generated (x0 from reverse diffusion) | guidance (c; ablation)
