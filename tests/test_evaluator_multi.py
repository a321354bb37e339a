"""Exactness tests for multi-target (DiffRec-style) evaluation: recsys_dist.eval.multi.

:func:`rank_target_sets` runs in real processes over gloo for world sizes 2 and 3 (and in
process, without a process group, for world size 1), on a catalog whose size is not divisible
by the world size, with users split unevenly between ranks (empty batches, a rank that runs
out of batches early, ranks disagreeing on the padded widths of the target and mask lists).
Everything is compared with a brute-force single-process reference written here:

* counts (non-target candidates above / tied, targets above / tied, tie index) from the full
  score matrix with explicit candidate masks, compared with ``==``;
* metrics under the deterministic rules from an explicitly sorted ranking (Python ``sorted``)
  scored like DiffRec's ``computeTopNAccuracy`` (top-K list -> Recall / NDCG / HR / Precision /
  MRR); under the expected rule from an enumeration of every possible top-K relevance pattern
  with its exact probability (tie groups ordered uniformly at random), itself checked against
  the average over *every permutation* of the tie groups on a tiny catalog;
* item embeddings and queries are small integers stored in float32, so every dot product is
  exact and ties are frequent; metric means are compared to 1e-12 relative and bit-for-bit
  across world sizes, ranks and splits (the evaluator sums exactly).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_harness import run_distributed

from recsys_dist.distributed import max_over_ranks, row_partition
from recsys_dist.eval import (
    TIE_RULES,
    MultiMetricAccumulator,
    per_user_multi_metrics,
    rank_target_sets,
    rank_targets,
)

NUM_ROWS = 203  # not divisible by 2 or 3
NUM_USERS = 40
T_COLS = 7
M_COLS = 12
KS = (1, 3, 5, 10)
ZERO_TARGET_USERS = (0, 5, 17, 33)
WORKER_TIMEOUT_S = 75.0  # the whole distributed run (every rank), as in tests/test_evaluator.py

# Per world size, per rank: sizes of the successive eval batches (sum to NUM_USERS).
SPLITS: dict[int, list[list[int]]] = {
    1: [[6, 0, 14, 20]],
    2: [[9, 0, 6], [4, 11, 10]],
    3: [[13, 2], [0, 0, 0, 5], [12, 8]],
}


@dataclass
class Case:
    name: str
    items: torch.Tensor  # (NUM_ROWS, d) float32, integer-valued
    queries: torch.Tensor  # (U, d) float32, integer-valued
    targets: torch.Tensor  # (U, T_COLS) long, 0 = pad, some duplicates
    masked: torch.Tensor  # (U, M_COLS) long, 0 = pad, sometimes a target id
    item_chunk: int
    score_cache_bytes: int = 1 << 30


def make_case(name: str) -> Case:
    gen = torch.Generator().manual_seed(99 + sum(map(ord, name)))
    if name == "ties":  # few distinct scores: big tie groups, several targets per group
        d, lo, hi = 3, -1, 2
    elif name in ("spread", "const"):
        d, lo, hi = 8, -3, 4
    else:
        raise KeyError(name)
    items = torch.randint(lo, hi, (NUM_ROWS, d), generator=gen).float()
    targets = torch.zeros(NUM_USERS, T_COLS, dtype=torch.long)
    for u in range(NUM_USERS):
        c = 0 if u in ZERO_TARGET_USERS else int(torch.randint(1, T_COLS, (1,), generator=gen))
        targets[u, :c] = torch.randint(1, NUM_ROWS, (c,), generator=gen)
        if u % 7 == 3 and c >= 2:
            targets[u, c - 1] = targets[u, 0]  # a repeated id counts once
    # padding scattered inside the row too (not only at the end)
    targets[1::4] = targets[1::4].roll(1, dims=1)
    queries = torch.randint(lo, hi, (NUM_USERS, d), generator=gen).float()
    near = torch.arange(NUM_USERS) % 2 == 0  # half the users "like" one of their targets
    noisy = (items[targets[:, 0].clamp(min=1)] + torch.randint(-1, 2, (NUM_USERS, d), generator=gen))
    queries[near] = noisy[near].clamp(lo, hi - 1)
    if name == "const":
        queries = torch.zeros(NUM_USERS, d)
    masked = torch.randint(1, NUM_ROWS, (NUM_USERS, M_COLS), generator=gen)
    masked[torch.rand(NUM_USERS, M_COLS, generator=gen) < 0.3] = 0
    masked[::3, 0] = targets[::3, 1]  # a target that is also "masked" stays a candidate
    chunk = {"ties": 37, "spread": 64, "const": 500}[name]
    return Case(name, items, queries, targets, masked, chunk,
                score_cache_bytes=0 if name == "spread" else 1 << 30)


CASES = ("ties", "spread")


def user_batches(world: int, rank: int) -> list[torch.Tensor]:
    perm = torch.randperm(NUM_USERS, generator=torch.Generator().manual_seed(3))
    split = SPLITS[world]
    start = sum(sum(s) for s in split[:rank])
    out = []
    for size in split[rank]:
        out.append(perm[start:start + size])
        start += size
    return out


# --------------------------------------------------------------------------------------------
# code that runs on every rank
# --------------------------------------------------------------------------------------------


def evaluate_case(case: Case, rank: int, world: int, group: dist.ProcessGroup | None) -> dict[str, Any]:
    lo, hi = row_partition(NUM_ROWS, world)[rank]
    block = case.items[lo:hi].clone()
    batches = user_batches(world, rank)
    n_steps = max_over_ranks(len(batches), group)
    accs = {rule: MultiMetricAccumulator(KS, rule) for rule in TIE_RULES}
    per_call: list[dict[str, float]] = []
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("users", "valid", "greater", "equal",
                                                           "target_greater", "target_equal",
                                                           "tie_index", "target_scores")}
    for step in range(n_steps):
        idx = batches[step] if step < len(batches) else torch.zeros(0, dtype=torch.long)
        tgt, msk = case.targets[idx], case.masked[idx]
        if rank % 2 == 1:  # ranks disagree on the padded widths
            tgt = torch.cat([tgt, torch.zeros(len(idx), 2, dtype=torch.long)], dim=1)
            msk = torch.cat([msk, torch.zeros(len(idx), 3, dtype=torch.long)], dim=1)
        res = rank_target_sets(case.queries[idx], tgt, block, lo, NUM_ROWS, msk, ks=KS,
                               group=group, item_chunk=case.item_chunk,
                               score_cache_bytes=case.score_cache_bytes)
        assert res.valid.shape == tgt.shape and res.greater.dtype == torch.long
        assert res.num_local_users + res.num_local_skipped == len(idx)
        for acc in accs.values():
            acc.update(res)
        per_call.append(res.metrics)
        rows["users"].append(idx)
        for key in rows:
            if key != "users":
                rows[key].append(getattr(res, key)[:, :T_COLS])
    out: dict[str, Any] = {k: torch.cat(v) for k, v in rows.items()}
    out["per_call"] = per_call
    out["final"] = {rule: acc.compute(group) for rule, acc in accs.items()}
    return out


def evaluate_all(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: evaluate_case(make_case(name), rank, world, None) for name in CASES}
    if world == 1:
        return out
    case = make_case("ties")
    lo, hi = row_partition(NUM_ROWS, world)[rank]
    block = case.items[lo:hi]
    q, t = case.queries[:3], case.targets[1:4]

    # Only users without targets anywhere: skipped and counted, no ranking.
    res = rank_target_sets(q[:2], torch.zeros(2, 3, dtype=torch.long), block, lo, NUM_ROWS)
    assert (res.num_users, res.num_skipped_users, res.num_local_skipped) == (0, 2 * world, 2)
    assert math.isnan(res.metrics["Recall@10"])

    # Bad inputs on one rank: every rank raises the same error, none is left hanging.
    bad_q = q.clone()
    if rank == world - 1:
        bad_q[1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"rank\(s\) \[{world - 1}\] \(rank {world - 1}: NaN/inf queries\)"):
        rank_target_sets(bad_q, t, block, lo, NUM_ROWS)
    bad_rows = block.clone()
    if rank == 0:
        bad_rows[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"rank\(s\) \[0\] \(rank 0: NaN/inf item rows\)"):
        rank_target_sets(q, t, bad_rows, lo, NUM_ROWS)
    bad_t = t.clone()
    if rank == 1:
        bad_t[0, 0] = NUM_ROWS
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\]"):
        rank_target_sets(q, bad_t, block, lo, NUM_ROWS)
    huge = torch.full((hi - lo, block.shape[1]), 1e30)
    with pytest.raises(ValueError, match="scores are NaN/inf"):
        rank_target_sets(torch.full((2, block.shape[1]), 1e30), t[:2], huge, lo, NUM_ROWS)
    acc = MultiMetricAccumulator(ks=(1,) if rank == 0 else (2,))
    with pytest.raises(ValueError, match="disagree"):
        acc.compute()
    assert max_over_ranks(rank) == world - 1  # the group is still usable
    out["errors_raised"] = True
    return out


def _worker(world: int, out_dir: str) -> None:
    """One rank of ``evaluate_all``, its output saved as tensors (tests/distributed_harness.py
    starts the ranks and destroys the process group)."""
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.save(evaluate_all(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {1: [evaluate_all(0, 1)]}
    for world in (2, 3):
        tmp = tmp_path_factory.mktemp(f"multi{world}")
        run_distributed(_worker, world, world, str(tmp), timeout_s=WORKER_TIMEOUT_S)
        out[world] = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return out


# --------------------------------------------------------------------------------------------
# brute-force reference (single process)
# --------------------------------------------------------------------------------------------


def topn_metrics(rel: list[int], num_targets: int, k: int) -> dict[str, float]:
    """DiffRec's computeTopNAccuracy for one user, given the relevance of the ranked list."""
    top = rel[:k]
    hits = sum(top)
    dcg = sum(1.0 / math.log2(j + 2) for j, r in enumerate(top) if r)
    idcg = sum(1.0 / math.log2(j + 2) for j in range(min(num_targets, k)))
    first = next((j for j, r in enumerate(top) if r), None)
    return {f"Recall@{k}": hits / num_targets, f"NDCG@{k}": dcg / idcg, f"HR@{k}": float(hits > 0),
            f"Precision@{k}": hits / k, f"MRR@{k}": 0.0 if first is None else 1.0 / (first + 1)}


