"""The score of a query against an item row (recsys_dist/models/similarity.py).

- ``dot`` is the identity on both sides (the very tensor, no copy); ``cosine`` gives unit keys
  and queries of norm 1 / temperature, in float32, from every query method of SASRec and
  GRU4Rec; invalid settings raise naming the config key;
- the evaluator ranks a cosine model by cosine: on 2 real gloo ranks, a SASRec with
  ``similarity: cosine`` over a table whose row norms vary 100-fold gets exactly the HR / NDCG
  of a brute-force ranking by cosine over every item row, and not those of a ranking by the
  dot product with the raw rows (which the same data gives different metrics: checked).
(Training under cosine against a brute-force CE: tests/test_all_positions.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from model_checks import left_padded_batches, small_model_config
from recsys_dist.models import build_model
from recsys_dist.models.similarity import Similarity

ROWS, DIM, L, USERS, KS = 257, 16, 8, 24, (1, 5, 10, 50)


def test_dot_is_the_identity_and_cosine_is_unit_over_temperature():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, DIM, generator=g) * torch.logspace(-2, 2, 7)[:, None]
    dot = Similarity()
    assert dot.query(x) is x and dot.keys(x) is x
    cos = Similarity("cosine", 0.05)
    assert torch.allclose(cos.keys(x).norm(dim=-1), torch.ones(7), atol=1e-6, rtol=0)
    assert torch.allclose(cos.query(x).norm(dim=-1), torch.full((7,), 20.0), atol=0, rtol=1e-6)
    assert torch.allclose(cos.query(x) @ cos.keys(x).T,
                          F.cosine_similarity(x[:, None], x[None], dim=-1) / 0.05, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_every_query_of_a_cosine_model_has_norm_one_over_temperature(name):
    torch.manual_seed(0)
    model = build_model(small_model_config(name, dim=DIM, num_heads=2, dropout=0.0, emb_dropout=0.0,
                                           similarity="cosine", temperature=0.05), L).eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(L)[None] >= torch.tensor([0, 3, L - 1])[:, None]
    hist = torch.randn(3, L, DIM, generator=g) * 5 * mask[..., None]
    twenty = torch.full((3,), 20.0)
    for q in (model.infer(hist, mask, {}), model.query(hist, mask, None, {}), model.query_all(hist, mask, {})[:, -1]):
        assert q.dtype == torch.float32 and torch.allclose(q.norm(dim=-1), twenty, rtol=1e-5, atol=0)
    rows = torch.randn(9, DIM, generator=g).bfloat16()
    assert model.item_keys(rows).dtype == torch.float32


@pytest.mark.parametrize("kind,temperature,match", [("angle", 1.0, "model.similarity"),
                                                    ("cosine", 0.0, "model.temperature"),
                                                    ("cosine", -1.0, "model.temperature"),
                                                    ("dot", 0.05, "model.similarity=cosine")])
def test_invalid_settings_raise(kind, temperature, match):
    with pytest.raises(ValueError, match=match):
        Similarity(kind, temperature)
    with pytest.raises(ValueError, match=match):
        build_model(small_model_config("sasrec", similarity=kind, temperature=temperature), L)


def _brute_force(model, table: torch.Tensor, hist: torch.Tensor, target: torch.Tensor, cosine: bool) -> dict:
    """HR@K / NDCG@K by ranking every item row (padding excluded) in float64: no ties here."""
    mask = hist > 0
    q = model.infer(table[hist] * mask[..., None], mask, {}).double()
    rows = table[1:].double()
    scores = (F.normalize(q, dim=-1) @ F.normalize(rows, dim=-1).T) if cosine else q @ rows.T
    rank = (scores > scores.gather(1, (target - 1)[:, None])).sum(1)  # 0 = first
    out = {}
    for k in KS:
        out[f"HR@{k}"] = float((rank < k).double().mean())
        out[f"NDCG@{k}"] = float(((rank < k).double() / torch.log2(rank.double() + 2)).mean())
    return out


def _evaluate(score: dict):
    from recsys_dist.config import JobConfig
    from recsys_dist.distributed import init_distributed
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.train.validate import evaluate_model

    rank, world = init_distributed(torch.device("cpu"))
    cfg = JobConfig()
    cfg.model = small_model_config("sasrec", dim=DIM, num_heads=2, dropout=0.0, emb_dropout=0.0, **score)
    cfg.eval.ks = KS
    torch.manual_seed(0)
    model = build_model(cfg.model, L).eval()
    table = ShardedItemTable.create(ROWS, DIM, cfg.sparse, torch.device("cpu"), USERS, seed=3)
    with torch.no_grad():  # row norms 0.03-3: a dot product ranks long rows first, a cosine does not
        for row0, col0, shard in table.local_shards():
            shard.mul_(torch.logspace(-1.5, 0.5, ROWS)[row0:row0 + shard.shape[0], None] * 10)
    hist, target = left_padded_batches(5, 1, USERS, ROWS, L)[0]
    users = torch.arange(USERS)
    mine = users % world == rank
    batch = {"history": hist[mine], "target": target[mine], "user": users[mine], "seen": hist[mine]}
    got = evaluate_model(model, table, [batch], cfg.eval, L)
    full = table.full_table()
    return got, _brute_force(model, full, hist, target, cosine=True), _brute_force(model, full, hist, target, cosine=False)


@pytest.mark.parametrize("score", [{}, {"similarity": "cosine", "temperature": 0.05}], ids=["dot", "cosine"])
def test_the_evaluator_ranks_by_the_models_similarity(score):
    for got, by_cosine, by_dot in run_distributed(_evaluate, 2, score):
        want, other = (by_cosine, by_dot) if score else (by_dot, by_cosine)
        assert any(abs(want[k] - other[k]) > 0.02 for k in want), "the data must tell the two scores apart"
        for k, v in want.items():
            assert math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, got[k], v)
