"""DreamRec's official form (``model.dreamrec_form: official``, the refined DreamRec,
baiyimeng/DreamRec @ f77206d; file:line there): its classifier-free guidance, its layer widths,
padding, and that it trains. ``configs/zhihu_dreamrec.yaml`` is its recipe."""

import pytest
import torch

from recsys_dist.config import REPO_ROOT, load_config
from recsys_dist.models import model_config
from recsys_dist.models import build_model
from recsys_dist.models.dreamrec import DreamRec
from model_checks import assert_padding_is_ignored, dense_inputs, train_tiny_next_item

L, D = 12, 16
ZHIHU = REPO_ROOT / "configs" / "zhihu_dreamrec.yaml"


def _official(dim=D, max_len=L, num_blocks=2, num_heads=1, dropout=0.0, emb_dropout=0.0, steps=8,
              sample_steps=4, guidance=1.0, eta=0.0):
    return DreamRec(dim, max_len, num_blocks, num_heads, dropout, emb_dropout, steps, "linear", 0.1, guidance,
                    sample_steps, eta, form="official")


def _inputs(seed=0):
    return dense_inputs(L, D, seed)


def _stub_denoiser(model, cond_out, uncond_out, seen_t=None):
    """Replace f(x_t, t, c) by constants: ``cond_out`` unless c is the null vector."""
    def denoise(x_t, t, c):
        if seen_t is not None:
            seen_t.append(int(t[0]))
        is_null = (c == model.null.to(c.dtype)).all(-1, keepdim=True)
        return torch.where(is_null, uncond_out, cond_out)
    model.denoise = denoise


def test_zhihu_config_is_the_official_form_and_its_cfg_is_2_cond_minus_uncond():
    cfg = load_config(ZHIHU)
    m = cfg.model
    assert (m.name, m.dreamrec_form, m.dim, m.num_blocks, m.num_heads) == ("dreamrec", "official", 64, 2, 1)
    assert (m.diffusion_steps, m.schedule, m.p_uncond, m.sample_steps, m.eta) == (1000, "linear", 0.1, 20, 0.0)
    assert m.guidance_w == 1.0  # cfg_scale 2 (run_dreamrec.py:28) = 1 + w
    assert (cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas), cfg.train.grad_clip) == (1e-3, 0.0, (0.9, 0.999), 0.0)
    model = build_model(m, cfg.data.max_len).eval()
    assert isinstance(model, DreamRec) and model.form == "official"
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    assert torch.allclose(model.cfg(cond, uncond), 2 * cond - uncond, atol=1e-6)
    # through the whole sampler: with eta 0 the last DDIM step lands on the guided x0 itself
    seen_t = []
    _stub_denoiser(model, cond, uncond, seen_t)
    hist, mask = torch.randn(5, 10, 64), torch.ones(5, 10, dtype=torch.bool)
    x0 = model.infer(hist, mask, model.draw_eval_noise(5, 10, g))
    assert torch.allclose(x0, 2 * cond - uncond, atol=1e-5)
    # the official grid (dreamrec.py:130-136): 999, 949, ..., 49, each step twice (cond, uncond)
    assert seen_t[::2] == seen_t[1::2] == list(range(999, 0, -50))


def test_ours_keeps_the_one_plus_w_convention():
    """guidance_w 2 in this project's convention is 3 cond - 2 uncond (what the official cfg_scale 3 would be)."""
    model = build_model(model_config(name="dreamrec", dim=D, diffusion_steps=8, sample_steps=4, guidance_w=2.0), L)
    assert model.form == "ours"
    cond, uncond = torch.randn(3, D), torch.randn(3, D)
    assert torch.allclose(model.cfg(cond, uncond), 3 * cond - 2 * uncond, atol=1e-6)
    _stub_denoiser(model.eval(), cond, uncond)
    hist, mask, _ = _inputs()
    x0 = model.infer(hist[:3], mask[:3], model.draw_eval_noise(3, L, torch.Generator().manual_seed(0)))
    assert torch.allclose(x0, 3 * cond - 2 * uncond, atol=1e-5)


