"""DiffRec / L-DiffRec / T-DiffRec (recsys_dist/models/diffrec/) against the formulas of the
official code (YiyanXu/DiffRec @ d35a6c6; file:line in docs/diffrec.md) and, last, a
short run on the real ml-1m_clean data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_dist.diffusion.schedules import diffrec_betas
from recsys_dist.models.diffrec import (ClusterVAE, DiffRec, DiffRecConfig, LDiffRec, build_diffrec, infer_scores,
                                        interaction_matrix, kmeans, make_optimizer, temporal_weights, train_step)

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-1m" / "raw" / "diffrec" / "ml-1m_clean"


def official_betas(kind, steps, scale, lo, hi, beta_fixed, max_beta=0.999):
    """float64 re-derivation of gaussian_diffusion.py:41-51 + :301-307 (+ :30-31)."""
    start, end = scale * lo, scale * hi
    grid = np.linspace(start, end, steps, dtype=np.float64)
    if kind == "linear":
        betas = grid.copy()
    else:
        abar = 1 - grid
        betas = [1 - abar[0]] + [min(1 - abar[i] / abar[i - 1], max_beta) for i in range(1, steps)]
        betas = np.array(betas)
    if beta_fixed:
        betas[0] = 0.00001
    return betas


# ------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("kind", ["linear-var", "linear"])
@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("steps,scale,lo,hi", [(40, 0.005, 0.005, 0.01), (40, 0.005, 0.005, 0.02),
                                               (5, 0.5, 0.001, 0.01), (100, 0.1, 1e-4, 0.02)])
def test_schedule_matches_official_formula(kind, fixed, steps, scale, lo, hi):
    ours = diffrec_betas(steps, scale, lo, hi, kind=kind, beta_fixed=fixed)
    ref = official_betas(kind, steps, scale, lo, hi, fixed)
    assert ours.dtype == torch.float64 and ours.shape == (steps,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-18)


def test_linear_var_variance_is_linear_and_never_pure_noise():
    betas = diffrec_betas(40, 0.005, 0.005, 0.01, beta_fixed=False)
    one_minus_abar = 1 - torch.cumprod(1 - betas, 0)
    np.testing.assert_allclose(one_minus_abar.numpy(), np.linspace(2.5e-5, 5e-5, 40), rtol=1e-9)
    cfg = DiffRecConfig.ml1m_clean()
    m = DiffRec(cfg, 7)
    abar = m.diffusion.abar64
    # beta_fixed (DiffRec/): beta_1 = 1e-5, then the same ratios
    assert m.diffusion.betas64[0].item() == 1e-5
    assert abar[-1].item() > 0.9999  # x_T keeps almost all of x_0


# ------------------------------------------------------------------------------ forward process


def test_q_sample_moments():
    cfg = DiffRecConfig(steps=10, noise_scale=1.0, noise_min=0.05, noise_max=0.9)
    m = DiffRec(cfg, 6)
    x0 = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for ti in (0, 4, 9):
        t = torch.full((n,), ti, dtype=torch.long)
        eps = torch.randn(n, 6, generator=g)
        xt = m.diffusion.q_sample(x0.expand(n, 6), t, eps)
        abar = m.diffusion.abar64[ti].item()
        np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(abar) * x0[0].numpy(), atol=5 * math.sqrt(1 / n))
        np.testing.assert_allclose(xt.var(0).numpy(), np.full(6, 1 - abar), rtol=0.02)


# ----------------------------------------------------------------------------------- denoiser


def test_split_first_layer_equals_concatenated_linear():
    cfg = DiffRecConfig(dims=(16, 24), emb_size=5, steps=7)
    m = DiffRec(cfg, 11).eval()
    d = m.denoiser
    x = torch.rand(3, 11)
    t = torch.tensor([0, 3, 6])
    full = torch.nn.Linear(11 + 5, 24)
    with torch.no_grad():
        full.weight.copy_(torch.cat([d.in_proj.weight, d.core.time_proj.weight], dim=1))
        full.bias.copy_(d.core.in_bias)
    from recsys_dist.diffusion import timestep_embedding
    h = torch.tanh(full(torch.cat([x, d.core.emb_layer(timestep_embedding(t, 5))], dim=-1)))
    # official order of widths with dims [16, 24]: N+emb -> 24 -> 16 -> 24 -> N
    assert [l.out_features for l in d.core.hidden] == [16, 24]
    for layer in d.core.hidden:
        h = torch.tanh(layer(h))
    torch.testing.assert_close(d(x, t), d.out_proj(h))
    assert d.in_proj.in_features == 11 and d.out_proj.out_features == 11 and d.out_proj.bias is not None


# ---------------------------------------------------------------------------------- inference


def test_reverse_deterministic_without_noise_and_ends_at_x0_prediction():
    torch.manual_seed(0)
    cfg = DiffRecConfig(dims=(32,), steps=12, noise_scale=0.1, noise_min=0.01, noise_max=0.1, sampling_steps=0)
    m = DiffRec(cfg, 20).eval()
    x = (torch.rand(5, 20) < 0.3).float()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = m.infer(x, m.draw_eval_noise(5, g1))
    b = m.infer(x, m.draw_eval_noise(5, g2))
    assert torch.equal(a, b)
    # the chain, re-derived in float64 from the posterior formula (gaussian_diffusion.py:212-232)
    d = m.diffusion
    xt = x.double()
    for i in reversed(range(cfg.steps)):
        t = torch.full((5,), i, dtype=torch.long)
        x0h = m.denoiser(xt.float(), t).double()
        beta, ab, abp = d.betas64[i], d.abar64[i], d.abar_prev64[i]
        c1 = beta * abp.sqrt() / (1 - ab)
        c2 = (1 - abp) * (1 - beta).sqrt() / (1 - ab)
        xt = c1 * x0h + c2 * xt
        last_x0h = x0h
    torch.testing.assert_close(a.double(), xt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xt, last_x0h)  # t = 0: coefficients 1 and 0
    # T' > 0 uses the eval noise; sampling noise is drawn per step
    m.cfg.sampling_steps = 6
    c = m.infer(x, m.draw_eval_noise(5, torch.Generator().manual_seed(1)))
    e = m.infer(x, m.draw_eval_noise(5, torch.Generator().manual_seed(2)))
    assert not torch.equal(c, e)
    m.cfg.sampling_steps, m.cfg.sampling_noise = 0, True
    assert m.draw_eval_noise(5, g1)["step_noise"].shape == (12, 5, 20)


def test_toy_overfit_ranks_held_out_items_above_random():
    """8 users x 30 items in two taste groups (items 0-14, 15-29); each user holds out 3 of
    their group's items. The trained x_0 prediction ranks the held-out items above the other
    group's items (AUC ~ 1; random 0.5). x0 prediction only: with DiffRec's tiny noise an eps
    prediction gives x0_hat ~ x_t, i.e. no ranking of unseen items."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_u, n_i = 8, 30
    full = torch.zeros(n_u, n_i)
    full[:4, :15] = 1
    full[4:, 15:] = 1
    held = torch.zeros_like(full)
    for u in range(n_u):
        cand = torch.nonzero(full[u]).flatten()
        held[u, cand[torch.randperm(len(cand), generator=g)[:3]]] = 1
    train = full - held
    cfg = DiffRecConfig(dims=(64,), steps=10, noise_scale=0.01, noise_min=0.01, noise_max=0.1, lr=3e-3)
    m = DiffRec(cfg, n_i)
    opt = make_optimizer(m)
    losses = [train_step(m, opt, train, g) for _ in range(400)]
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    scores = infer_scores(m, train)
    aucs = []
    for u in range(n_u):
        pos = scores[u, held[u] > 0]
        neg = scores[u, full[u] == 0]
        aucs.append((pos[:, None] > neg[None, :]).float().mean().item())
    assert np.mean(aucs) > 0.9, aucs


