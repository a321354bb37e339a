"""Dense models: shapes, padding never influences the output, noise is explicit, gradients
reach every parameter."""

import pytest
import torch

from model_checks import assert_padding_is_ignored, dense_inputs, train_tiny_next_item, small_model_config
from recsys_dist.models import SEQUENCE_MODELS, DiffuRec, build_model

L, D = 12, 16


def _inputs(seed=0):
    return dense_inputs(L, D, seed)


def _model(name, **kw):
    cfg = dict(name=name, dim=D, num_heads=2, dropout=0.0, emb_dropout=0.0, diffusion_steps=8, sample_steps=4)
    cfg.update(kw)
    return build_model(small_model_config(**cfg), L)


def _scorer(q):
    return q.square().mean()  # any function of the queries stands in for the catalog CE


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
def test_shapes_and_padding_is_ignored(name):
    model = _model(name)
    model.eval()
    hist, mask, target = _inputs()
    assert_padding_is_ignored(model, hist, mask, target, _scorer, D)


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
def test_gradients_reach_every_parameter(name):
    model = _model(name, dropout=0.1, emb_dropout=0.1)
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(0))
    if "uncond" in noise:  # guidance dropped for some samples only: both paths get gradients
        noise["uncond"] = torch.tensor([True, False, False, False])
    model(hist, mask, target, noise, _scorer).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"


def test_sasrec_is_causal():
    model = _model("sasrec")
    model.eval()
    hist, mask, _ = _inputs()
    enc_in = hist.clone()
    x = model.encoder(enc_in, mask)
    enc_in[:, -1] += torch.randn(4, D)  # (a constant shift would vanish in LayerNorm)
    y = model.encoder(enc_in, mask)
    assert torch.allclose(x[:, :-1], y[:, :-1], atol=1e-6)
    assert not torch.allclose(x[:, -1], y[:, -1])


@pytest.mark.parametrize("causal", [False, True])
def test_last_only_encoder_equals_the_full_encoder_at_the_last_position(causal):
    """The last block computed for the last row alone (``last_only``) gives what the full
    encoder gives there, padded rows and an all-padding history included, and the same
    gradients; only float rounding differs (another GEMM shape)."""
    from recsys_dist.models.transformer import TransformerEncoder

    torch.manual_seed(3)
    enc = TransformerEncoder(D, 3, 2, 0.0, causal)
    hist, mask, _ = _inputs()
    mask[0] = False  # an empty history: the last row attends only to itself
    x = hist.clone().requires_grad_(True)
    full = enc(x, mask)[:, -1]
    last = enc(x, mask, last_only=True)
    assert last.shape == (4, 1, D)
    assert torch.allclose(last[:, -1], full, atol=1e-5), (last[:, -1] - full).abs().max()
    g_full = torch.autograd.grad(full.square().sum(), [x, *enc.parameters()])
    g_last = torch.autograd.grad(last.square().sum(), [x, *enc.parameters()])
    for a, b in zip(g_full, g_last):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("form", ["official", "paper"])
