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

Few-step inference (``model.sample_steps`` = S, 0 < S < T; not in the paper): DDIM (Song et al.
2021) over the evenly spaced subsequence ``ddim_timesteps(T, S)`` of the same x0-predicting
approximator, eta = ``model.eta`` (0: deterministic apart from lambda). The approximator is
unchanged, so any trained DiffuRec samples either way; a fresh lambda is drawn at each of the S
steps. ``sample_steps`` 0 (the default) is the paper's T ancestral steps, bit for bit as before.
Quality against S: docs/models.md, "DiffuRec in few steps" (benchmarks/diffurec_few_step.py).

Choices where the paper is vague (see docs/models.md): d_s is a sinusoidal step embedding followed by
a 2-layer MLP (Linear d->4d, SiLU, Linear 4d->d); x_0 is the target embedding itself (the extra
"one step of diffusion" from e to x_0 is skipped); lambda is also sampled at inference, afresh at
every reverse step. Two forms of the approximator, ``form`` (config ``model.diffurec_form``):

- ``"official"`` (default) follows the authors' code, WHUIR/DiffuRec @ f6f70c9 (file:line there):
    * history: e_i -> Dropout(emb_dropout) -> LayerNorm, *before* the noise is added
      (src/model.py:115-120; its LayerNorm is TF-style with eps 1e-12, model.py:12-25, 36);
      the target x_0 is the raw embedding (model.py:125);
    * step embedding: x_s + MLP(sinusoid(s * 1000 / T)) -- the step is rescaled because
      ``rescale_timesteps`` defaults to True (src/main.py:44; src/diffurec.py:282, 311-312,
      443-446, 471, 509);
    * lambda is drawn per history item *and per dimension*, shape (B, L, d), from
      N(mean=lambda, std=lambda) (diffurec.py:316, ``torch.normal`` over ``rep_item.shape``), so
      z = LN(e) + lambda * (x_s + d_s) elementwise (diffurec.py:320); no norm or dropout on z;
    * the Transformer: pre-LN blocks, each block's output through Dropout(dropout)
      (diffurec.py:252-255), no final norm inside the stack (diffurec.py:268-271); the
      output then goes Dropout(dropout) -> LayerNorm (diffurec.py:321, the norm eps 1e-12,
      diffurec.py:161-174, 290) and the last row is x0_hat (diffurec.py:322), with no projection:
      it is scored by inner product against the item table (model.py:67, 77-78).
  Kept from this project rather than the official code: padding rows are zeros and masked out
  as attention keys (the official code masks query rows, diffurec.py:232-234, and ranks a
  trained padding row, so its padded positions do reach the output), so LN(e_i) is zeroed at
  padding; ``num_heads`` comes from the config (official: 4, diffurec.py:262); our FFN is
  GELU without the official inner dropout (diffurec.py:207-210); the reverse steps use the shared
  sampler's posterior variance (the official code uses beta_t, diffurec.py:476-477).