@dataclass
class UserRef:
    targets: list[int]  # slot -> id, 0 for invalid slots
    counts: dict[str, list[int]]  # per slot, 0 for invalid slots
    groups: list[tuple[int, int]]  # tie groups by score descending: (members, targets)
    scores: list[float]  # per slot


def user_reference(scores: list[float], target_row: list[int], masked_row: list[int]) -> UserRef:
    seen: set[int] = set()
    slots = []
    for t in target_row:
        slots.append(t if t and t not in seen else 0)
        seen.add(t)
    tset = {t for t in slots if t}
    cand = [j for j in range(1, len(scores)) if j not in set(masked_row) or j in tset]
    others = [j for j in cand if j not in tset]
    counts: dict[str, list[int]] = {k: [] for k in ("greater", "equal", "target_greater",
                                                    "target_equal", "tie_index")}
    for pos, t in enumerate(slots):
        if not t:
            for key in counts:
                counts[key].append(0)
            continue
        s = scores[t]
        counts["greater"].append(sum(scores[j] > s for j in others))
        counts["equal"].append(sum(scores[j] == s for j in others))
        counts["target_greater"].append(sum(scores[u] > s for u in tset))
        counts["target_equal"].append(sum(scores[u] == s for u in tset if u != t))
        counts["tie_index"].append(sum(scores[u] == s for u in slots[:pos] if u))
    groups = []
    for s in sorted({scores[j] for j in cand}, reverse=True):
        members = [j for j in cand if scores[j] == s]
        groups.append((len(members), sum(j in tset for j in members)))
    return UserRef(slots, counts, groups, [scores[t] if t else 0.0 for t in slots])