# ------------------------------------------------------------------------------ loss & sampler


def test_loss_weights_follow_official_reweight():
    torch.manual_seed(0)
    cfg = DiffRecConfig(dims=(8,), steps=6, noise_scale=0.5, noise_min=0.01, noise_max=0.2)
    m = DiffRec(cfg, 9).eval()
    x0 = (torch.rand(6, 9) < 0.5).float()
    u = (torch.arange(6, dtype=torch.float64) + 0.5) / 6  # uniform phase: t = 0..5
    eps = torch.randn(6, 9)
    terms = m.loss_terms(x0, {"t_u": u, "eps": eps})
    assert terms["t"].tolist() == list(range(6))
    abar = m.diffusion.abar64
    snr = abar / (1 - abar)
    xt = m.diffusion.q_sample(x0, terms["t"], eps)
    mse = ((m.denoiser(xt, terms["t"]) - x0) ** 2).mean(1).double()
    w = torch.cat([torch.ones(1, dtype=torch.float64), snr[:-1] - snr[1:]])
    torch.testing.assert_close(terms["loss"].double(), w * mse, rtol=1e-5, atol=1e-6)
    # eps prediction: weight (1 - abar_t) / ((1 - abar_{t-1})^2 (1 - beta_t)); at t = 0 the x0 likelihood
    m2 = DiffRec(DiffRecConfig(dims=(8,), steps=6, noise_scale=0.5, noise_min=0.01, noise_max=0.2,
                               mean_type="eps"), 9).eval()
    terms = m2.loss_terms(x0, {"t_u": u, "eps": eps})
    d = m2.diffusion
    out = m2.denoiser(xt, terms["t"])
    mse = ((out - eps) ** 2).mean(1).double()
    x0h = (xt / abar[terms["t"]].sqrt()[:, None].float()
           - (1 / abar[terms["t"]] - 1).sqrt()[:, None].float() * out)
    lik = (((x0 - x0h) ** 2) / 2).mean(1).double()
    w = (1 - d.abar64) / ((1 - d.abar_prev64) ** 2 * (1 - d.betas64))
    w[0] = 1
    ref = torch.cat([lik[:1], mse[1:]]) * w
    torch.testing.assert_close(terms["loss"].double(), ref, rtol=1e-4, atol=1e-6)


