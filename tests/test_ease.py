"""EASE (recsys_dist.models.ease) and the DiffRec-split baseline benchmark's evaluation path.

* ``fit_ease`` equals Steck's closed form computed independently in float64 numpy, and the
  per-column ridge regressions the constrained objective separates into (solved directly with
  ``np.linalg.solve``: column j of B regresses x_j on the other items' columns with penalty
  lambda); diag(B) = 0, padding row/column 0 zero and column 0 of X ignored.
* lambda -> infinity: ``lambda * B -> X^T X - diag(X^T X)`` (item-item co-occurrence, zero
  diagonal), with an error O(1/lambda) (checked: it shrinks ~10x per 10x lambda).
* scores through ``rank_target_sets`` (world size 1, queries = X rows, item block = B.T) give
  the same Recall@K / NDCG@K as a brute-force sort of X @ B with the masked items removed,
  under the deterministic tie rules; the benchmark's ``run_split`` on a tiny synthetic DiffRec
  style split picks the brute-force best lambda and reports brute-force test metrics in both
  conventions (users without targets skipped / counted as zeros).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_dist.eval import MultiMetricAccumulator, popularity_block, rank_target_sets
from recsys_dist.models.ease import ease_from_gram, ease_scores, fit_ease, popularity_scores

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _random_x(u: int, n: int, p: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(u, n, generator=gen) < p).double()
    x[:, 0] = 0
    return x


def _numpy_ease(x: np.ndarray, lam: float) -> np.ndarray:
    xi = x[:, 1:]
    p = np.linalg.inv(xi.T @ xi + lam * np.eye(xi.shape[1]))
    b = np.eye(xi.shape[1]) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    out = np.zeros((x.shape[1], x.shape[1]))
    out[1:, 1:] = b
    return out


def _ridge_ease(x: np.ndarray, lam: float) -> np.ndarray:
    n = x.shape[1]
    out = np.zeros((n, n))
    for j in range(1, n):
        others = [i for i in range(1, n) if i != j]
        xo = x[:, others]
        out[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(len(others)), xo.T @ x[:, j])
    return out


@pytest.mark.parametrize("lam", [0.5, 3.7, 250.0])
def test_fit_ease_closed_form_and_ridge(lam: float) -> None:
    x = _random_x(40, 16, 0.3, seed=int(lam * 10))
    b = fit_ease(x, lam)
    assert b.dtype == torch.float64 and b.shape == (16, 16)
    assert torch.all(b.diagonal() == 0)
    assert torch.all(b[0] == 0) and torch.all(b[:, 0] == 0)
    np.testing.assert_allclose(b.numpy(), _numpy_ease(x.numpy(), lam), rtol=1e-10, atol=1e-12)
    ridge = _ridge_ease(x.numpy(), lam)
    np.testing.assert_allclose(b.numpy(), ridge, rtol=1e-9, atol=1e-12)
    # scores of a tiny case against the direct solve
    np.testing.assert_allclose(ease_scores(x[:5], b).numpy(), x[:5].numpy() @ ridge,
                               rtol=1e-9, atol=1e-12)
    # from a precomputed Gram matrix: the same numbers
    assert torch.equal(ease_from_gram(x.T @ x, lam), b)


def test_fit_ease_padding_dtype_and_errors() -> None:
    x = _random_x(30, 12, 0.4, seed=1)
    garbage = x.clone()
    garbage[:, 0] = torch.arange(30, dtype=torch.float64)  # column 0 (padding) is ignored
    b = fit_ease(x, 10.0)
    torch.testing.assert_close(fit_ease(garbage, 10.0), b, rtol=0, atol=1e-12)
    b32 = fit_ease(x.float(), 10.0, dtype=torch.float32)
    assert b32.dtype == torch.float32
    torch.testing.assert_close(b32.double(), b, rtol=1e-4, atol=1e-5)
    assert fit_ease(x.bool().float(), 10.0).dtype == torch.float64
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            fit_ease(x, bad)
    with pytest.raises(ValueError):
        fit_ease(x[0], 1.0)
    with pytest.raises(ValueError):
        fit_ease(x, 1.0, dtype=torch.int64)
    # an item nobody interacted with gets an all-zero column and row
    x[:, 5] = 0
    b = fit_ease(x, 10.0)
    assert torch.all(b[:, 5] == 0) and torch.all(b[5] == 0)


def test_large_lambda_tends_to_cooccurrence() -> None:
    """lambda B = G - diag(G) + O(1/lambda), G = X^T X: P = (G + lam I)^-1 =
    (I - G/lam + O(lam^-2)) / lam, so -P_ij / P_jj = G_ij / lam + O(lam^-2) for i != j."""
    x = _random_x(40, 14, 0.3, seed=7)
    g = (x.T @ x).numpy()
    target = g - np.diag(np.diag(g))
    target[0] = 0
    target[:, 0] = 0
    errs = []
    for lam in (1e4, 1e5, 1e6):
        errs.append(np.abs(lam * fit_ease(x, lam).numpy() - target).max())
    assert errs[-1] < 1e-3 * np.abs(target).max()
    assert errs[1] < 0.2 * errs[0] and errs[2] < 0.2 * errs[1]


def test_popularity_scores() -> None:
    x = _random_x(20, 9, 0.5, seed=3)
    x[:, 0] = 1  # padding column: its count is reported as 0
    c = popularity_scores(x)
    assert c[0] == 0 and torch.equal(c[1:], x[:, 1:].sum(0))
    assert popularity_scores(x.long()).dtype == torch.float64


# ------------------------------------------------------------------------------------------
# evaluation against brute force
# ------------------------------------------------------------------------------------------


def _brute(scores: np.ndarray, targets: list[list[int]], masked: list[list[int]], ks,
           rule: str, all_users: bool = False) -> dict[str, float]:
    """DiffRec's computeTopNAccuracy on an explicit sort. ``rule``: optimistic = targets win
    ties, pessimistic = they lose them. ``all_users``: divide by every user (DiffRec)."""
    n = scores.shape[1]
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("Recall", "NDCG")}
    users = 0
    for u, tgt in enumerate(targets):
        tset = set(tgt)
        if not tset:
            users += all_users
            continue
        users += 1
        mset = set(masked[u]) - tset
        cand = [j for j in range(1, n) if j not in mset]
        sign = 0 if rule == "optimistic" else 1
        order = sorted(cand, key=lambda j: (-scores[u, j], (j not in tset) != bool(sign)))
        for k in ks:
            top = order[:k]
            hits = [r for r, j in enumerate(top) if j in tset]
            sums[f"Recall@{k}"] += len(hits) / len(tset)
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(tset), k)))
            sums[f"NDCG@{k}"] += sum(1 / math.log2(r + 2) for r in hits) / idcg
    return {name: v / users for name, v in sums.items()}


def _pad(lists: list[list[int]]) -> torch.Tensor:
    w = max(1, max(len(a) for a in lists))
    return torch.tensor([a + [0] * (w - len(a)) for a in lists], dtype=torch.long)


def _split_case(u: int, n: int, seed: int):
    """Disjoint train / valid / test item lists per user (ids 1..n-1), some users without
    valid or test items."""
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for user in range(u):
        perm = rng.permutation(np.arange(1, n))
        if user == 0:  # the largest id occurs (the benchmark sizes the catalog from the data)
            perm = np.concatenate([[n - 1], perm[perm != n - 1]])
        a, b, c = rng.integers(3, 8), rng.integers(0, 4), rng.integers(0, 4)
        if user == 1:
            b = 0
        if user == 2:
            c = 0
        tr.append(sorted(perm[:a].tolist()))
        va.append(perm[a:a + b].tolist())
        te.append(perm[a + b:a + b + c].tolist())
    return tr, va, te


@pytest.mark.parametrize("rule", ["optimistic", "pessimistic"])
def test_rank_target_sets_matches_brute_force(rule: str) -> None:
    u, n, ks = 30, 25, (1, 3, 5, 10)
    tr, va, te = _split_case(u, n, seed=11)
    x = torch.zeros(u, n, dtype=torch.float64)
    for user, items in enumerate(tr):
        x[user, items] = 1
    masked_test = [a + b for a, b in zip(tr, va)]
    b = fit_ease(x, 2.0)
    s = ease_scores(x, b).numpy()
    pop = popularity_scores(x)
    for name, q, rows, scores in (
        ("ease", x, b.T, s),
        ("popularity", torch.ones(u, 1, dtype=torch.float64), popularity_block(pop, 0, n, torch.float64),
         np.broadcast_to(pop.numpy()[None, :], (u, n))),
    ):
        for tgt, msk in ((va, tr), (te, masked_test)):
            acc = MultiMetricAccumulator(ks=ks, ties=rule)
            for u0 in (0, 7, 19):  # uneven batches
                u1 = {0: 7, 7: 19, 19: u}[u0]
                acc.update(rank_target_sets(q[u0:u1], _pad(tgt[u0:u1]), rows, 0, n,
                                            masked_ids=_pad(msk[u0:u1]), ks=(1,), ties=rule))
            got = acc.compute()
            want = _brute(scores, tgt, msk, ks, rule)
            skipped = sum(1 for t in tgt if not t)
            assert got["num_skipped_users"] == skipped >= 1, name
            for key, v in want.items():
                assert got[key] == pytest.approx(v, rel=1e-12, abs=1e-15), (name, key)


def test_benchmark_run_split_on_tiny_split(tmp_path: Path) -> None:
    import diffrec_baselines as db

    u, n = 24, 21
    tr, va, te = _split_case(u, n, seed=5)
    split = tmp_path / "ml-1m_tiny"
    split.mkdir()
    for name, lists in (("train", tr), ("valid", va), ("test", te)):
        pairs = [[user, item - 1] for user, items in enumerate(lists) for item in items]  # 0-based
        np.save(split / f"{name}_list.npy", np.array(pairs, dtype=np.int64))
    lams, ks = (0.5, 5.0, 50.0), (1, 5, 10)
    res = db.run_split(split, lams, ks, ties="pessimistic", log=lambda *_: None)

    x = torch.zeros(u, n, dtype=torch.float64)
    for user, items in enumerate(tr):
        x[user, items] = 1
    masked_test = [a + b for a, b in zip(tr, va)]
    valid_r20 = [_brute(ease_scores(x, fit_ease(x, lam)).numpy(), va, tr, (20,), "pessimistic")
                 ["Recall@20"] for lam in lams]
    assert [v for _, v in res["ease"]["sweep"]] == pytest.approx(valid_r20, rel=1e-12)
    best = lams[int(np.argmax(valid_r20))]
    assert res["ease"]["lambda"] == best
    s = ease_scores(x, fit_ease(x, best)).numpy()
    for all_users, prefix in ((False, ""), (True, "all_users:")):
        want = _brute(s, te, masked_test, ks, "pessimistic", all_users=all_users)
        for key, v in want.items():
            assert res["ease"]["test"][prefix + key] == pytest.approx(v, rel=1e-12, abs=1e-15)
    pop = np.broadcast_to(popularity_scores(x).numpy()[None, :], (u, n))
    want = _brute(pop, te, masked_test, ks, "pessimistic", all_users=True)
    for key, v in want.items():
        assert res["popularity"]["test"]["all_users:" + key] == pytest.approx(v, rel=1e-12, abs=1e-15)
    table = db.markdown([res], ks, "pessimistic")
    assert "| ml-1m_tiny | EASE |" in table and "DiffRec's (all users)" in table
