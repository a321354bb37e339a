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


def diffrec_betas(steps: int, noise_scale: float, noise_min: float, noise_max: float,
                  kind: str = "linear-var", beta_fixed: bool = False, max_beta: float = 0.999) -> torch.Tensor:
    """DiffRec's schedules (YiyanXu/DiffRec @ d35a6c6, DiffRec/models/gaussian_diffusion.py).

    Not in ``SCHEDULES``: it takes the three noise arguments besides ``steps``.

    - ``"linear-var"`` (the one every official recipe uses, :45-51, :301-307): the *variance*
      1 - alphabar_t is linear, linspace(noise_scale * noise_min, noise_scale * noise_max, T);
      beta_1 = that first variance, beta_t = min(1 - alphabar_t / alphabar_{t-1}, max_beta).
    - ``"linear"`` (:48-49): beta_t itself = linspace(noise_scale * noise_min, noise_scale * noise_max, T).
    - ``beta_fixed`` (:30-31; default True in DiffRec/ and T-DiffRec/, False in L-DiffRec/ and
      LT-DiffRec/): beta_1 is then overwritten with 1e-5 after the schedule is built.

    The scale keeps alphabar_T close to 1 (ml-1m_clean: 1 - alphabar_T = 5e-5): DiffRec never
    corrupts a user's interactions to pure noise.
    """
    if steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {steps}")
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
    start, end = noise_scale * noise_min, noise_scale * noise_max
    grid = torch.linspace(start, end, steps, dtype=torch.float64)
    if kind == "linear":
        betas = grid
    elif kind == "linear-var":
        abar = 1.0 - grid
        betas = torch.empty(steps, dtype=torch.float64)
        betas[0] = 1.0 - abar[0]
        betas[1:] = (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    else:
        raise ValueError(f"unknown DiffRec noise schedule '{kind}' (known: linear, linear-var)")
    if beta_fixed:
        betas[0] = 1e-5
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(f"DiffRec betas out of (0, 1]: scale {noise_scale}, min {noise_min}, max {noise_max}")
    return betas