def test_history_update_keeps_last_ten_in_batch_order():
    m = DiffRec(DiffRecConfig(dims=(4,), steps=3, noise_scale=0.5, noise_min=0.01, noise_max=0.2), 5)
    d = m.diffusion
    ref = {s: [] for s in range(3)}  # the official per-sample loop (gaussian_diffusion.py:158-171)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        t = torch.randint(0, 3, (7,), generator=g)
        loss = torch.rand(7, generator=g, dtype=torch.float64)
        d.update_history(t, loss)
        for s, l in zip(t.tolist(), loss.tolist()):
            ref[s] = (ref[s] + [l])[-10:]
    for s in range(3):
        assert d.Lt_count[s].item() == len(ref[s])
        np.testing.assert_allclose(d.Lt_history[s, :len(ref[s])].numpy(), ref[s])


def test_importance_sampler_distribution():
    steps = 8
    m = DiffRec(DiffRecConfig(dims=(4,), steps=steps, noise_scale=0.5, noise_min=0.01, noise_max=0.2), 5)
    d = m.diffusion
    # warm-up: a t with fewer than 10 losses -> uniform, pt = 1
    d.update_history(torch.arange(steps).repeat(9), torch.rand(9 * steps, dtype=torch.float64))
    assert d.timestep_probs() is None
    t, pt = d.sample_timesteps(torch.rand(1000, dtype=torch.float64))
    assert torch.equal(pt, torch.ones(1000, dtype=torch.float64))
    counts = torch.bincount(t, minlength=steps).double()
    assert (counts > 80).all()
    # full histories with known values
    g = torch.Generator().manual_seed(0)
    hist = torch.rand(steps, 10, generator=g, dtype=torch.float64) * torch.arange(1, steps + 1)[:, None]
    d.Lt_history.copy_(hist)
    d.Lt_count.fill_(10)
    lt = hist.pow(2).mean(1).sqrt()
    p = lt / lt.sum() * (1 - 0.001) + 0.001 / steps  # gaussian_diffusion.py:181-184
    torch.testing.assert_close(d.timestep_probs(), p)
    n = 400_000
    t, pt = d.sample_timesteps(torch.rand(n, generator=g, dtype=torch.float64))
    freq = torch.bincount(t, minlength=steps).double() / n
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / n)), (freq, p)
    torch.testing.assert_close(pt, p[t] * steps)  # :189
    # one training step with the reweighted sampler divides by pt
    x0 = (torch.rand(4, 5) < 0.5).float()
    u = torch.rand(4, generator=g, dtype=torch.float64)
    terms = m.loss_terms(x0, {"t_u": u, "eps": torch.randn(4, 5)})
    torch.testing.assert_close(terms["loss"].double(), terms["history"].double() / (p[terms["t"]] * steps),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------- T-DiffRec


def test_temporal_weights_formula():
    # users interleaved; each user's rows in order of appearance
    users = torch.tensor([2, 0, 2, 0, 2, 1, 0, 2])
    w = temporal_weights(users, 0.1, 1.0)
    for u in (0, 1, 2):
        rows = torch.nonzero(users == u).flatten()
        M = len(rows)
        exp = [0.1 + (m - 1) / (M - 1) * 0.9 if M > 1 else 0.1 for m in range(1, M + 1)]
        np.testing.assert_allclose(w[rows].numpy(), exp, rtol=1e-12)
        np.testing.assert_allclose(w[rows].numpy(), np.linspace(0.1, 1.0, M))  # T-DiffRec/data_utils.py:40
    pairs = torch.stack([users, torch.tensor([0, 1, 2, 3, 4, 0, 5, 6])], 1)
    x = interaction_matrix(pairs, 3, 7, w)
    assert x[2, 6].item() == pytest.approx(1.0) and x[2, 0].item() == pytest.approx(0.1)
    assert x[1, 0].item() == pytest.approx(0.1)
    assert interaction_matrix(pairs, 3, 7).sum().item() == 8


# ---------------------------------------------------------------------------------- L-DiffRec


def test_kmeans_deterministic_lloyd_fixed_point():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(50, 2, generator=g) for c in centres])
    for seed in range(4):
        a, ca = kmeans(x, 3, torch.Generator().manual_seed(seed))
        b, cb = kmeans(x, 3, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b) and torch.equal(ca, cb)
        # Lloyd's fixed point: nearest-centre labels, centres = their clusters' means
        assert torch.equal(a, torch.cdist(x, ca).argmin(1))
        for k in range(3):
            torch.testing.assert_close(ca[k], x[a == k].mean(0))
    # two well-separated blobs are recovered from any start
    x2 = x[:100]
    for seed in range(4):
        a, _ = kmeans(x2, 2, torch.Generator().manual_seed(seed))
        assert len(set(a[:50].tolist())) == 1 and len(set(a[50:].tolist())) == 1 and a[0] != a[50]