def test_diffurec_step_reads_the_full_encoder_at_the_last_position(form):
    """DiffuRec's approximator (every training query and reverse step) runs its last block for
    the last row only; the result is the full blocks' last row, as the model defines it."""
    from recsys_dist.models.transformer import attention_mask

    model = _model("diffurec", diffurec_form=form, lambda_uncertainty=0.5, sample_steps=0).eval()
    hist, mask, ev = _diffurec_inputs(model)
    x_t, t, lam = torch.randn(4, D), torch.full((4,), 3), ev["lam"][:, 0]
    got = model.approximate(hist, mask, x_t, t, lam)
    if form == "paper":
        from recsys_dist.diffusion import timestep_embedding
        d_t = model.step_mlp(timestep_embedding(t, D))
        z = model.norm(hist + lam * (x_t + d_t)[:, None, :]) * mask[..., None]
        want = model.encoder(z, mask)[:, -1]
    else:
        from recsys_dist.diffusion import timestep_embedding
        d_t = model.step_mlp(timestep_embedding(t.float() * (1000.0 / model.steps), D))
        x = model.norm(hist) * mask[..., None] + lam * (x_t + d_t)[:, None, :]
        attn = attention_mask(mask, causal=False)
        for block in model.encoder.blocks:
            x = block(x, attn)
        want = model.encoder.ln(x[:, -1])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_classifier_free_guidance_mixes_conditional_and_null():
    model = _model("dreamrec", guidance_w=0.0)
    model.eval()
    hist, mask, _ = _inputs()
    ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(3))
    plain = model.infer(hist, mask, ev)
    model.w = 1.5
    guided = model.infer(hist, mask, ev)
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize("name", ["dreamrec", "areal"])
def test_guidance_ce_is_opt_in_and_adds_the_ce_of_the_guidance(name):
    plain = _model(name).eval()
    assert plain.uses_scorer is False  # the papers' MSE-only design by default: no negatives
    aux = _model(name, guidance_ce_weight=0.5).eval()
    aux.load_state_dict(plain.state_dict())
    assert aux.uses_scorer
    hist, mask, target = _inputs()
    noise = plain.draw_noise(4, L, torch.Generator().manual_seed(1))
    noise["uncond"] = torch.tensor([True, False, True, False])  # CE(c) is taken before guidance dropout
    expected = plain(hist, mask, target, noise, None) + 0.5 * _scorer(plain.guidance(hist, mask))
    assert torch.allclose(aux(hist, mask, target, noise, _scorer), expected, atol=1e-6)
    ev = plain.draw_eval_noise(4, L, torch.Generator().manual_seed(2))
    assert torch.equal(aux.infer(hist, mask, ev), plain.infer(hist, mask, ev))  # sampling unchanged
    with pytest.raises(ValueError, match="guidance_ce_weight"):
        _model(name, guidance_ce_weight=-1.0)


@pytest.mark.parametrize("name", ["dreamrec", "areal"])
def test_rank_by_guidance_returns_the_guidance(name):
    generated = _model(name).eval()
    ablation = _model(name, rank_by="guidance").eval()
    ablation.load_state_dict(generated.state_dict())
    hist, mask, _ = _inputs()
    ev = generated.draw_eval_noise(4, L, torch.Generator().manual_seed(2))
    c = generated.guidance(hist, mask)
    assert torch.equal(ablation.infer(hist, mask, ev), c)
    assert not torch.allclose(generated.infer(hist, mask, ev), c)
    with pytest.raises(ValueError, match="rank_by"):
        _model(name, rank_by="x0")


# DiffuRec: the official form (WHUIR/DiffuRec, the default) and the paper form ----------------

@pytest.mark.parametrize("sample_steps", [0, 3])  # the paper's T ancestral steps; DDIM
@pytest.mark.parametrize("form, width", [("official", D), ("paper", 1)])
def test_diffurec_noise_shapes_and_padding_by_form(form, width, sample_steps):
    model = _model("diffurec", diffurec_form=form, sample_steps=sample_steps).eval()
    assert model.form == form
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(1))
    assert noise["lam"].shape == (4, L, width)
    assert noise["t"].shape == (4,) and noise["eps"].shape == (4, D)
    ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(2))
    S = sample_steps or model.steps
    assert ev["lam"].shape == (4, S, L, width)
    assert ev["x_T"].shape == (4, D) and ev["eps"].shape == (4, S, D)
    again = model.draw_eval_noise(4, L, torch.Generator().manual_seed(2))  # from the generator only
    assert all(torch.equal(ev[k], again[k]) for k in ev)
    hist, mask, target = _inputs()
    poisoned = hist + (~mask)[..., None] * torch.randn(4, L, D)  # not a constant: LN would hide one
    q = model.query(hist, mask, target, noise)
    assert torch.allclose(model.query(poisoned, mask, target, noise), q, atol=1e-5)
    assert torch.allclose(model.infer(poisoned, mask, ev), model.infer(hist, mask, ev), atol=1e-5)