def test_official_parameter_shapes_match_the_official_widths():
    model = _official(dim=64, max_len=10, num_blocks=2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = {
        "null": (64,),  # none_emb Embedding(1, d) (dreamrec.py:65)
        "pos.weight": (10, 64),  # pos_emb Embedding(seq_size, d) (sasrec.py:85)
        # Predictor: Linear(3d, d) -> SiLU -> Linear(d, d), 192 -> 64 -> 64 (dreamrec.py:44-48)
        "denoiser.0.weight": (64, 192), "denoiser.0.bias": (64,),
        "denoiser.2.weight": (64, 64), "denoiser.2.bias": (64,),
        # TimestepEmbedder(d, d): Linear(d, d) -> SiLU -> Linear(d, d) (dreamrec.py:13-17, 49)
        "step_mlp.0.weight": (64, 64), "step_mlp.0.bias": (64,),
        "step_mlp.2.weight": (64, 64), "step_mlp.2.bias": (64,),
        "encoder.ln.weight": (64,), "encoder.ln.bias": (64,),  # last_layernorm (sasrec.py:104)
    }
    for b in range(2):  # num_blocks 2 (run_dreamrec.py:25)
        p = f"encoder.blocks.{b}."
        for ln in ("attn_norm", "ffn_norm"):  # sasrec.py:94, 98
            expected |= {p + ln + ".weight": (64,), p + ln + ".bias": (64,)}
        for lin in ("q", "k", "v", "out"):  # q/k/v/out_proj Linear(d, d) (sasrec.py:34-38)
            expected |= {p + lin + ".weight": (64, 64), p + lin + ".bias": (64,)}
        for lin in ("fc1", "fc2"):  # PointwiseFeedForward(d, d_ff = d) (sasrec.py:10-11, 100-102)
            expected |= {p + lin + ".weight": (64, 64), p + lin + ".bias": (64,)}
    assert shapes == expected
    # init (dreamrec.py:88-98): Linear xavier-normal, zero bias; embeddings (and the null) N(0, 1)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 4 + 2 * 6 and all(torch.count_nonzero(m.bias) == 0 for m in linear)
    w = model.denoiser[0].weight
    assert abs(w.std().item() - (2 / (192 + 64)) ** 0.5) < 0.01
    assert 0.9 < model.pos.weight.std().item() < 1.1 and 0.6 < model.null.std().item() < 1.4
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-8


def test_official_padding_never_changes_the_output():
    model = _official().eval()
    hist, mask, target = _inputs()
    assert_padding_is_ignored(model, hist, mask, target, None, D)
    # positions count from the oldest item (sasrec.py:109-112): more left padding changes nothing
    c = model.guidance(hist, mask)
    short = model.guidance(hist[:, -8:], mask[:, -8:])
    assert torch.allclose(short[:2], c[:2], atol=1e-5) and torch.allclose(short[3], c[3], atol=1e-5)
    # an empty history is the official len_seq 1 over the zero pad row: one zero item at position 0
    one = torch.ones(1, 1, dtype=torch.bool)
    assert torch.allclose(c[3], model.guidance(torch.zeros(1, 1, D), one)[0], atol=1e-5)
    assert not torch.allclose(c[3], c[0])


def test_official_gradients_reach_every_parameter():
    model = _official(dropout=0.1, emb_dropout=0.1)
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(0))
    noise["uncond"] = torch.tensor([True, False, False, False])
    model(hist, mask, target, noise, None).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_official_trains_on_a_tiny_problem():
    torch.manual_seed(0)
    n_items, B, steps = 30, 64, 60
    model = _official(dropout=0.1, emb_dropout=0.1, steps=100, sample_steps=5)
    table = torch.nn.Embedding(n_items, D)
    torch.nn.init.normal_(table.weight)  # N(0, 1) rows (dreamrec.py:94-95)
    # the official recipe: AdamW over every parameter, the table included (run_dreamrec.py:66-68)
    opt = torch.optim.AdamW([*model.parameters(), *table.parameters()], lr=1e-2, weight_decay=0.0)
    losses = train_tiny_next_item(
        model, table, opt, lambda m, hist, mask, target, labels, g: m(hist, mask, target, m.draw_noise(B, L, g), None),
        steps, B, L)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    model.eval()
    hist, mask, _ = _inputs()
    q = model.infer(hist, mask, model.draw_eval_noise(4, L, torch.Generator().manual_seed(3)))
    assert torch.isfinite(q).all()


def test_unknown_form_raises():
    with pytest.raises(ValueError, match="dreamrec_form"):
        DreamRec(D, L, 1, 1, 0.0, 0.0, 8, "linear", 0.1, 1.0, 4, 0.0, form="Official")
    with pytest.raises(ValueError, match="sample_steps"):
        _official(steps=8, sample_steps=9)
