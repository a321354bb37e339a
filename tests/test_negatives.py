"""Negative sampling with logQ correction (recsys_dist/train/negatives.py, sampled_softmax_ce)."""

import math

import numpy as np
import pytest
import torch

from distributed_harness import run_distributed
from recsys_dist.train.negatives import NegativeSampler
from model_checks import small_model_config

N = 5001  # rows incl. padding row 0


def _zipf_counts(alpha=1.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(N - 1, generator=g) + 1
    counts = torch.zeros(N, dtype=torch.int64)
    counts[1:] = (1e5 / ranks.double() ** alpha).long()
    return counts


def test_draws_follow_the_proposal_and_skip_padding():
    counts = _zipf_counts()
    s = NegativeSampler(N, counts, "popularity", alpha=0.75)
    ids, log_counts = s.draw(200_000, seed=0, step=3)
    assert ids.min() >= 1 and ids.max() < N
    q = torch.exp(s.log_q.double())
    assert q[0] == 0 and abs(q.sum().item() - 1) < 1e-6  # log_q is float32
    freq = torch.bincount(ids, minlength=N).double() / ids.numel()
    top = torch.argsort(q, descending=True)[:50]  # frequent enough to compare
    assert torch.allclose(freq[top], q[top], rtol=0.1), (freq[top][:5], q[top][:5])
    assert torch.allclose(log_counts, s.log_q[ids] + math.log(200_000))
    again, _ = s.draw(200_000, seed=0, step=3)
    other, _ = s.draw(200_000, seed=0, step=4)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


@pytest.mark.parametrize("kind", ["popularity", "uniform"])
def test_logq_corrected_sum_estimates_the_partition_function(kind):
    """sum_j exp(l_j - log(n q_j)) over the sampled set is an unbiased estimate of sum_j exp(l_j);
    without the correction the popularity-sampled sum is biased by far."""
    counts = _zipf_counts()
    s = NegativeSampler(N, counts, kind)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, generator=g, dtype=torch.float64) * 2 + 0.5 * torch.log1p(counts.double())
    exact = torch.logsumexp(logits[1:], 0).item()
    estimates, naive = [], []
    for step in range(20):
        ids, log_counts = s.draw(20_000, seed=0, step=step)  # uniform too: log(n / (N - 1))
        estimates.append(torch.logsumexp(logits[ids] - log_counts.double(), 0).item())
        naive.append(torch.logsumexp(logits[ids], 0).item() - math.log(20_000 / (N - 1)))
    assert abs(np.mean(estimates) - exact) < 0.02, (np.mean(estimates), exact)
    if kind == "popularity":
        assert abs(np.mean(naive) - exact) > 0.2, (np.mean(naive), exact)  # uncorrected: biased


# ---- every sampler mix: the per-sample corrected partition sum is unbiased -------------------------
#
# Small catalog (M rows), Zipf target counts with many zeros (items never a target: p_j = 0, still
# sampled), fixed logits correlated with popularity. Each draw k is one step: n sampled ids, a batch
# of B targets i.i.d. from p = counts / sum(counts), and the softmax of the batch's first sample
# (target t = batch[0]) as train_step / sampled_softmax_ce build it: exp(l_t) exactly, plus
# exp(l_c - log_count_c) over the candidates c != t (accidental hits removed). Its mean over K draws
# estimates Z = sum_j exp(l_j); log(mean) must be within TOL of the exact log Z. Standard errors of
# log(mean) here are 0.005-0.007, so TOL = 0.03 is > 4 of them. The shipped code before the fix was
# off by log(n / (M - 1)) = -2.05 for uniform (no correction at all) and by about +log 2 for the
# mixes (sampled and in-batch negatives each estimating Z on their own).

M = 500
TOL = 0.03


def _small_catalog():
    g = torch.Generator().manual_seed(0)
    ranks = torch.randperm(M - 1, generator=g) + 1
    counts = torch.zeros(M, dtype=torch.int64)
    counts[1:] = (500.0 / ranks.double() ** 1.2).long()  # 322 of the 499 items have count 0
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(M, generator=g, dtype=torch.float64) * 1.5 + 0.7 * torch.log1p(counts.double())
    return counts, logits


def _mean_log_z(sampler, logits, counts, n, B, K, in_batch, m=None):
    """log of the mean over K steps of the first sample's corrected partition sum (see above)."""
    p = counts.double() / counts.sum()
    batches = torch.multinomial(p.expand(K, M), B, replacement=True,
                                generator=torch.Generator().manual_seed(7))
    log_z = torch.empty(K, dtype=torch.float64)
    for k in range(K):
        ids, log_counts = sampler.candidates(n, 0, k, batches[k] if in_batch else None)
        if m is not None:
            log_counts = sampler.mixture_log_count(ids, n, m)
        t = batches[k, 0]
        l = (logits[ids] - log_counts.double()).masked_fill(ids == t, float("-inf"))
        log_z[k] = torch.logaddexp(torch.logsumexp(l, 0), logits[t])
    return (torch.logsumexp(log_z, 0) - math.log(K)).item()


@pytest.mark.parametrize("kind,in_batch", [("uniform", False), ("popularity", False),
                                           ("uniform", True), ("popularity", True)])
def test_every_sampler_mix_estimates_log_z(kind, in_batch):
    counts, logits = _small_catalog()
    exact = torch.logsumexp(logits[1:], 0).item()
    s = NegativeSampler(M, counts, kind)
    est = _mean_log_z(s, logits, counts, n=64, B=32, K=2000, in_batch=in_batch)
    assert abs(est - exact) < TOL, (kind, in_batch, est, exact)


