"""AREAL / MCRL: shapes, padding never matters, empty histories, gradients, Table 3 ablation
switches, fusion weight, explicit noise, and a tiny overfit check. Tiny dims (d=16, L=10, T=10)."""

import pytest
import torch

from recsys_dist.models.areal import AREAL, MCRLEncoder

D, L, T = 16, 10, 10
ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]


def _model(use_cnn=True, use_lstm=True, local_weight=0.3, seed=0, **kw):
    args = dict(dim=D, max_len=L, num_blocks=2, dropout=0.0, emb_dropout=0.0, steps=T, schedule="sqrt",
                p_uncond=0.1, guidance=2.0, sample_steps=4, eta=0.0, use_cnn=use_cnn, use_lstm=use_lstm,
                local_weight=local_weight)
    args.update(kw)
    torch.manual_seed(seed)
    return AREAL(**args)


def _inputs(B=4, seed=0):
    """Left-padded histories of lengths 1, 4, 7, L (real items in the last columns)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 4, 7, L][:B]
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, L - n:] = True
    hist = torch.randn(B, L, D, generator=g) * 0.1 * mask[..., None]
    return hist, mask, torch.randn(B, D, generator=g) * 0.1


def _poison(hist, mask):
    return torch.where(mask[..., None], hist, torch.full_like(hist, 1e4))


@pytest.mark.parametrize("use_cnn,use_lstm", ABLATIONS)
def test_shapes_and_padding_never_matters(use_cnn, use_lstm):
    model = _model(use_cnn, use_lstm).eval()
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(1))
    loss = model(hist, mask, target, noise, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    poisoned = _poison(hist, mask)
    assert torch.allclose(model(poisoned, mask, target, noise, None), loss, atol=1e-6)
    ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(2))
    q = model.infer(hist, mask, ev)
    assert q.shape == (4, D) and torch.isfinite(q).all()
    assert torch.allclose(model.infer(poisoned, mask, ev), q, atol=1e-5)
    h = model.encoder(hist, mask)
    assert h.shape == (4, D)
    assert torch.allclose(model.encoder(poisoned, mask), h, atol=1e-6)


@pytest.mark.parametrize("use_cnn,use_lstm", ABLATIONS)
def test_encoder_equals_unpadded_history(use_cnn, use_lstm):
    """Padding is exact: h of a padded row == h of the same items with no padding at all."""
    enc = _model(use_cnn, use_lstm).encoder.eval()
    hist, mask, _ = _inputs()
    h = enc(_poison(hist, mask), mask)
    for i in range(3):  # the rows that have padding
        n = int(mask[i].sum())
        alone = enc(hist[i:i + 1, L - n:], torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(alone[0], h[i], atol=1e-5), i


@pytest.mark.parametrize("use_cnn,use_lstm", ABLATIONS)
def test_empty_history_is_finite(use_cnn, use_lstm):
    model = _model(use_cnn, use_lstm, dropout=0.1, emb_dropout=0.1)
    hist, mask, target = _inputs()
    mask[0] = False
    hist = hist * mask[..., None]
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(1))
    loss = model(hist, mask, target, noise, None)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(model.encoder(hist, torch.zeros_like(mask))).all()
    model.eval()
    q = model.infer(hist, mask, model.draw_eval_noise(4, L, torch.Generator().manual_seed(2)))
    assert torch.isfinite(q).all()


@pytest.mark.parametrize("use_cnn,use_lstm", ABLATIONS)
def test_every_parameter_gets_a_gradient(use_cnn, use_lstm):
    model = _model(use_cnn, use_lstm, dropout=0.1, emb_dropout=0.1)
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(0))
    noise["uncond"] = torch.tensor([True, False, False, True])
    model(hist, mask, target, noise, None).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not (p.grad != 0).any()]
    assert not missing, f"no gradient for {missing}"


def test_ablation_switches_change_the_parameter_set():
    names = {ab: {n for n, _ in _model(*ab).named_parameters()} for ab in ABLATIONS}
    has = lambda ab, part: any(f".{part}." in n for n in names[ab])  # noqa: E731
    assert has((True, True), "cnn") and has((True, True), "lstm") and has((True, True), "fusion")
    assert has((True, False), "cnn") and not has((True, False), "lstm") and not has((True, False), "fusion")
    assert has((False, True), "lstm") and not has((False, True), "cnn") and not has((False, True), "fusion")
    assert not any(n.startswith("encoder.blocks") for n in names[(False, False)])
    assert len({frozenset(v) for v in names.values()}) == 4
    with pytest.raises(ValueError):
        MCRLEncoder(D, 2, local_weight=1.5)


def test_local_weight_controls_the_fusion():
    hist, mask, _ = _inputs()
    enc0 = _model(local_weight=0.0).encoder.eval()  # same seed -> same parameters
    enc1 = _model(local_weight=1.0).encoder.eval()
    assert not torch.allclose(enc0(hist, mask), enc1(hist, mask), atol=1e-4)
    # w = 0: the local (CNN) branch is off exactly, so its parameters cannot matter; w = 1: the LSTM's
    for enc, off in ((enc0, "cnn"), (enc1, "lstm")):
        h = enc(hist, mask)
        with torch.no_grad():
            for block in enc.blocks:
                for p in getattr(block, off).parameters():
                    p.add_(torch.randn_like(p))
        assert torch.allclose(enc(hist, mask), h, atol=1e-6), off
    # an intermediate weight differs from both ends
    h3 = _model(local_weight=0.3).encoder.eval()(hist, mask)
    assert not torch.allclose(h3, _model(local_weight=0.0).encoder.eval()(hist, mask), atol=1e-4)


@pytest.mark.parametrize("sample_steps,eta", [(4, 0.0), (4, 0.5), (T, 1.0)])  # DDIM, DDIM, DDPM
def test_same_eval_noise_same_inference(sample_steps, eta):
    model = _model(sample_steps=sample_steps, eta=eta).eval()
    hist, mask, _ = _inputs()
    ev = model.draw_eval_noise(4, L, torch.Generator().manual_seed(5))
    assert ev["eps"].shape == (4, sample_steps, D)
    q = model.infer(hist, mask, ev)
    assert torch.equal(model.infer(hist, mask, ev), q)
    other = model.draw_eval_noise(4, L, torch.Generator().manual_seed(6))
    assert not torch.allclose(model.infer(hist, mask, other), q)
    model.w = 0.0  # guidance strength matters
    assert not torch.allclose(model.infer(hist, mask, ev), q)


def test_uses_no_scorer_and_uncond_uses_null():
    model = _model().eval()
    assert model.uses_scorer is False
    hist, mask, target = _inputs()
    noise = model.draw_noise(4, L, torch.Generator().manual_seed(1))
    noise["uncond"] = torch.ones(4, dtype=torch.bool)
    a = model(hist, mask, target, noise, None)
    b = model(torch.randn_like(hist) * mask[..., None], mask, target, noise, None)
    assert torch.allclose(a, b)  # all guidance dropped: the history cannot matter


def test_overfits_eight_pairs():
    g = torch.Generator().manual_seed(0)
    B = 8
    lengths = torch.tensor([1, 2, 3, 5, 6, 8, 9, 10])
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    hist = torch.randn(B, L, D, generator=g) * 0.1 * mask[..., None]
    target = torch.randn(B, D, generator=g) * 0.5
    model = _model(p_uncond=0.1, num_blocks=1)  # one block keeps the 150 steps cheap
    ng = torch.Generator().manual_seed(1)
    # fixed evaluation noise: every pair at every step, guidance on
    t_all = torch.arange(T).repeat_interleave(B)
    ev = {"t": t_all, "eps": torch.randn(T * B, D, generator=ng), "uncond": torch.zeros(T * B, dtype=torch.bool)}
    rep = lambda x: x.repeat(T, *([1] * (x.dim() - 1)))  # noqa: E731

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out = model(rep(hist), rep(mask), rep(target), ev, None).item()
        model.train()
        return out

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        model(hist, mask, target, model.draw_noise(B, L, ng), None).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
