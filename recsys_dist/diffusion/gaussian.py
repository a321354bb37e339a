"""Gaussian diffusion: forward process q(x_t | x_0) and the DDPM posterior q(x_{t-1} | x_t, x_0).

Pure tensor math; models call it with their own denoiser. Timesteps ``t`` are 0-based
indices into the schedule: t = 0 is the least noisy step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recsys_dist.diffusion.schedules import NoiseSchedule


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps: t (B,) long -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GaussianDiffusion(nn.Module):
    """Holds a schedule as float32 buffers and implements q(x_t|x_0) and the posterior.

    Buffers move with the module (``.to(device)``) and are not trained.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.steps = schedule.steps
        abar = schedule.alpha_bar
        abar_prev = schedule.alpha_bar_prev
        betas = schedule.betas
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas,
            "sqrt_alpha_bar": abar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - abar).sqrt(),
            "posterior_var": post_var,
            "posterior_coef_x0": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_coef_xt": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to broadcast against ``like`` (B, ...)."""
        out = table[t]
        return out.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.  x0, eps: (B, d); t: (B,) long."""
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def posterior(self, x0_hat: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, d) and variance (B, 1) of q(x_{t-1} | x_t, x0_hat) (DDPM Eq. 6-7)."""
        mean = self._at(self.posterior_coef_x0, t, xt) * x0_hat + self._at(self.posterior_coef_xt, t, xt) * xt
        return mean, self._at(self.posterior_var, t, xt)

    def p_step(self, x0_hat: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}: posterior mean + sqrt(var) * noise (no noise at t=0)."""
        mean, var = self.posterior(x0_hat, xt, t)
        nonzero = (t > 0).to(xt.dtype).view(-1, *([1] * (xt.dim() - 1)))
        return mean + nonzero * var.sqrt() * noise