def test_diffurec_official_lambda_varies_along_d_and_is_used_per_dimension():
    model = _model("diffurec", lambda_uncertainty=0.5).eval()
    lam = model.draw_noise(64, L, torch.Generator().manual_seed(3))["lam"]  # (64, L, D)
    assert (lam.std(-1) > 0.1).all()  # not one scalar per item broadcast over d
    assert abs(lam.mean().item() - 0.5) < 0.03 and abs(lam.std().item() - 0.5) < 0.03  # N(lam, lam)
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(4))
    q = model.query(hist, mask, target, noise)
    per_item = dict(noise, lam=noise["lam"].mean(-1, keepdim=True).expand_as(noise["lam"]))
    assert not torch.allclose(model.query(hist, mask, target, per_item), q, atol=1e-4)


def test_diffurec_official_normalises_history_before_the_noise_and_the_output():
    hist, mask, target = _inputs()
    rescaled = torch.where(mask[..., None], 3.0 * hist + 0.5, hist)  # LN(a e + b) = LN(e), per row
    for form in ("official", "paper"):
        model = _model("diffurec", diffurec_form=form, lambda_uncertainty=0.5).eval()
        noise = model.draw_noise(4, L, torch.Generator().manual_seed(5))
        q = model.query(hist, mask, target, noise)
        same = torch.allclose(model.query(rescaled, mask, target, noise), q, atol=1e-4)
        assert same == (form == "official"), form  # paper: the norm acts on z, after the noise
        # the approximator's output is LayerNorm'd, no projection after it (official
        # src/diffurec.py:321-322); the norm's affine is the identity at init
        ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(6))
        rows = mask.any(1) if form == "paper" else torch.ones(4, dtype=torch.bool)  # paper: an
        # empty history zeroes z, x_t included, so its output is the constant LN bias
        for out in (q, model.infer(hist, mask, ev)):  # infer: the t=0 step returns x0_hat itself
            out = out[rows]
            assert torch.allclose(out.mean(-1), torch.zeros(len(out)), atol=1e-4)
            assert torch.allclose(out.std(-1, unbiased=False), torch.ones(len(out)), atol=1e-3)


def test_diffurec_unknown_form_raises():
    with pytest.raises(ValueError, match="diffurec_form"):
        _model("diffurec", diffurec_form="Official")
    with pytest.raises(ValueError, match="sample_steps"):
        _model("diffurec", sample_steps=9)  # T = 8
    with pytest.raises(ValueError, match="eta"):
        _model("diffurec", sample_steps=4, eta=1.5)


def _diffurec_inputs(model, seed=7):
    hist, mask, _ = _inputs(seed)
    return hist, mask, model.draw_eval_noise(4, L, torch.Generator().manual_seed(seed))


def test_diffurec_default_sampler_is_the_papers_ancestral_chain():
    """sample_steps 0: T ancestral steps (paper Algorithm 1) with lambda slice i at the i-th
    reverse step, written out here step by step; the noise is the draws of before
    (x_T, eps (T, d), lambda (T, L, d) from one generator, in that order)."""
    model = _model("diffurec", lambda_uncertainty=0.5, sample_steps=0).eval()
    T = model.steps
    hist, mask, ev = _diffurec_inputs(model)
    g = torch.Generator().manual_seed(7)
    x_T, eps = torch.randn(4, D, generator=g), torch.randn(4, T, D, generator=g)
    lam = 0.5 + 0.5 * torch.randn(4, T, L, D, generator=g)
    assert torch.equal(ev["x_T"], x_T) and torch.equal(ev["eps"], eps) and torch.equal(ev["lam"], lam)
    x = x_T
    for i, s in enumerate(range(T - 1, -1, -1)):
        t = torch.full((4,), s)
        x = model.diffusion.p_step(model.approximate(hist, mask, x, t, lam[:, i]), x, t, eps[:, i])
    assert torch.equal(model.infer(hist, mask, ev), x)