def deterministic_rel(scores: list[float], ref: UserRef, masked_row: list[int], ties: str) -> list[int]:
    tset = {t for t in ref.targets if t}
    cand = [j for j in range(1, len(scores)) if j not in set(masked_row) or j in tset]
    win = 0 if ties == "optimistic" else 1
    order = sorted(cand, key=lambda j: (-scores[j], win if j in tset else 1 - win, j))
    return [int(j in tset) for j in order]


def expected_patterns(groups: list[tuple[int, int]], max_k: int) -> list[tuple[Fraction, list[int]]]:
    """Every relevance pattern of the first ``max_k`` positions with its exact probability,
    when each tie group is in uniformly random order."""
    per_group: list[list[tuple[Fraction, list[int]]]] = []
    start = 0
    for n, m in groups:
        if start >= max_k:
            break
        c = min(n, max_k - start)  # this group's slots inside the top max_k
        total = math.comb(n, m)
        options = []
        for j in range(0, min(m, c) + 1):
            if m - j > n - c:
                continue
            p = Fraction(math.comb(n - c, m - j), total)  # a given j-subset of the c slots
            for chosen in itertools.combinations(range(c), j):
                options.append((p, [int(i in chosen) for i in range(c)]))
        per_group.append(options)
        start += n
    out = []
    for combo in itertools.product(*per_group):
        p = Fraction(1)
        rel: list[int] = []
        for q, part in combo:
            p *= q
            rel += part
        out.append((p, rel))
    assert sum(p for p, _ in out) == 1
    return out


