"""``DiffRecDiffusion``: DiffRec's Gaussian diffusion (DiffRec/models/gaussian_diffusion.py @
YiyanXu/DiffRec d35a6c6): the schedule tables (``recsys_dist.diffusion.schedules.diffrec_betas``),
the loss-history importance timestep sampler, the per-sample training terms and the reverse
chain. Timesteps are 0-based (B,) long; ``t_u`` uniforms (B,) float64 map to t by the inverse
CDF; the history is float64 buffers (checkpointed). Derivation: docs/diffrec.md.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule
from recsys_dist.diffusion.schedules import diffrec_betas
from recsys_dist.models.diffrec.config import DiffRecConfig


class DiffRecDiffusion(nn.Module):
    """DiffRec's Gaussian diffusion: schedule tables, the loss-history importance sampler, the
    training terms and the reverse chain (DiffRec/models/gaussian_diffusion.py, see
    docs/diffrec.md). The history lives in buffers (checkpointed with the model)."""

    def __init__(self, cfg: DiffRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps = cfg.steps
        betas = diffrec_betas(cfg.steps, cfg.noise_scale, cfg.noise_min, cfg.noise_max,
                              kind=cfg.noise_schedule, beta_fixed=cfg.betas_fixed)
        schedule = NoiseSchedule(betas)
        self.gd = GaussianDiffusion(schedule)  # q_sample, posterior (float32 tables from float64)
        abar, abar_prev = schedule.alpha_bar, schedule.alpha_bar_prev
        self.register_buffer("betas64", betas, persistent=False)
        self.register_buffer("abar64", abar, persistent=False)
        self.register_buffer("abar_prev64", abar_prev, persistent=False)
        self.register_buffer("sqrt_recip_abar", (1.0 / abar).sqrt().float(), persistent=False)
        self.register_buffer("sqrt_recipm1_abar", (1.0 / abar - 1.0).sqrt().float(), persistent=False)
        self.register_buffer("Lt_history", torch.zeros(cfg.steps, cfg.history_num_per_term, dtype=torch.float64))
        self.register_buffer("Lt_count", torch.zeros(cfg.steps, dtype=torch.long))

    # --- schedule helpers
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t / (1 - abar_t), float64 (gaussian_diffusion.py:277-282)."""
        a = self.abar64[t]
        return a / (1.0 - a)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.gd.q_sample(x0, t, eps)

    def x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """gaussian_diffusion.py:270-275."""
        c1 = self.sqrt_recip_abar[t].view(-1, 1).to(xt.dtype)
        c2 = self.sqrt_recipm1_abar[t].view(-1, 1).to(xt.dtype)
        return c1 * xt - c2 * eps

    # --- importance sampler
    def timestep_probs(self) -> torch.Tensor | None:
        """p_t (T,) float64 of the importance sampler, or None while it still samples uniformly
        (some t has fewer than ``history_num_per_term`` losses; gaussian_diffusion.py:176-191)."""
        if self.cfg.timestep_sampling == "uniform" or not bool((self.Lt_count == self.cfg.history_num_per_term).all()):
            return None
        lt = torch.sqrt(torch.mean(self.Lt_history ** 2, dim=-1))
        p = lt / lt.sum()
        return p * (1.0 - self.cfg.uniform_prob) + self.cfg.uniform_prob / self.steps

    def sample_timesteps(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniforms u (B,) in [0, 1) -> (t (B,) long, pt (B,) float64) by the inverse CDF."""
        u = u.to(torch.float64)
        p = self.timestep_probs()
        if p is None:
            t = (u * self.steps).long().clamp_(0, self.steps - 1)
            return t, torch.ones_like(u)
        p = p.to(u.device)
        t = torch.searchsorted(torch.cumsum(p, 0), u, right=True).clamp_(0, self.steps - 1)
        return t, p[t] * self.steps

    @torch.no_grad()
    def update_history(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Append each sample's weight * loss to its t's history, in batch order, keeping the
        last ``history_num_per_term`` (gaussian_diffusion.py:157-171)."""
        k = self.cfg.history_num_per_term
        t = t.detach().to(self.Lt_count.device)
        loss = loss.detach().to(self.Lt_history.device, torch.float64)
        for s in torch.unique(t).tolist():
            new = loss[t == s]
            c = int(self.Lt_count[s])
            merged = torch.cat([self.Lt_history[s, :c], new])[-k:]
            self.Lt_history[s, : merged.numel()] = merged
            self.Lt_count[s] = merged.numel()

    # --- training
    def training_terms(self, denoise, x0: torch.Tensor, t_u: torch.Tensor, eps: torch.Tensor) -> dict:
        """One batch of gaussian_diffusion.py:122-174 without the history update:
        ``loss`` (B,) = weight * loss / pt, ``history`` (B,) = weight * loss (detached, for
        ``update_history``), ``t`` (B,), ``pred_x0`` (B, d)."""
        t, pt = self.sample_timesteps(t_u.to(x0.device))
        xt = self.q_sample(x0, t, eps)
        out = denoise(xt, t)
        if self.cfg.mean_type == "x0":
            target, pred_x0 = x0, out
        else:
            target, pred_x0 = eps, self.x0_from_eps(xt, t, out)
        mse = ((target - out) ** 2).mean(dim=1)
        likelihood = ((x0 - pred_x0) ** 2 / 2.0).mean(dim=1) if self.needs_likelihood else None
        loss, history = self.weigh(t, pt, mse, likelihood)
        return {"loss": loss, "history": history, "t": t, "pred_x0": pred_x0}

    @property
    def needs_likelihood(self) -> bool:
        """Whether ``weigh`` needs the t = 0 likelihood term (eps prediction with reweighting)."""
        return self.cfg.reweight and self.cfg.mean_type == "eps"

    def weigh(self, t: torch.Tensor, pt: torch.Tensor, mse: torch.Tensor,
              likelihood: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss from its mse over the N outputs (gaussian_diffusion.py:140-155):
        (weight * loss / pt, weight * loss detached). ``likelihood`` (B,): mean((x0 - x0_hat)^2 / 2),
        needed when ``needs_likelihood``. The sharded job computes mse and likelihood as sums of
        per-shard sums and calls this, so both paths weigh alike."""
        if self.cfg.reweight:
            if self.cfg.mean_type == "x0":
                w = self.snr((t - 1).clamp(min=0)) - self.snr(t)
                loss = mse
            else:
                if likelihood is None:
                    raise ValueError("eps prediction with reweight needs the likelihood term")
                b, ab, abp = self.betas64[t], self.abar64[t], self.abar_prev64[t]
                w = (1.0 - ab) / ((1.0 - abp).clamp(min=1e-300) ** 2 * (1.0 - b))
                loss = torch.where(t == 0, likelihood, mse)
            w = torch.where(t == 0, torch.ones_like(w), w)
        else:
            w, loss = torch.ones_like(pt), mse
        weighted = w.to(loss.dtype) * loss
        return weighted / pt.to(loss.dtype), weighted.detach()

    # --- inference
    def reverse(self, denoise, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """p_sample (gaussian_diffusion.py:93-120): from x (or q(x_{T'} | x) when T' > 0) run all
        T reverse steps with posterior means (+ noise when ``sampling_noise``)."""
        b, ts = x.shape[0], self.cfg.sampling_steps
        if ts > 0:
            t = torch.full((b,), ts - 1, dtype=torch.long, device=x.device)
            x = self.q_sample(x, t, noise["eps"].to(x))
        for i in reversed(range(self.steps)):
            t = torch.full((b,), i, dtype=torch.long, device=x.device)
            out = denoise(x, t)
            x0_hat = out if self.cfg.mean_type == "x0" else self.x0_from_eps(x, t, out)
            if self.cfg.sampling_noise:
                x = self.gd.p_step(x0_hat, x, t, noise["step_noise"][i].to(x))
            else:
                x, _ = self.gd.posterior(x0_hat, x, t)
        return x


def eval_noise(cfg: DiffRecConfig, batch_size: int, width: int, generator: torch.Generator) -> dict:
    """The noise of ``DiffRecDiffusion.reverse`` for B rows of ``width``: ``eps`` (B, width)
    when sampling_steps > 0, ``step_noise`` (T, B, width) when sampling_noise."""
    out = {}
    if cfg.sampling_steps > 0:
        out["eps"] = torch.randn(batch_size, width, generator=generator)
    if cfg.sampling_noise:
        out["step_noise"] = torch.randn(cfg.steps, batch_size, width, generator=generator)
    return out
