"""Popularity-aware negative sampling with logQ correction (recsys_dist/train/negatives.py)."""

import math

import numpy as np
import pytest
import torch

from distributed_harness import run_distributed
from recsys_dist.train.negatives import NegativeSampler

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
        ids, log_counts = s.draw(20_000, seed=0, step=step)
        if log_counts is None:
            log_counts = torch.full((ids.numel(),), math.log(20_000 / (N - 1)))
        estimates.append(torch.logsumexp(logits[ids] - log_counts.double(), 0).item())
        naive.append(torch.logsumexp(logits[ids], 0).item() - math.log(20_000 / (N - 1)))
    assert abs(np.mean(estimates) - exact) < 0.02, (np.mean(estimates), exact)
    if kind == "popularity":
        assert abs(np.mean(naive) - exact) > 0.2, (np.mean(naive), exact)  # uncorrected: biased


def test_in_batch_log_counts():
    counts = _zipf_counts()
    s = NegativeSampler(N, counts, "popularity")
    ids = torch.tensor([1, 2, 3, 4])
    expect = torch.log(counts[ids].double() / counts.sum()) + math.log(4)
    assert torch.allclose(s.in_batch_log_count(ids).double(), expect, atol=1e-5)


def _sampled_run(steps, in_batch=True, kind="popularity"):
    from recsys_dist.config import JobConfig
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.train.distributed import init_distributed, seed_everything
    from recsys_dist.train.engine import build_engine
    from recsys_dist.train.step import train_step

    rank, world = init_distributed(torch.device("cpu"))
    cfg = JobConfig()
    cfg.model.name, cfg.model.dim, cfg.model.num_heads, cfg.model.num_blocks = "sasrec", 16, 2, 1
    cfg.model.dropout = cfg.model.emb_dropout = 0.0
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
                                 step, 0, "sampled_softmax", 256, sampler, in_batch_negatives=in_batch).item())
    return {"losses": torch.tensor(losses), "table": table.full_table()}


@pytest.mark.slow
def test_sampled_softmax_two_ranks_match_one():
    """Negatives and in-batch ids are global, so 2 ranks reproduce 1 rank (float-sum order only)."""
    one = run_distributed(_sampled_run, 1, 5)[0]
    two = run_distributed(_sampled_run, 2, 5)[0]
    assert np.allclose(one["losses"], two["losses"], atol=1e-5), (one["losses"], two["losses"])
    assert np.allclose(one["table"], two["table"], atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