def reference_user_metrics(case: Case) -> dict[str, list[dict[str, float] | None]]:
    """Per tie rule, per user: metrics (None for users without targets)."""
    score_rows = (case.queries.double() @ case.items.double().T).tolist()
    out: dict[str, list[dict[str, float] | None]] = {rule: [] for rule in TIE_RULES}
    for u in range(NUM_USERS):
        masked_row = case.masked[u].tolist()
        ref = user_reference(score_rows[u], case.targets[u].tolist(), masked_row)
        nt = sum(1 for t in ref.targets if t)
        if nt == 0:
            for rule in TIE_RULES:
                out[rule].append(None)
            continue
        for rule in ("optimistic", "pessimistic"):
            rel = deterministic_rel(score_rows[u], ref, masked_row, rule)
            m: dict[str, float] = {}
            for k in KS:
                m.update(topn_metrics(rel, nt, k))
            out[rule].append(m)
        acc = {name: 0.0 for name in out["optimistic"][-1]}  # type: ignore[union-attr]
        for p, rel in expected_patterns(ref.groups, max(KS)):
            for k in KS:
                for name, v in topn_metrics(rel, nt, k).items():
                    acc[name] += float(p) * v
        out["expected"].append(acc)
    return out


_REF: dict[str, Any] = {}


def reference_metrics(name: str) -> dict[str, list[dict[str, float] | None]]:
    if name not in _REF:
        _REF[name] = reference_user_metrics(make_case(name))
    return _REF[name]


def gather_users(per_rank: list[dict[str, Any]], name: str, field: str) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for res in per_rank:
        part = res[name]
        for pos, u in enumerate(part["users"].tolist()):
            assert u not in out, f"user {u} evaluated twice"
            out[u] = part[field][pos]
    return out


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_counts_equal_brute_force(results: dict[int, list[dict[str, Any]]], name: str) -> None:
    case = make_case(name)
    score_rows = (case.queries.double() @ case.items.double().T).tolist()
    refs = [user_reference(score_rows[u], case.targets[u].tolist(), case.masked[u].tolist())
            for u in range(NUM_USERS)]
    for world, per_rank in results.items():
        valid = gather_users(per_rank, name, "valid")
        assert sorted(valid) == list(range(NUM_USERS)), f"world {world}: users lost"
        for u, ref in enumerate(refs):
            assert valid[u].tolist() == [bool(t) for t in ref.targets], (world, u)
        for key in ("greater", "equal", "target_greater", "target_equal", "tie_index"):
            got = gather_users(per_rank, name, key)
            for u, ref in enumerate(refs):
                assert got[u].tolist() == ref.counts[key], (world, key, u)
        scores = gather_users(per_rank, name, "target_scores")
        for u, ref in enumerate(refs):
            assert scores[u].tolist() == ref.scores, (world, u)


