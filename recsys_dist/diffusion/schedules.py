"""Noise schedules beta_1..beta_T (float64 numpy-free torch tensors).

Each schedule returns ``betas`` of shape (T,), float64, every value in (0, 1), so that
alpha_t = 1 - beta_t and alphabar_t = prod_{s<=t} alpha_s is monotone decreasing in (0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _betas_from_alpha_bar(steps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - abar(t/T) / abar((t-1)/T), clipped to max_beta (Nichol & Dhariwal)."""
    betas = []
    for i in range(steps):
        t1, t2 = i / steps, (i + 1) / steps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, rescaled so that any T spans the same total noise as T=1000."""
    scale = 1000.0 / steps
    return torch.linspace(scale * beta_start, min(scale * beta_end, 0.999), steps, dtype=torch.float64)


def truncated_linear_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                           offset: float = 0.01, tau: float = 1.0) -> torch.Tensor:
    """DiffuRec's truncated-linear schedule (paper Eq. 14).

    beta_s = (a/T) s + b, with a, b chosen as the linear schedule rescaled to T steps plus an
    offset of 0.01; if the end value exceeds the threshold tau (= 1 in the paper) the slope is
    divided by 10 -- the "1/10" branch of Eq. 14.
    """
    scale = 1000.0 / steps
    start = scale * beta_start + offset
    end = scale * beta_end + offset
    if end > tau:
        end = scale * beta_end / 10.0 + offset
    return torch.linspace(start, min(end, 0.999), steps, dtype=torch.float64)


def sqrt_betas(steps: int) -> torch.Tensor:
    """Diffusion-LM's sqrt schedule: abar(t) = 1 - sqrt(t + 1e-4)."""
    return _betas_from_alpha_bar(steps, lambda t: 1.0 - math.sqrt(t + 1e-4))


def cosine_betas(steps: int, s: float = 0.008) -> torch.Tensor:
    """Improved-DDPM cosine schedule: abar(t) = cos^2(((t + s) / (1 + s)) pi / 2)."""
    return _betas_from_alpha_bar(steps, lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2)


def exponential_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Geometric interpolation between beta_start and beta_end (log-linear)."""
    scale = 1000.0 / steps
    lo, hi = math.log(scale * beta_start), math.log(min(scale * beta_end, 0.999))
    return torch.exp(torch.linspace(lo, hi, steps, dtype=torch.float64))


SCHEDULES = {
    "linear": linear_betas,
    "trunc_linear": truncated_linear_betas,
    "sqrt": sqrt_betas,
    "cosine": cosine_betas,
    "exponential": exponential_betas,
}


def make_betas(name: str, steps: int) -> torch.Tensor:
    """Betas (T,) float64 for a named schedule (one of ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule '{name}' (known: {sorted(SCHEDULES)})")
    if steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {steps}")
    return SCHEDULES[name](steps)


@dataclass(frozen=True)
class NoiseSchedule:
    """Precomputed float64 tables of a schedule; index t in [0, T) means diffusion step t+1."""

    betas: torch.Tensor  # (T,)

    @classmethod
    def named(cls, name: str, steps: int) -> "NoiseSchedule":
        return cls(make_betas(name, steps))

    @property
    def steps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alpha_bar_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
