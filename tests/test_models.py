"""Dense models: shapes, padding never influences the output, noise is explicit, gradients
reach every parameter."""

import pytest
import torch

from recsys_dist.config import ModelConfig
from recsys_dist.models import MODELS, build_model

L, D = 12, 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(4, L, D, generator=g)
    mask = torch.zeros(4, L, dtype=torch.bool)
    mask[0, -1:] = True
    mask[1, -5:] = True
    mask[2] = True  # row 3: empty history (first interaction of a Zhihu session)
    return hist * mask[..., None], mask, torch.randn(4, D, generator=g)


def _model(name, **kw):
    cfg = dict(name=name, dim=D, num_heads=2, dropout=0.0, emb_dropout=0.0, diffusion_steps=8, sample_steps=4)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg), L)


def _scorer(q):
    return q.square().mean()  # any function of the queries stands in for the catalog CE


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_padding_is_ignored(name):
    model = _model(name)
    model.eval()
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(1))
    loss = model(hist, mask, target, noise, _scorer)
    assert loss.dim() == 0 and torch.isfinite(loss)
    poisoned = hist + (~mask)[..., None] * 100.0  # garbage in padded positions changes nothing
    assert torch.allclose(model(poisoned, mask, target, noise, _scorer), loss, atol=1e-5)
    ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(2))
    q = model.infer(hist, mask, ev)
    assert q.shape == (4, D) and torch.isfinite(q).all()
    assert torch.allclose(model.infer(poisoned, mask, ev), q, atol=1e-5)
    assert torch.equal(model.infer(hist, mask, ev), q)  # same noise -> same inference


@pytest.mark.parametrize("name", sorted(MODELS))
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