@pytest.mark.parametrize("ties", TIE_RULES)
@pytest.mark.parametrize("name", CASES)
def test_metrics_equal_brute_force_and_identical_across_worlds(
    results: dict[int, list[dict[str, Any]]], name: str, ties: str,
) -> None:
    ref = reference_metrics(name)[ties]
    users = [m for m in ref if m is not None]
    assert len(users) == NUM_USERS - len(ZERO_TARGET_USERS)
    expected = {key: sum(m[key] for m in users) / len(users) for key in users[0]}
    finals = []
    for world, per_rank in results.items():
        for res in per_rank:
            final = res[name]["final"][ties]
            assert final["num_users"] == len(users)
            assert final["num_skipped_users"] == len(ZERO_TARGET_USERS)
            for key, value in expected.items():
                assert math.isclose(final[key], value, rel_tol=1e-12, abs_tol=1e-15), (world, key)
            finals.append(final)
        # per-call metrics (expected rule) are identical on every rank of a call (repr: a call
        # without any target anywhere has nan means)
        calls = [repr(res[name]["per_call"]) for res in per_rank]
        assert all(c == calls[0] for c in calls)
        assert len(res[name]["per_call"]) == max(len(s) for s in SPLITS[world])
    assert all(f == finals[0] for f in finals), "metrics differ between world sizes / ranks"


def test_per_user_metrics_equal_brute_force() -> None:
    """In process, every user's metrics under every rule (more diagnostic than the means)."""
    for name in CASES + ("const",):
        case = make_case(name)
        res = rank_target_sets(case.queries, case.targets, case.items, 0, NUM_ROWS, case.masked,
                               ks=KS, item_chunk=case.item_chunk)
        assert res.num_skipped_users == len(ZERO_TARGET_USERS)
        ref = reference_metrics(name)
        for rule in TIE_RULES:
            per_user = per_user_multi_metrics(*res.counts(), ks=KS, ties=rule)
            for u in range(NUM_USERS):
                if ref[rule][u] is None:
                    assert all(math.isnan(float(v[u])) for v in per_user.values())
                    continue
                for key, value in ref[rule][u].items():  # type: ignore[union-attr]
                    got = float(per_user[key][u])
                    assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-15), (name, rule, u, key)


def test_collapsed_model_scores_like_random() -> None:
    """Constant scores: with N candidates and m targets, E[Recall@K] = min(K, N) / N and
    E[HR@K] = 1 - C(N - K, m) / C(N, m) under the default rule; optimistic would be perfect."""
    case = make_case("const")
    res = rank_target_sets(case.queries, case.targets, case.items, 0, NUM_ROWS, case.masked, ks=KS)
    per_user = per_user_multi_metrics(*res.counts(), ks=KS)
    best = per_user_multi_metrics(*res.counts(), ks=KS, ties="optimistic")
    for u in range(NUM_USERS):
        m = int(res.num_targets[u])
        if m == 0:
            continue
        tset = set(res.valid[u].nonzero().squeeze(1).tolist())
        slots = case.targets[u].tolist()
        targets = {slots[i] for i in tset}
        n = sum(1 for j in range(1, NUM_ROWS) if j not in set(case.masked[u].tolist()) or j in targets)
        for k in KS:
            assert math.isclose(float(per_user[f"Recall@{k}"][u]), min(k, n) / n, rel_tol=1e-12)
            hr = 1 - math.comb(n - k, m) / math.comb(n, m)
            assert math.isclose(float(per_user[f"HR@{k}"][u]), hr, rel_tol=1e-12)
            assert math.isclose(float(best[f"Recall@{k}"][u]), min(k, m) / m, rel_tol=1e-12)


