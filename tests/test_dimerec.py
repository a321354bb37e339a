"""DimeRec: the geodesic random walk on the sphere, the GEM variants, the DAM losses, noise
and padding conventions, gradients, and a tiny learning check against a fixed item table."""

import math

import pytest
import torch
import torch.nn.functional as F

from recsys_dist.models import model_config
from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule
from recsys_dist.diffusion.sphere import (equator_scale, exp_map, geodesic_random_walk, l2_normalize,
                                          sphere_ddim_sample, sphere_ddim_step, sphere_ddpm_sample,
                                          sphere_p_step, tangent_project, walk_sigma)
from recsys_dist.models.dimerec import DimeRec

torch.set_num_threads(1)

D, L, T, N_ITEMS = 16, 10, 8, 30


def _model(gem="model", sphere=True, num_blocks=0, sample_steps=4, dropout=0.0, **kw):
    return DimeRec(D, L, num_blocks, 2, dropout, dropout, T, "trunc_linear", sample_steps, 4, gem,
                   0.1, 1.0, sphere, **kw)


def _batch(seed=0):
    """Rows: 1 item, 5 items, full history, 2 items (shorter than K = 4)."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(N_ITEMS, D, generator=g)
    ids = torch.randint(0, N_ITEMS, (4, L), generator=g)
    mask = torch.zeros(4, L, dtype=torch.bool)
    mask[0, -1:] = True
    mask[1, -5:] = True
    mask[2] = True
    mask[3, -2:] = True
    tgt = torch.randint(0, N_ITEMS, (4,), generator=g)
    return items[ids] * mask[..., None], mask, items[tgt], items, tgt


def _ce(items, tgt):
    """Full-softmax CE of the targets over a fixed item table: the harness scorer in small."""
    return lambda q: F.cross_entropy(q @ items.t(), tgt)


def _unit(n, d, seed):
    return l2_normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------- sphere


@pytest.mark.parametrize("scale", [None, 1.0])  # default (equator) and the paper's literal scale
def test_walk_stays_on_the_unit_sphere(scale):
    diff = GaussianDiffusion(NoiseSchedule.named("linear", T))
    s = equator_scale(D) if scale is None else scale
    x = _unit(512, D, 0)
    g = torch.Generator().manual_seed(1)
    for t in range(T):
        tt = torch.full((512,), t)
        y = geodesic_random_walk(x, torch.randn(512, D, generator=g), walk_sigma(diff, tt, s))
        assert torch.allclose(y.norm(dim=-1), torch.ones(512), atol=1e-5)
    # huge tangent vectors (many turns around the sphere) too
    y = geodesic_random_walk(x, torch.randn(512, D, generator=g), torch.full((512,), 50.0))
    assert torch.allclose(y.norm(dim=-1), torch.ones(512), atol=1e-5)


@pytest.mark.parametrize("schedule", ["trunc_linear", "linear", "cosine"])
@pytest.mark.parametrize("dim", [D, 64])
def test_walk_spread_grows_with_t(schedule, dim):
    diff = GaussianDiffusion(NoiseSchedule.named(schedule, T))
    x = _unit(4000, dim, 2)
    g = torch.Generator().manual_seed(3)
    spread = []
    for t in range(T):
        y = geodesic_random_walk(x, torch.randn(4000, dim, generator=g),
                                 walk_sigma(diff, torch.full((4000,), t), equator_scale(dim)))
        spread.append(1 - (x * y).sum(-1).mean().item())  # 1 - mean cosine to the start
    assert all(b > a for a, b in zip(spread, spread[1:])), spread
    assert spread[-1] < 1.1  # never past the equator on average (no wrap-around)


def test_paper_literal_walk_wraps_around_in_64_dims():
    """Why the walk is rescaled: with sigma_t = sqrt(1 - abar_t) and d = 64 the spread is not
    monotone in t -- some of the noisiest steps land close to the start again."""
    diff = GaussianDiffusion(NoiseSchedule.named("trunc_linear", 20))
    x = _unit(2000, 64, 4)
    g = torch.Generator().manual_seed(5)
    spread = [1 - (x * geodesic_random_walk(x, torch.randn(2000, 64, generator=g),
                                            walk_sigma(diff, torch.full((2000,), t), 1.0))).sum(-1).mean().item()
              for t in range(20)]
    assert max(spread) > 1.5 and spread[-1] < 0.5 * max(spread)


def test_tangent_projection_is_orthogonal_and_idempotent():
    x = _unit(256, D, 6)
    v = torch.randn(256, D, generator=torch.Generator().manual_seed(7)) * 3
    p = tangent_project(x, v)
    assert (p * x).sum(-1).abs().max() < 1e-5
    assert torch.allclose(tangent_project(x, p), p, atol=1e-5)


def test_exp_map_at_zero_is_identity_with_finite_gradient():
    x = _unit(64, D, 8)
    v = torch.zeros(64, D, requires_grad=True)
    y = exp_map(x, v)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.isfinite(v.grad).all()
    # first order: exp_x(v) ~ x + v for a tiny tangent v; a quarter turn is orthogonal to x
    small = 1e-4 * tangent_project(x, torch.randn(64, D, generator=torch.Generator().manual_seed(9)))
    assert torch.allclose(exp_map(x, small), x + small, atol=1e-7)
    u = l2_normalize(tangent_project(x, torch.randn(64, D, generator=torch.Generator().manual_seed(10))))
    assert (exp_map(x, math.pi / 2 * u) * x).sum(-1).abs().max() < 1e-5


def test_reverse_steps_stay_on_the_sphere():
    diff = GaussianDiffusion(NoiseSchedule.named("trunc_linear", T))
    g = torch.Generator().manual_seed(11)
    x_t = _unit(128, D, 12)
    x0_hat = torch.randn(128, D, generator=g) * 5  # deliberately off the sphere
    for t in range(T):
        tt = torch.full((128,), t)
        y = sphere_p_step(diff, x0_hat, x_t, tt, torch.randn(128, D, generator=g), 0.3)
        assert torch.allclose(y.norm(dim=-1), torch.ones(128), atol=1e-5)
        y = sphere_ddim_step(diff, x0_hat, x_t, t, t - 1)
        assert torch.allclose(y.norm(dim=-1), torch.ones(128), atol=1e-5)
    denoise = lambda x, t: l2_normalize(x + 0.1 * x0_hat)  # noqa: E731
    x_T = torch.randn(128, D, generator=g) * 7
    out = sphere_ddpm_sample(denoise, diff, x_T, torch.randn(128, T, D, generator=g), 0.3)
    assert torch.allclose(out.norm(dim=-1), torch.ones(128), atol=1e-5)
    out = sphere_ddim_sample(denoise, diff, x_T, 3)
    assert torch.allclose(out.norm(dim=-1), torch.ones(128), atol=1e-5)


# ---------------------------------------------------------------- GEM


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_model_gem_ignores_padding(num_blocks):
    model = _model(num_blocks=num_blocks).eval()
    hist, mask, *_ = _batch()
    g, g_mask = model.interests(hist, mask)
    assert g.shape == (4, 4, D) and g_mask.all()
    poisoned = hist + (~mask)[..., None] * 100.0
    assert torch.allclose(model.interests(poisoned, mask)[0], g, atol=1e-5)
    # one real item: every interest is that item's encoding (attention has nowhere else to go)
    if num_blocks == 0:
        assert torch.allclose(g[0], hist[0, -1].expand(4, D), atol=1e-6)


def test_rule_gem_returns_the_last_k_items():
    model = _model(gem="rule")
    hist, mask, *_ = _batch()
    g, g_mask = model.interests(hist, mask)
    assert torch.equal(g[2], hist[2, -4:]) and g_mask[2].all()
    assert torch.equal(g_mask[0], torch.tensor([False, False, False, True]))
    assert torch.equal(g[3, 2:], hist[3, -2:]) and (g[3, :2] == 0).all()
    poisoned = hist + (~mask)[..., None] * 100.0
    assert torch.equal(model.interests(poisoned, mask)[0], g)
    # history shorter than K: left-padded with invalid zero slots
    g_short, m_short = model.interests(hist[:, -3:], mask[:, -3:])
    assert g_short.shape == (4, 4, D) and not m_short[:, 0].any() and (g_short[:, 0] == 0).all()


def test_interest_selection_is_argmax_over_valid_slots():
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    target = torch.tensor([[0.0, 1.0]])
    sel = DimeRec.select_interest(g, torch.tensor([[True, True, False]]), target)
    assert torch.equal(sel, torch.tensor([[0.0, 1.0]]))  # slot 2 would win but is padding


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("gem,sphere,num_blocks,sample_steps",
                         [("model", True, 0, 4), ("model", True, 1, T), ("rule", True, 0, 4),
                          ("model", False, 0, 4), ("rule", False, 0, T)])
def test_shapes_padding_and_noise(gem, sphere, num_blocks, sample_steps):
    model = _model(gem, sphere, num_blocks, sample_steps).eval()
    hist, mask, target, items, tgt = _batch()
    scorer = _ce(items, tgt)
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(1))
    loss = model(hist, mask, target, noise, scorer)
    assert loss.dim() == 0 and torch.isfinite(loss)
    parts = model.losses(hist, mask, target, noise, scorer)
    assert torch.allclose(loss, parts["gem"] + 0.1 * parts["recon"] + 1.0 * parts["ssm"])
    poisoned = hist + (~mask)[..., None] * 100.0
    assert torch.allclose(model(poisoned, mask, target, noise, scorer), loss, atol=1e-5)
    ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(2))
    q = model.infer(hist, mask, ev)
    assert q.shape == (4, D) and torch.isfinite(q).all()
    if sphere:
        assert torch.allclose(q.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(model.infer(poisoned, mask, ev), q, atol=1e-5)
    assert torch.equal(model.infer(hist, mask, ev), q)  # same noise -> same query
    other = model.draw_eval_noise(4, L, torch.Generator().manual_seed(3))
    assert not torch.allclose(model.infer(hist, mask, other), q)


@pytest.mark.parametrize("gem", ["model", "rule"])
def test_empty_history_is_finite(gem):
    model = _model(gem, dropout=0.1)
    hist, mask, target, items, tgt = _batch()
    mask = torch.zeros_like(mask)
    hist = hist * 0
    loss = model(hist, mask, target, model.draw_noise(4, L, torch.Generator().manual_seed(0)), _ce(items, tgt))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    q = model.eval().infer(hist, mask, model.draw_eval_noise(4, L, torch.Generator().manual_seed(1)))
    assert torch.isfinite(q).all()


@pytest.mark.parametrize("gem,sphere,num_blocks", [("model", True, 0), ("model", True, 2),
                                                   ("model", False, 0), ("rule", True, 0)])
def test_every_parameter_gets_a_gradient(gem, sphere, num_blocks):
    model = _model(gem, sphere, num_blocks, dropout=0.1)
    hist, mask, target, items, tgt = _batch()
    for seed in range(3):  # different steps t and noise: no data-dependent unused branch
        model.zero_grad(set_to_none=True)
        noise = model.draw_noise(4, L, torch.Generator().manual_seed(seed))
        model(hist, mask, target, noise, _ce(items, tgt)).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        if gem == "model":  # every interest's attention row is trained, selected by argmax or not
            assert (model.att_out.weight.grad.abs().sum(1) > 0).all()
    # the trivial scorer of tests/test_models.py also reaches everything
    model.zero_grad(set_to_none=True)
    model(hist, mask, target, model.draw_noise(4, L, torch.Generator().manual_seed(9)),
          lambda q: q.square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_builds_from_model_config_fields():
    c = model_config(name="dimerec", dim=D, num_heads=2, diffusion_steps=T, sample_steps=4)
    model = DimeRec(c.dim, L, c.num_blocks, c.num_heads, c.dropout, c.emb_dropout, c.diffusion_steps,
                    c.schedule, c.sample_steps, c.num_interests, c.gem, c.lambda_recon, c.mu_ssm, c.sphere)
    assert model.uses_scorer and model.K == c.num_interests and model.sphere is c.sphere
    with pytest.raises(ValueError, match="unknown GEM"):
        _model(gem="capsule")
    with pytest.raises(ValueError, match="sample_steps"):
        _model(sample_steps=T + 1)


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("gem,sample_steps", [("model", 4), ("rule", T)])
def test_learns_to_rank_the_target(gem, sample_steps):
    """16 fixed (history, target) pairs where the target is a fixed permutation of the last
    item; 150 Adam steps with a real full-softmax CE over a fixed 30-item table must put the
    target in the inferred top 3 for at least 12 pairs (untrained: about 1.6 by chance)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    items = torch.randn(N_ITEMS, D, generator=g)
    perm = torch.randperm(N_ITEMS, generator=g)
    ids = torch.randint(0, N_ITEMS, (16, L), generator=g)
    lens = torch.randint(3, L + 1, (16,), generator=g)
    mask = torch.arange(L)[None] >= (L - lens)[:, None]
    hist, tgt = items[ids] * mask[..., None], perm[ids[:, -1]]
    model = _model(gem, True, 0, sample_steps)
    scorer = _ce(items, tgt)
    ev = model.draw_eval_noise(16, L, torch.Generator().manual_seed(7))

    def hits():
        model.eval()
        top = (model.infer(hist, mask, ev) @ items.t()).topk(3, dim=1).indices
        model.train()
        return int((top == tgt[:, None]).any(1).sum())

    before = hits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        loss = model(hist, mask, items[tgt], model.draw_noise(16, L, gen), scorer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = hits()
    assert after >= 12 and after > before, (before, after)