@pytest.mark.parametrize("shared", [True, False])
def test_cluster_vae_slices_and_decode_order(shared):
    n = 23
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 3, (n,), generator=g)
    ids[:3] = torch.tensor([0, 1, 2])
    vae = ClusterVAE(ids, (12, 7), shared_decoder=shared)
    allidx = torch.cat(vae.cluster_items)
    assert sorted(allidx.tolist()) == list(range(n))  # every item exactly once
    for c, idx in enumerate(vae.cluster_items):
        assert (ids[idx] == c).all()
    lat = vae.latent_dims  # proportional widths, the last cluster takes the rest (Autoencoder.py:75-82)
    sizes = [len(i) for i in vae.cluster_items]
    for c in range(2):
        assert lat[c] == [max(int(sizes[c] / n * w), 1) for w in (12, 7)]
    assert [sum(l[j] for l in lat) for j in range(2)] == [12, 7]
    assert vae.latent_size == 7
    vae.eval()
    x = (torch.rand(4, n, generator=g) < 0.4).float()
    x_out, z, mu, logvar, kl = vae.encode(x)
    assert torch.equal(x_out, x) and torch.equal(z, mu) and z.shape == (4, 7) and kl.dim() == 0
    assert (mu.abs() <= 1).all() and (logvar.abs() <= 1).all()  # tanh after the last encoder layer
    # decode returns the original item order: give every item's output unit the bias = its id
    with torch.no_grad():
        if shared:
            vae.decoder.weight.zero_()
            vae.decoder.bias.copy_(torch.arange(n, dtype=torch.float32))
        else:
            for idx, dec in zip(vae.cluster_items, vae.decoders):
                dec[-1].weight.zero_()
                dec[-1].bias.copy_(idx.float())
    out = vae.decode(torch.randn(4, 7))
    assert out.shape == (4, n)
    assert torch.equal(out, torch.arange(n, dtype=torch.float32).expand(4, n))