def test_expected_rule_equals_average_over_every_tie_order() -> None:
    """Tiny catalog, two users with several targets inside one tie group: the expected rule
    equals the average of DiffRec's top-K metrics over every order of every tie group, and so
    does the pattern-enumeration reference used above."""
    scores = [0.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 0.5]  # row 0 = padding
    items = torch.tensor(scores)[:, None]
    targets = torch.tensor([[2, 3, 7, 0], [5, 8, 4, 5], [9, 0, 0, 0]])
    masked = torch.tensor([[6, 0], [3, 5], [0, 0]])  # 5 is a target of user 1: not masked
    ks = (1, 2, 3, 4, 6, 9)
    res = rank_target_sets(torch.ones(3, 1), targets, items, 0, len(scores), masked, ks=ks,
                           item_chunk=4)
    assert res.valid[1].tolist() == [True, True, True, False]  # repeated 5 counts once
    for u in range(3):
        ref = user_reference(scores, targets[u].tolist(), masked[u].tolist())
        tset = {t for t in ref.targets if t}
        cand = [j for j in range(1, len(scores)) if j not in set(masked[u].tolist()) or j in tset]
        groups = [[j for j in cand if scores[j] == s] for s in sorted({scores[j] for j in cand}, reverse=True)]
        avg: dict[str, float] = {}
        orders = list(itertools.product(*(itertools.permutations(g) for g in groups)))
        for order in orders:
            rel = [int(j in tset) for grp in order for j in grp]
            for k in ks:
                for key, v in topn_metrics(rel, len(tset), k).items():
                    avg[key] = avg.get(key, 0.0) + v / len(orders)
        pattern: dict[str, float] = {key: 0.0 for key in avg}
        for p, rel in expected_patterns(ref.groups, max(ks)):
            for k in ks:
                for key, v in topn_metrics(rel, len(tset), k).items():
                    pattern[key] += float(p) * v
        per_user = per_user_multi_metrics(*res.counts(), ks=ks)
        for key, v in avg.items():
            assert math.isclose(pattern[key], v, rel_tol=1e-12, abs_tol=1e-15), (u, key)
            assert math.isclose(float(per_user[key][u]), v, rel_tol=1e-12, abs_tol=1e-15), (u, key)
        for rule in ("optimistic", "pessimistic"):  # the best / worst of those orders
            rel = deterministic_rel(scores, ref, masked[u].tolist(), rule)
            per_user = per_user_multi_metrics(*res.counts(), ks=ks, ties=rule)
            for k in ks:
                for key, v in topn_metrics(rel, len(tset), k).items():
                    assert math.isclose(float(per_user[key][u]), v, rel_tol=1e-12, abs_tol=1e-15), (u, rule, key)


def test_single_target_agrees_with_rank_targets() -> None:
    """One target per user: HR / NDCG equal the single-target evaluator's under every rule."""
    case = make_case("ties")
    t = case.targets[:, 0].clone()
    t[t == 0] = 1
    for rule in TIE_RULES:
        single = rank_targets(case.queries, t, case.items, 0, NUM_ROWS, case.masked,
                              mask_history=True, ks=KS, ties=rule)
        multi = rank_target_sets(case.queries, t[:, None], case.items, 0, NUM_ROWS, case.masked,
                                 ks=KS, ties=rule)
        assert multi.greater[:, 0].tolist() == single.ranks.tolist()
        assert multi.equal[:, 0].tolist() == single.ties_count.tolist()
        for k in KS:
            for key in (f"HR@{k}", f"NDCG@{k}"):
                assert math.isclose(multi.metrics[key], single.metrics[key], rel_tol=1e-12), (rule, key)
            assert math.isclose(multi.metrics[f"Recall@{k}"], multi.metrics[f"HR@{k}"], rel_tol=1e-12)


def test_invalid_input_on_one_rank_raises_everywhere(results: dict[int, list[dict[str, Any]]]) -> None:
    for world in (2, 3):
        assert all(res["errors_raised"] for res in results[world])


def test_local_validation_messages() -> None:
    items = torch.ones(5, 2)
    with pytest.raises(ValueError, match="target_ids must be"):
        rank_target_sets(torch.ones(2, 2), torch.ones(2, 3), items, 0, 5)
    with pytest.raises(ValueError, match="masked_ids must be"):
        rank_target_sets(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.long), items, 0, 5,
                         torch.ones(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="do not tile"):
        rank_target_sets(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.long), items[:4], 0, 5)