def test_diffurec_ddim_with_every_step_and_eta_1_is_the_ancestral_chain():
    ancestral = _model("diffurec", lambda_uncertainty=0.5, sample_steps=0).eval()
    ddim = _model("diffurec", lambda_uncertainty=0.5, sample_steps=8, eta=1.0).eval()
    ddim.load_state_dict(ancestral.state_dict())
    hist, mask, ev = _diffurec_inputs(ancestral)
    assert torch.allclose(ddim.infer(hist, mask, ev), ancestral.infer(hist, mask, ev), atol=1e-4)


def test_diffurec_ddim_visits_its_subsequence_with_one_lambda_draw_each():
    """S = 3 of T = 8: steps [7, 4, 0] (x0-prediction DDIM, eta 0); slice i of lambda is used
    at the i-th visited step and nowhere else; eps is unused at eta 0."""
    from recsys_dist.diffusion.samplers import ddim_step

    model = _model("diffurec", lambda_uncertainty=0.5, sample_steps=3, eta=0.0).eval()
    assert model.reverse_steps() == [7, 4, 0]
    hist, mask, ev = _diffurec_inputs(model)
    x, grid = ev["x_T"], [7, 4, 0]
    for i, s in enumerate(grid):
        x0 = model.approximate(hist, mask, x, torch.full((4,), s), ev["lam"][:, i])
        x = ddim_step(model.diffusion, x0, x, s, grid[i + 1] if i + 1 < 3 else -1, 0.0, ev["eps"][:, i])
    q = model.infer(hist, mask, ev)
    assert torch.equal(q, x)
    assert torch.equal(model.infer(hist, mask, dict(ev, eps=torch.randn_like(ev["eps"]))), q)
    for i in range(3):
        lam = ev["lam"].clone()
        lam[:, i] += 1.0
        assert not torch.allclose(model.infer(hist, mask, dict(ev, lam=lam)), q, atol=1e-4), i


@pytest.mark.parametrize("form", ["official", "paper"])
def test_diffurec_forms_train_on_a_tiny_problem(form):
    torch.manual_seed(0)
    n_items, B, steps = 30, 64, 40
    model = _model("diffurec", diffurec_form=form, dropout=0.1, emb_dropout=0.1)
    table = torch.nn.Embedding(n_items, D)
    opt = torch.optim.Adam([*model.parameters(), *table.parameters()], lr=1e-2)

    def loss_fn(model, hist, mask, target, labels, g):
        def ce(q):
            return torch.nn.functional.cross_entropy(q @ table.weight.t(), labels)
        return model(hist, mask, target, model.draw_noise(B, L, g), ce)

    losses = train_tiny_next_item(model, table, opt, loss_fn, steps, B, L)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (form, first, last)


def test_eval_seeds_reach_the_generative_queries() -> None:
    """Each test eval seed draws its own per-user noise, and a diffusion model's query uses it."""
    from recsys_dist.train.validate import eval_noise

    torch.manual_seed(0)
    model = DiffuRec(16, 1, 2, 0.0, 0.0, 8, "trunc_linear", 0.001).eval()
    hist, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    users = torch.tensor([4, 9, 11])
    q1 = model.infer(hist, mask, eval_noise(model, users, 5, 2024))
    q1b = model.infer(hist, mask, eval_noise(model, users, 5, 2024))
    q2 = model.infer(hist, mask, eval_noise(model, users, 5, 2025))
    assert torch.equal(q1, q1b)  # a seed is repeatable
    assert (q1 - q2).abs().max() > 0  # another seed moves the query (slightly: lambda = 0.001)
