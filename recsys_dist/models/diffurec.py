"""DiffuRec (Li, Sun, Li; TOIS 2023): diffuse the target embedding, let it and a step
embedding perturb every history item, and reconstruct the target with a Transformer.

Training (paper Algorithm 2), for a target embedding e_{n+1} = x_0:
    s ~ U{0..T-1},  x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s) eps            (Eq. 15)
    z_i = e_i + lambda_i (x_s + d_s),   lambda_i ~ N(lambda, lambda)          (Eq. 13)
    x0_hat = Transformer(z_1..z_n)[last]                                     (Eq. 12)
and the query x0_hat is scored against every item with softmax CE (Eq. 17-18).

Inference (Algorithm 1): x_T ~ N(0, I); for s = T-1..0, x0_hat = f(z(x_s, s)) and
x_{s-1} = posterior mean + sqrt(posterior var) eps' (Eq. 16); x_0 is the query (rounding by
inner product = ranking the catalog, Eq. 19).

Choices where the paper is vague (see README): d_s is a sinusoidal step embedding followed by
a 2-layer MLP; x_0 is the target embedding itself (the extra "one step of diffusion" from e to
x_0 is skipped); lambda is one scalar per history item, also sampled at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule, timestep_embedding
from recsys_dist.diffusion.samplers import ddpm_sample
from recsys_dist.models.base import SequenceRecommender
from recsys_dist.models.transformer import TransformerEncoder


class DiffuRec(SequenceRecommender):
    def __init__(self, dim: int, num_blocks: int, num_heads: int, dropout: float, emb_dropout: float,
                 steps: int, schedule: str, lambda_uncertainty: float) -> None:
        super().__init__()
        self.dim = dim
        self.lam = lambda_uncertainty
        self.diffusion = GaussianDiffusion(NoiseSchedule.named(schedule, steps))
        self.step_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(emb_dropout)
        self.norm = nn.LayerNorm(dim)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=False)

    @property
    def steps(self) -> int:
        return self.diffusion.steps

    def _lambda(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return self.lam + self.lam * torch.randn(shape, generator=generator)

    def draw_noise(self, batch_size, max_len, generator):
        return {
            "t": torch.randint(0, self.steps, (batch_size,), generator=generator),
            "eps": torch.randn(batch_size, self.dim, generator=generator),
            "lam": self._lambda((batch_size, max_len, 1), generator),
        }

    def draw_eval_noise(self, batch_size, max_len, generator):
        T = self.steps
        return {
            "x_T": torch.randn(batch_size, self.dim, generator=generator),
            "eps": torch.randn(batch_size, T, self.dim, generator=generator),
            "lam": self._lambda((batch_size, T, max_len, 1), generator),
        }

    def approximate(self, hist: torch.Tensor, mask: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    lam: torch.Tensor) -> torch.Tensor:
        """x0_hat (B, d) from history (B, L, d), x_t (B, d), steps t (B,), lambda (B, L, 1)."""
        d_t = self.step_mlp(timestep_embedding(t, self.dim).to(hist.dtype))
        z = hist + lam.to(hist.dtype) * (x_t + d_t)[:, None, :]
        z = self.norm(self.drop(z)) * mask[..., None]
        return self.encoder(z, mask)[:, -1]

    def query(self, hist, mask, target, noise):
        t = noise["t"]
        x_t = self.diffusion.q_sample(target, t, noise["eps"].to(target.dtype))
        return self.approximate(hist, mask, x_t, t, noise["lam"])

    @torch.no_grad()
    def infer(self, hist, mask, noise):
        lam = noise["lam"]  # (B, T, L, 1): a fresh lambda draw at every reverse step
        T = self.steps

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.approximate(hist, mask, x_t, t, lam[:, T - 1 - int(t[0])])

        return ddpm_sample(denoise, self.diffusion, noise["x_T"].to(hist.dtype), noise["eps"])
