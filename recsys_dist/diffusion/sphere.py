"""Diffusion on the unit sphere S^{d-1}: DimeRec's geodesic random walk (Li et al. 2024,
appendix Algorithm 1) and its L2-normalised reverse process (Algorithm 2).

Forward (Algorithm 1, lines 6-8), for a unit vector x_0 and eps ~ N(0, I):
    v   = sigma_t * (eps - (eps . x_0) x_0)                 tangent Gaussian at x_0
    x_t = exp_{x_0}(v) = cos(|v|) x_0 + sin(|v|) v / |v|      move along the geodesic
The paper writes sigma_t = sqrt(1 - abar_t). ``walk_sigma`` adds a scale: sigma_t =
scale * sqrt(1 - abar_t). scale = 1 is the paper's formula. In d dimensions |v| is about
sigma_t sqrt(d - 1), so with scale = 1 and d = 64 the walk goes several radians, past the
antipode and around again. Its spread from x_0 then goes up and down with t: with the
trunc_linear T = 20 schedule the noisiest steps land close to x_0 again (see
tests/test_dimerec.py). ``equator_scale(d)`` = pi / (2 sqrt(d - 1)) makes the geodesic
length about (pi/2) sqrt(1 - abar_t). It grows with t and ends near pi/2 once abar_t -> 0.
That is where a uniform random point of a high-dimensional sphere lies, so the end of the
walk matches the reverse process's start (a normalised Gaussian).

Reverse (Algorithm 2, line 7): each DDPM/DDIM update of the Euclidean samplers is followed by
an L2 normalisation back onto the sphere. The DDPM step's noise is multiplied by the walk's
scale too, so forward and reverse noise are in the same units.

The maths runs in float32 whatever the input dtype, and results come back in the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from recsys_dist.diffusion.gaussian import GaussianDiffusion
from recsys_dist.diffusion.samplers import ddim_step, ddim_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_TINY = 1e-12  # squared-norm floor: keeps sqrt and its gradient finite at v = 0
_TAYLOR = 1e-6  # below this |v|^2, sin(|v|)/|v| = 1 - |v|^2/6 to float precision


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(|x|, eps) over the last dim: (..., d) -> (..., d); zero rows stay zero."""
    return F.normalize(x, dim=-1, eps=eps)


def equator_scale(dim: int) -> float:
    """pi / (2 sqrt(d - 1)): the scale that makes the walk's geodesic length about
    (pi/2) sqrt(1 - abar_t) in d dimensions (see module docstring)."""
    return math.pi / (2.0 * math.sqrt(max(dim - 1, 1)))


def tangent_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Projection of v onto the tangent space of the sphere at unit x: v - (v . x) x.

    x, v: (..., d) with |x| = 1 -> (..., d), orthogonal to x.
    """
    return v - (v * x).sum(-1, keepdim=True) * x


def exp_map(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exponential map of the unit sphere: exp_x(v) = cos(|v|) x + sin(|v|) v / |v|.

    x: (..., d) unit; v: (..., d) tangent at x (v . x = 0) -> (..., d) unit.
    At |v| -> 0, sin(|v|)/|v| is replaced by its Taylor series 1 - |v|^2/6, so exp_x(0) = x
    exactly and gradients stay finite.
    """
    n2 = (v * v).sum(-1, keepdim=True)
    n = n2.clamp_min(_TINY).sqrt()
    sinc = torch.where(n2 < _TAYLOR, 1.0 - n2 / 6.0, torch.sin(n) / n)
    return torch.cos(n) * x + sinc * v


def walk_sigma(diffusion: GaussianDiffusion, t: torch.Tensor, scale: float) -> torch.Tensor:
    """Tangent noise std sigma_t = scale * sqrt(1 - abar_t): t (B,) long -> (B,) float32."""
    return scale * diffusion.sqrt_one_minus_alpha_bar[t].float()


def geodesic_random_walk(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = exp_{x0}(sigma * P_{x0}(eps)) (Algorithm 1, lines 6-8).

    x0: (B, d), normalised here (Algorithm 1 line 6: e_a' = L2_Norm(e_a)); eps: (B, d) standard
    Gaussian; sigma: (B,) tangent noise std. Returns x_t (B, d) with |x_t| = 1, in x0's dtype.
    The result is normalised once more to remove float drift.
    """
    x = l2_normalize(x0.float())
    v = sigma.float().view(-1, *([1] * (x.dim() - 1))) * tangent_project(x, eps.float())
    return l2_normalize(exp_map(x, v)).to(x0.dtype)


def sphere_p_step(diffusion: GaussianDiffusion, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  z: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    """One ancestral step on the sphere (Algorithm 2, line 7):
    x_{t-1} = L2_Norm(mu~_t(x_t, x0_hat) + noise_scale * sqrt(beta~_t) z), with no noise at t = 0.

    x0_hat, x_t, z: (B, d); t: (B,) long. Returns (B, d) unit rows.
    """
    x = diffusion.p_step(x0_hat.float(), x_t.float(), t, noise_scale * z.float())
    return l2_normalize(x).to(x_t.dtype)


def sphere_ddim_step(diffusion: GaussianDiffusion, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int,
                     t_prev: int) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from t to t_prev, then L2 normalisation.

    The update is a linear combination of x_t and x0_hat, so after normalisation x_{t_prev}
    lies on the great circle through them, moved towards x0_hat. x0_hat, x_t: (B, d) ->
    (B, d) unit rows.
    """
    zeros = torch.zeros_like(x_t, dtype=torch.float32)
    x = ddim_step(diffusion, x0_hat.float(), x_t.float(), t, t_prev, 0.0, zeros)
    return l2_normalize(x).to(x_t.dtype)


def sphere_ddpm_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                       noise: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    """x_0 (B, d) on the sphere after T ancestral steps from x_T (B, d), which is normalised
    first (a normalised Gaussian is uniform on the sphere). noise: (B, T, d); slice i is used
    at the i-th reverse step (t = T-1-i)."""
    x = l2_normalize(x_T)
    B = x.shape[0]
    for i, s in enumerate(reversed(range(diffusion.steps))):
        t = torch.full((B,), s, dtype=torch.long, device=x.device)
        x = sphere_p_step(diffusion, denoise(x, t), x, t, noise[:, i], noise_scale)
    return x


def sphere_ddim_sample(denoise: Denoiser, diffusion: GaussianDiffusion, x_T: torch.Tensor,
                       steps: int) -> torch.Tensor:
    """x_0 (B, d) on the sphere after ``steps`` deterministic DDIM steps (evenly spaced, see
    ``ddim_timesteps``) from x_T (B, d), which is normalised first."""
    grid = ddim_timesteps(diffusion.steps, steps)
    x = l2_normalize(x_T)
    B = x.shape[0]
    for i, t in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        x0_hat = denoise(x, torch.full((B,), t, dtype=torch.long, device=x.device))
        x = sphere_ddim_step(diffusion, x0_hat, x, t, t_prev)
    return x
