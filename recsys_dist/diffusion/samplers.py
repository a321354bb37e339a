"""Reverse-process samplers over an x_0-predicting denoiser.

A denoiser is a callable ``denoise(x_t (B, d), t (B,) long) -> x0_hat (B, d)``. Noise is
passed in explicitly (``noise`` (B, S, d), one slice per reverse step) so that evaluation is
repeatable and independent of batching.

Noise convention: slice i of ``noise`` is used at the i-th reverse step, counted from the
noisy end, for both samplers.

- ``ddpm_sample``: ancestral sampling with the posterior q(x_{t-1} | x_t, x0_hat) (DDPM
  Eq. 6-7; AREAL Eq. 4-6), T steps.
- ``ddim_sample``: DDIM (Song et al. 2021) on an evenly spaced subsequence of S <= T steps;
  eta = 0 is deterministic, eta = 1 with S = T has DDPM's posterior variance.
"""

from __future__ import annotations

from typing import Callable

import torch

from recsys_dist.diffusion.gaussian import GaussianDiffusion

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddpm_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """x_0 (B, d) after T ancestral steps from x_T (B, d); noise (B, T, d), slice i used at the
    i-th reverse step (i = 0 is the noisiest, t = T-1), the same convention as ``ddim_sample``."""
    x = x_T
    B = x.shape[0]
    for i, s in enumerate(reversed(range(diffusion.steps))):
        t = torch.full((B,), s, dtype=torch.long, device=x.device)
        x = diffusion.p_step(denoise(x, t), x, t, noise[:, i].to(x.dtype))
    return x


def ddim_timesteps(total: int, steps: int) -> list[int]:
    """Evenly spaced 0-based steps, descending, always ending at 0: e.g. (1000, 4) -> [999, 666, 333, 0]."""
    if not 1 <= steps <= total:
        raise ValueError(f"DDIM steps must be in [1, {total}], got {steps}")
    grid = torch.linspace(total - 1, 0, steps).round().long().tolist()
    return sorted(set(grid), reverse=True)


def ddim_step(diffusion: GaussianDiffusion, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
              eta: float, z: torch.Tensor) -> torch.Tensor:
    """One DDIM update from step t to t_prev (t_prev = -1 means the clean end, abar = 1)."""
    abar_t = diffusion.sqrt_alpha_bar[t].double() ** 2
    abar_prev = diffusion.sqrt_alpha_bar[t_prev].double() ** 2 if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    eps_hat = (x_t - abar_t.sqrt().to(x_t.dtype) * x0_hat) / (1 - abar_t).sqrt().to(x_t.dtype)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    dir_coef = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    return (abar_prev.sqrt().to(x_t.dtype) * x0_hat + dir_coef.to(x_t.dtype) * eps_hat
            + sigma.to(x_t.dtype) * z)


def ddim_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: torch.Tensor, steps: int,
                eta: float, noise: torch.Tensor) -> torch.Tensor:
    """x_0 (B, d) after ``steps`` DDIM steps from x_T (B, d); noise (B, steps, d) (unused if eta = 0)."""
    grid = ddim_timesteps(diffusion.steps, steps)
    x = x_T
    B = x.shape[0]
    for i, t in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        x0_hat = denoise(x, torch.full((B,), t, dtype=torch.long, device=x.device))
        x = ddim_step(diffusion, x0_hat, x, t, t_prev, eta, noise[:, i].to(x.dtype))
    return x