def test_mixture_counts_the_other_b_minus_1_targets():
    """A sample's own target is one of the B in-batch ids but is removed as an accidental hit, so the
    random in-batch draws of its softmax are the other B - 1: log(n q_j + (B - 1) p_j) is unbiased,
    log(n q_j + B p_j) is biased low (clearly at small n and B; here ~ -0.11)."""
    counts, logits = _small_catalog()
    exact = torch.logsumexp(logits[1:], 0).item()
    s = NegativeSampler(M, counts, "uniform")
    shipped = _mean_log_z(s, logits, counts, n=4, B=4, K=8000, in_batch=True)
    with_b = _mean_log_z(s, logits, counts, n=4, B=4, K=8000, in_batch=True, m=4)
    assert abs(shipped - exact) < TOL, (shipped, exact)  # standard error ~ 0.009
    assert with_b < exact - 0.07, (with_b, exact)


def test_mixture_log_counts():
    counts = _zipf_counts()
    s = NegativeSampler(N, counts, "popularity")
    batch = torch.tensor([1, 2, 3, 4, 2])
    ids, log_counts = s.candidates(16, 0, 0, batch)
    assert torch.equal(ids[16:], batch) and ids.shape == log_counts.shape == (21,)
    q = (counts.double() + 1) ** 0.75
    q[0] = 0
    q /= q.sum()
    expect = torch.log(16 * q[ids] + 4 * counts[ids].double() / counts.sum())
    assert torch.allclose(log_counts.double(), expect, atol=1e-5)
    ids_u, log_counts_u = NegativeSampler(N, kind="uniform").candidates(16, 0, 0)
    assert torch.allclose(log_counts_u, torch.full((16,), math.log(16 / (N - 1))))
    with pytest.raises(ValueError, match="target counts"):
        NegativeSampler(N, kind="uniform").candidates(16, 0, 0, batch)


def test_uniform_sampled_loss_is_close_to_full_ce():
    """Untrained-model scale (N = 3,417 rows, n = 1,024, full CE ~ 8.75): with the log(n / (N - 1))
    correction the sampled loss is within 0.15 of the full CE; uncorrected it is ~1.2 (log of the
    sampling rate) below."""
    from recsys_dist.train.losses import sampled_softmax_ce

    rows, n, b, d = 3417, 1024, 64, 32
    g = torch.Generator().manual_seed(3)
    table = torch.randn(rows, d, generator=g, dtype=torch.float64) * 0.45
    queries = torch.randn(b, d, generator=g, dtype=torch.float64) * 0.45
    targets = torch.randint(1, rows, (b,), generator=g)
    target_logits = (queries * table[targets]).sum(-1)
    full = (torch.logsumexp(queries @ table[1:].t(), 1) - target_logits).mean().item()
    s = NegativeSampler(rows, kind="uniform")
    corrected, uncorrected = [], []
    for step in range(8):
        ids, log_counts = s.candidates(n, 0, step)
        corrected.append(sampled_softmax_ce(queries, target_logits, targets, table[ids], ids,
                                            log_counts.double()).item())
        uncorrected.append(sampled_softmax_ce(queries, target_logits, targets, table[ids], ids).item())
    corrected, uncorrected = np.mean(corrected), np.mean(uncorrected)
    assert abs(corrected - full) < 0.15, (corrected, full)
    assert full - uncorrected > 1.0, (uncorrected, full)


def _sampled_run(steps, in_batch=True, kind="popularity"):
    from recsys_dist.config import JobConfig
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import init_distributed, seed_everything
    from recsys_dist.train.engine import build_engine
    from recsys_dist.train.catalog_loss import SampledSoftmax
    from recsys_dist.train.step import train_step

    rank, world = init_distributed(torch.device("cpu"))
    cfg = JobConfig()
    cfg.model = small_model_config("sasrec", dim=16, num_heads=2, num_blocks=1, dropout=0.0, emb_dropout=0.0)
    cfg.train.batch_size = 8 // world
    seed_everything(0)
    model = build_model(cfg.model, 6)  # before the table: sharding draws from the global RNG
    table = ShardedItemTable.create(N, 16, cfg.sparse, torch.device("cpu"), cfg.train.batch_size, seed=2)
    engine = build_engine(model, cfg.train, torch.device("cpu"))
    sampler = NegativeSampler(N, _zipf_counts(), kind)
    g = torch.Generator().manual_seed(5)
    b, losses = cfg.train.batch_size, []
    for step in range(steps):
        hist = torch.randint(1, N, (8, 6), generator=g)
        target = torch.randint(1, N, (8,), generator=g)
        losses.append(train_step(engine, table, hist[rank * b:(rank + 1) * b], target[rank * b:(rank + 1) * b],
                                 step, 0, SampledSoftmax(sampler, 256, 0, in_batch_negatives=in_batch)).item())
    return {"losses": torch.tensor(losses), "table": table.full_table()}


@pytest.mark.slow
def test_sampled_softmax_two_ranks_match_one():
    """Negatives and in-batch ids are global, so 2 ranks reproduce 1 rank (float-sum order only)."""
    one = run_distributed(_sampled_run, 1, 5)[0]
    two = run_distributed(_sampled_run, 2, 5)[0]
    assert np.allclose(one["losses"], two["losses"], atol=1e-5), (one["losses"], two["losses"])
    assert np.allclose(one["table"], two["table"], atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