- ``"paper"`` (this project's earlier form): one lambda per history item, shape (B, L, 1);
  z = LayerNorm(Dropout(e_i + lambda_i (x_s + d_s))) at real positions, the unscaled step s in
  the sinusoid, then the Transformer with its final LayerNorm (eps 1e-5); the last row is x0_hat.
Both forms hold the same parameters (the official form uses ``norm`` on the history and the
encoder's final ``ln`` as its output norm), so their state dicts are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule, timestep_embedding
from recsys_dist.diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample
from recsys_dist.models.base import DiffusionFields, EncoderFields, ModelConfig, SequenceRecommender
from recsys_dist.models.transformer import TransformerEncoder, attention_mask
from recsys_dist.noise import UserNormalStreams, randn

FORMS = ("official", "paper")
OFFICIAL_LN_EPS = 1e-12  # the official TF-style LayerNorm (src/model.py:13, src/diffurec.py:162)


class DiffuRec(SequenceRecommender):
    def __init__(self, dim: int, num_blocks: int, num_heads: int, dropout: float, emb_dropout: float,
                 steps: int, schedule: str, lambda_uncertainty: float, form: str = "official",
                 sample_steps: int = 0, eta: float = 0.0) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"DiffuRec form (model.diffurec_form) must be one of {FORMS}, got {form!r}")
        if not 0 <= sample_steps <= steps:
            raise ValueError(f"model.sample_steps must be 0 (all {steps} ancestral steps) or in [1, {steps}] "
                             f"(DDIM), got {sample_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"model.eta must be in [0, 1], got {eta}")
        self.sample_steps, self.eta = sample_steps, eta
        self.form = form
        self.dim = dim
        self.lam = lambda_uncertainty
        self.diffusion = GaussianDiffusion(NoiseSchedule.named(schedule, steps))
        self.step_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(emb_dropout)  # official: on the history embeddings; paper: on z
        official = form == "official"
        # official: LayerNorm of the history embeddings; paper: LayerNorm of z
        self.norm = nn.LayerNorm(dim, eps=OFFICIAL_LN_EPS if official else 1e-5)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, dropout, causal=False)
        if official:
            self.encoder.ln.eps = OFFICIAL_LN_EPS  # used as the official norm_diffu_rep
        self.rep_drop = nn.Dropout(dropout)  # official only: after every block and before the output norm

    @property
    def steps(self) -> int:
        return self.diffusion.steps

    def _lambda(self, shape: tuple[int, ...], generator: torch.Generator | UserNormalStreams) -> torch.Tensor:
        """lambda ~ N(mean=lam, std=lam), elementwise over ``shape``."""
        return self.lam + self.lam * randn(shape, generator)

    def _lam_width(self) -> int:
        return self.dim if self.form == "official" else 1

    def draw_noise(self, batch_size, max_len, generator):
        return {
            "t": torch.randint(0, self.steps, (batch_size,), generator=generator),
            "eps": torch.randn(batch_size, self.dim, generator=generator),
            "lam": self._lambda((batch_size, max_len, self._lam_width()), generator),
        }

    def reverse_steps(self) -> list[int]:
        """The 0-based diffusion steps the reverse process visits, noisiest first: all T
        (ancestral, ``sample_steps`` 0) or the DDIM subsequence of ``sample_steps``."""
        if self.sample_steps == 0:
            return list(reversed(range(self.steps)))
        return ddim_timesteps(self.steps, self.sample_steps)

    def draw_eval_noise(self, batch_size, max_len, generator):
        S = len(self.reverse_steps())  # T for the paper's sampler: the same draws as before
        return {
            "x_T": randn((batch_size, self.dim), generator),
            "eps": randn((batch_size, S, self.dim), generator),
            "lam": self._lambda((batch_size, S, max_len, self._lam_width()), generator),
        }

    def approximate(self, hist: torch.Tensor, mask: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    lam: torch.Tensor) -> torch.Tensor:
        """x0_hat (B, d) from history (B, L, d), x_t (B, d), steps t (B,), lambda (B, L, d) for
        the official form, (B, L, 1) for the paper form."""
        if self.form == "paper":
            d_t = self.step_mlp(timestep_embedding(t, self.dim).to(hist.dtype))
            z = hist + lam.to(hist.dtype) * (x_t + d_t)[:, None, :]
            z = self.norm(self.drop(z)) * mask[..., None]
            return self.encoder(z, mask, last_only=True)[:, -1]
        # official (module docstring): LN(drop(e)) + lambda * (x_t + d_t), blocks, drop, LN
        s = t.float() * (1000.0 / self.steps)
        d_t = self.step_mlp(timestep_embedding(s, self.dim).to(hist.dtype))
        e = self.norm(self.drop(hist)) * mask[..., None]
        x = e + lam.to(hist.dtype) * (x_t + d_t)[:, None, :]
        attn = attention_mask(mask, causal=False)
        last = len(self.encoder.blocks) - 1
        for i, block in enumerate(self.encoder.blocks):
            x = self.rep_drop(block(x, attn, last_only=i == last))  # the last block: the last row only
        return self.encoder.ln(self.rep_drop(x[:, -1]))  # (B, 1, d) -> (B, d)

    def query(self, hist, mask, target, noise):
        t = noise["t"]
        x_t = self.diffusion.q_sample(target, t, noise["eps"].to(target.dtype))
        return self.approximate(hist, mask, x_t, t, noise["lam"])

    @torch.no_grad()
    def infer(self, hist, mask, noise):
        lam = noise["lam"]  # (B, S, L, d | 1): a fresh lambda draw at each of the S reverse steps
        index = {t: i for i, t in enumerate(self.reverse_steps())}

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.approximate(hist, mask, x_t, t, lam[:, index[int(t[0])]])

        x_T = noise["x_T"].to(hist.dtype)
        if self.sample_steps == 0:
            return ddpm_sample(denoise, self.diffusion, x_T, noise["eps"])
        return ddim_sample(denoise, self.diffusion, x_T, self.sample_steps, self.eta, noise["eps"])


@dataclass
class DiffuRecConfig(DiffusionFields, EncoderFields, ModelConfig):
    """``model.name: diffurec`` (the module docstring has the forms)."""

    name: str = "diffurec"
    lambda_uncertainty: float = 0.001  # lambda ~ N(value, value) per history item (per dimension: official)
    diffurec_form: str = "official"  # official (lambda per dim, norm before noise + after encoder) | paper
    sample_steps: int = 0  # reverse steps at eval: 0 = all diffusion_steps, ancestral (the paper's); S = DDIM
    eta: float = 0.0  # DDIM eta when sample_steps > 0 (0 = deterministic apart from lambda)

    def build(self, max_len: int) -> DiffuRec:
        return DiffuRec(self.dim, self.num_blocks, self.num_heads, self.dropout, self.emb_dropout,
                        self.diffusion_steps, self.schedule, self.lambda_uncertainty, self.diffurec_form,
                        self.sample_steps, self.eta)