def test_ldiffrec_trains_and_scores_all_items():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_u, n_i = 16, 40
    emb = torch.cat([torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g) + 6])
    x = torch.zeros(n_u, n_i)
    x[:8, :20] = (torch.rand(8, 20, generator=g) < 0.5).float()
    x[8:, 20:] = (torch.rand(8, 20, generator=g) < 0.5).float()
    cfg = DiffRecConfig.ml1m_clean("l-diffrec", ae_dims=(10,), dims=(16,), ae_lr=3e-3, lr=3e-3)
    m = build_diffrec(cfg, n_i, item_emb=emb, kmeans_generator=torch.Generator().manual_seed(0))
    assert isinstance(m, LDiffRec) and not m.diffusion.cfg.betas_fixed
    assert sorted(len(i) for i in m.vae.cluster_items) == [20, 20]
    assert m.lamda_at(0) == 0.03 and m.lamda_at(499) == pytest.approx(max(0.03 / 500, 0.005))
    assert m.kl_weight_at(0) == 0 and m.kl_weight_at(30) == pytest.approx(0.15) and m.kl_weight_at(10**6) == 0.3
    opt = make_optimizer(m)
    assert [grp["lr"] for grp in opt.param_groups] == [3e-3, 3e-3]
    losses = [train_step(m, opt, x, g, epoch=s // 4, step=s) for s in range(450)]
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    s1 = infer_scores(m, x)
    s2 = infer_scores(m, x, torch.Generator().manual_seed(9))
    assert s1.shape == (n_u, n_i) and torch.equal(s1, s2)
    # users of group 0 score group-0 items above group-1 items
    assert s1[:8, :20].mean() > s1[:8, 20:].mean() and s1[8:, 20:].mean() > s1[8:, :20].mean()


# ----------------------------------------------------------------------------- real ml-1m_clean


def _recall_ndcg(scores, seen, target, k=20):
    s = scores.masked_fill(seen > 0, -float("inf"))
    top = s.topk(k, dim=1).indices
    hit = target.gather(1, top)
    n_t = target.sum(1)
    recall = (hit.sum(1) / n_t).mean().item()
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2)
    dcg = (hit * disc).sum(1)
    idcg = torch.stack([disc[: int(min(k, c))].sum() for c in n_t.tolist()])
    return recall, (dcg / idcg).mean().item()


@pytest.mark.skipif(not DATA.exists(), reason="ml-1m_clean (DiffRec format) not staged")
def test_ml1m_clean_two_epochs_beat_popularity():
    torch.manual_seed(1)
    tr, va, te = (np.load(DATA / f"{s}_list.npy", allow_pickle=False) for s in ("train", "valid", "test"))
    n_u, n_i = int(tr[:, 0].max()) + 1, int(tr[:, 1].max()) + 1
    X, V, T = (interaction_matrix(a, n_u, n_i) for a in (tr, va, te))
    cfg = DiffRecConfig.ml1m_clean()
    m = build_diffrec(cfg, n_i)
    opt = make_optimizer(m)
    g = torch.Generator().manual_seed(1)
    epoch_loss, step = [], 0
    for ep in range(2):
        perm = torch.randperm(n_u, generator=g)
        total = 0.0
        for i in range(0, n_u, cfg.batch_size):
            total += train_step(m, opt, X[perm[i:i + cfg.batch_size]], g, epoch=ep, step=step)
            step += 1
        epoch_loss.append(total)
    assert epoch_loss[1] < epoch_loss[0], epoch_loss
    assert bool((m.diffusion.Lt_count == 10).all())  # the importance sampler is on
    users = torch.randperm(n_u, generator=torch.Generator().manual_seed(0))[:500]
    x = X[users]
    scores = infer_scores(m, x, batch_size=500)  # one chain serves validation and test
    pop = X.sum(0, keepdim=True).expand(len(users), n_i)
    val = _recall_ndcg(scores, x, V[users])
    test = _recall_ndcg(scores, x + V[users], T[users])
    pop_val = _recall_ndcg(pop, x, V[users])
    pop_test = _recall_ndcg(pop, x + V[users], T[users])
    print(f"\nDiffRec ml-1m_clean 2 epochs, 500 users: loss {epoch_loss}; valid R@20 {val[0]:.4f} N@20 {val[1]:.4f}; "
          f"test R@20 {test[0]:.4f} N@20 {test[1]:.4f}; popularity valid R@20 {pop_val[0]:.4f}, "
          f"test R@20 {pop_test[0]:.4f} N@20 {pop_test[1]:.4f}")
    assert test[0] > pop_test[0] and val[0] > pop_val[0]
