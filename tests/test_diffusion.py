"""Diffusion math: schedules, forward moments, posterior against a float64 reference."""

import math

import pytest
import torch

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule, make_betas, timestep_embedding
from recsys_dist.diffusion.schedules import SCHEDULES


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [20, 32, 1000])
def test_alpha_bar_monotone_in_unit_interval(name, steps):
    s = NoiseSchedule.named(name, steps)
    assert s.betas.shape == (steps,)
    assert (s.betas > 0).all() and (s.betas < 1).all()
    abar = s.alpha_bar
    assert (abar > 0).all() and (abar <= 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_truncated_linear_matches_equation():
    # T=32: linear part scaled by 1000/32 plus the 0.01 offset; end = 0.625 + 0.01 <= tau
    betas = make_betas("trunc_linear", 32)
    assert betas[0].item() == pytest.approx(1000 / 32 * 1e-4 + 0.01)
    assert betas[-1].item() == pytest.approx(1000 / 32 * 0.02 + 0.01)
    # T=10: 2.0 + 0.01 > tau = 1, so the slope is divided by 10 (the 1/10 branch of Eq. 14)
    assert make_betas("trunc_linear", 10)[-1].item() == pytest.approx(100 * 0.02 / 10 + 0.01)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("nope", 10)


def test_q_sample_moments():
    diff = GaussianDiffusion(NoiseSchedule.named("linear", 100))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5)
    t = torch.full((200_000,), 60)
    xt = diff.q_sample(x0, t, torch.randn(200_000, 1, generator=g))
    abar = NoiseSchedule.named("linear", 100).alpha_bar[60].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 1.5, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - abar, abs=0.01)


def test_posterior_matches_float64_reference():
    sched = NoiseSchedule.named("trunc_linear", 32)
    diff = GaussianDiffusion(sched)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(16, 4, generator=g, dtype=torch.float64)
    t = torch.arange(16) * 2
    b, a = sched.betas, sched.alphas
    abar, abar_prev = sched.alpha_bar, sched.alpha_bar_prev
    ref_mean = (abar_prev[t].sqrt() * b[t] / (1 - abar[t]))[:, None] * x0 + \
               (a[t].sqrt() * (1 - abar_prev[t]) / (1 - abar[t]))[:, None] * xt
    ref_var = (1 - abar_prev[t]) / (1 - abar[t]) * b[t]
    mean, var = diff.posterior(x0.float(), xt.float(), t)
    assert torch.allclose(mean.double(), ref_mean, atol=1e-5)
    assert torch.allclose(var.squeeze(1).double(), ref_var, atol=1e-6)
    # t = 0: the posterior variance is zero and the step returns the mean exactly
    step = diff.p_step(x0.float(), xt.float(), torch.zeros(16, dtype=torch.long), torch.randn(16, 4))
    assert torch.allclose(step.double(), x0, atol=1e-5)


def test_timestep_embedding_shape_and_distinct():
    emb = timestep_embedding(torch.arange(32), 64)
    assert emb.shape == (32, 64)
    assert torch.cdist(emb, emb).add(torch.eye(32)).min() > 0


# ---- samplers ------------------------------------------------------------------------

from recsys_dist.diffusion.samplers import ddim_sample, ddim_step, ddim_timesteps, ddpm_sample  # noqa: E402


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 4) == [999, 666, 333, 0]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


def _toy():
    sched = NoiseSchedule.named("linear", 50)
    g = torch.Generator().manual_seed(4)
    return sched, GaussianDiffusion(sched), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)


def test_ddim_eta0_is_the_deterministic_formula():
    sched, diff, x0, xt = _toy()
    t, t_prev = 40, 25
    abar = sched.alpha_bar
    eps_hat = (xt.double() - abar[t].sqrt() * x0.double()) / (1 - abar[t]).sqrt()
    ref = abar[t_prev].sqrt() * x0.double() + (1 - abar[t_prev]).sqrt() * eps_hat
    got = ddim_step(diff, x0, xt, t, t_prev, eta=0.0, z=torch.randn(6, 5))  # z must be ignored
    assert torch.allclose(got.double(), ref, atol=1e-5)
    # the last step goes to the clean end: x_{-1} = x0_hat
    assert torch.allclose(ddim_step(diff, x0, xt, 3, -1, 0.0, torch.zeros(6, 5)), x0, atol=1e-5)


def test_ddim_eta1_with_all_steps_is_ddpm():
    sched, diff, x0, xt = _toy()
    for t in (49, 20, 1):
        mean, var = diff.posterior(x0, xt, torch.full((6,), t))
        assert torch.allclose(ddim_step(diff, x0, xt, t, t - 1, 1.0, torch.zeros(6, 5)), mean, atol=1e-5)
        z = torch.ones(6, 5)  # the noise term's scale is the posterior standard deviation
        spread = ddim_step(diff, x0, xt, t, t - 1, 1.0, z) - mean
        assert torch.allclose(spread, var.sqrt().expand_as(spread), atol=1e-4)  # float32 difference of O(1) terms
    # whole chains agree given the same noise
    g = torch.Generator().manual_seed(5)
    x_T, noise = torch.randn(6, 5, generator=g), torch.randn(6, 50, 5, generator=g)
    W = torch.randn(5, 5, generator=g) * 0.3

    def denoise(x, t):
        return torch.tanh(x @ W) + t[:, None].float() / 100

    assert torch.allclose(ddim_sample(denoise, diff, x_T, 50, 1.0, noise), ddpm_sample(denoise, diff, x_T, noise), atol=1e-4)
