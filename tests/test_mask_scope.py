"""``eval.mask_scope``: what ``eval.mask_history`` removes from a user's candidates.

- ``seen`` (default): the whole seen set before the target, the batch's ``seen`` column;
- ``input``: only the model's input window, the batch's ``history`` (HSTU's repo, ``eval.py``).

On 2 real gloo ranks, a SASRec and the popularity ranker are evaluated on users whose seen set
holds, before their input window, the 40 items the model scores highest. Under each scope the
evaluator's HR / NDCG must equal a brute-force float64 ranking with exactly that scope's ids
removed, the target never. The two scopes must also give different metrics from each other
and from no masking, so the test fails if a scope masks the wrong set.
"""

from __future__ import annotations

import math

import pytest
import torch

from distributed_harness import run_distributed
from model_checks import left_padded_batches, small_model_config
from recsys_dist.models import build_model

ROWS, DIM, L, USERS, KS, EARLIER = 257, 16, 8, 24, (1, 5, 10, 50), 40


def _brute_force(scores: torch.Tensor, target: torch.Tensor, masked: list[set[int]]) -> dict:
    """HR@K / NDCG@K from (users, ROWS) float64 scores; row 0 and each user's masked ids (never
    the target) are not candidates. No ties in these scores."""
    out = {f"{m}@{k}": 0.0 for k in KS for m in ("HR", "NDCG")}
    for u in range(scores.shape[0]):
        t = int(target[u])
        rank = sum(1 for j in range(1, ROWS) if j != t and j not in masked[u] and scores[u, j] > scores[u, t])
        for k in KS:
            out[f"HR@{k}"] += (rank < k) / scores.shape[0]
            out[f"NDCG@{k}"] += (rank < k) / math.log2(rank + 2) / scores.shape[0]
    return out


def _evaluate(scope: str, mask: bool):
    from recsys_dist.config import JobConfig
    from recsys_dist.distributed import init_distributed
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.train.validate import evaluate_model, evaluate_popularity

    rank, world = init_distributed(torch.device("cpu"))
    cfg = JobConfig()
    cfg.model = small_model_config("sasrec", dim=DIM, num_heads=2, dropout=0.0, emb_dropout=0.0)
    cfg.eval.ks, cfg.eval.mask_history, cfg.eval.mask_scope = KS, mask, scope
    torch.manual_seed(0)
    model = build_model(cfg.model, L).eval()
    table = ShardedItemTable.create(ROWS, DIM, cfg.sparse, torch.device("cpu"), USERS, seed=3)
    full = table.full_table().double()
    hist, target = left_padded_batches(7, 1, USERS, ROWS, L)[0]
    with torch.no_grad():
        q = model.infer(table.full_table()[hist] * (hist > 0)[..., None], hist > 0, {}).double()
    scores = q @ full.T
    # each user's seen set: the 40 items the model ranks highest (not the target, not in the
    # window), then the input window; left-padded with 0 like the shards' seen column
    earlier = []
    for u in range(USERS):
        s = scores[u].clone()
        s[0] = s[int(target[u])] = -math.inf
        s[hist[u]] = -math.inf
        earlier.append(s.topk(EARLIER).indices)
    seen = torch.cat([torch.stack(earlier), hist], dim=1)
    counts = torch.randperm(ROWS, generator=torch.Generator().manual_seed(5)).double()  # no ties
    users = torch.arange(USERS)
    mine = users % world == rank
    batch = {"history": hist[mine], "target": target[mine], "user": users[mine], "seen": seen[mine]}
    got = evaluate_model(model, table, [batch], cfg.eval, L)
    got_pop = evaluate_popularity(counts, ROWS, [batch], cfg.eval, rank, world)

    def masked(u: int) -> set[int]:
        if not mask:
            return set()
        return set((seen[u] if scope == "seen" else hist[u]).tolist()) - {0, int(target[u])}

    sets = [masked(u) for u in range(USERS)]
    return (got, _brute_force(scores, target, sets),
            got_pop, _brute_force(counts[None].expand(USERS, -1), target, sets))


def _check(got: dict, want: dict) -> None:
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, got[k], v)


CASES = {"none": ("seen", False), "input": ("input", True), "seen": ("seen", True)}


@pytest.fixture(scope="module")
def results():
    return {name: run_distributed(_evaluate, 2, *args)[0] for name, args in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_each_scope_removes_exactly_its_ids(results, name):
    got, want, got_pop, want_pop = results[name]
    _check(got, want)
    _check(got_pop, want_pop)


def test_the_scopes_rank_differently(results):
    for i in (0, 2):  # the model, the popularity ranker
        none, window, seen = (results[name][i] for name in ("none", "input", "seen"))
        assert none != window != seen != none, (none, window, seen)
        assert all(none[k] <= window[k] <= seen[k] for k in none), (none, window, seen)  # fewer candidates


def test_an_unknown_scope_is_refused():
    from recsys_dist.train.validate import _masked

    with pytest.raises(ValueError, match="eval.mask_scope 'window'"):
        _masked({"history": torch.zeros(1, 2, dtype=torch.long)}, "window")
