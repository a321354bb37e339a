"""Exactness tests for the distributed full-catalog evaluator (recsys_dist.eval).

The evaluator runs in real processes (tests/distributed_harness.py) over a gloo process group,
for world sizes 1 (in-process, no process group, and as a one-rank subgroup), 2 and 3, on a
catalog whose size is not divisible by the world size, with users split unevenly between ranks
(including ranks with 0 users in some batches and ranks that run out of batches early). Its
results are compared with a brute-force single-process reference written here independently:
full score matrix, explicit candidate masks, counting, and Python ``sorted`` for top-k.

Exactness policy:
* integer-valued tables/queries stored in float32 ("int" cases) and the popularity case have
  exactly representable dot products, so ranks, target scores, top-k ids *and* top-k scores
  are compared with ``==``; ties are frequent there, which exercises the tie rules;
* for the ordinary ``randn`` case ranks and top-k ids are also compared with ``==``. This is
  sound because the test first asserts that no comparison the evaluator makes is closer than
  the worst-case float32 rounding error of a d-term dot product (``2 * d * 2**-24 *
  sum_i |q_i e_i|`` per score, whatever the summation order), so any correct float32
  evaluation must produce the same comparisons as the float64 reference. Only the top-k
  *scores* of that case use a tolerance (the same rounding bound), because the reference
  computes them in float64.
* tie counts (candidates scoring exactly the target's score) are compared with ``==`` too;
* metrics are checked under all three tie rules against the reference's own averaging over the
  target's possible positions. Optimistic / pessimistic HR@K means are ratios of integers and
  compared with ``==``; expected-rule HR and every NDCG are compared to 1e-12 relative (sums of
  fractions in a different order), and bit-for-bit across world sizes, which the evaluator
  guarantees by reducing integers only;
* a collapsed model (constant scores, the ``const`` case) must score like a random ranker under
  the default rule, and a NaN/inf query, row or score raises on every rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_harness import run_distributed

from recsys_dist.distributed import max_over_ranks, row_partition
from recsys_dist.eval import (
    TIE_RULES,
    MetricAccumulator,
    popularity_block,
    rank_targets,
)

NUM_ROWS = 1003  # not divisible by 2 or 3
NUM_USERS = 37
HIST_LEN = 6
WORKER_TIMEOUT_S = 75.0  # the whole distributed run (every rank), as the old spawn loop had it

# Per world size, per rank: sizes of the successive eval batches (sums to the case's users).
SPLITS: dict[int, dict[int, list[list[int]]]] = {
    NUM_USERS: {
        1: [[5, 0, 12, 20]],
        2: [[7, 0, 5], [3, 9, 6, 7]],
        3: [[10, 4], [0, 0, 0, 3], [12, 8]],
    },
    5: {  # tiny catalog
        1: [[2, 3]],
        2: [[0, 2], [3]],
        3: [[1], [0, 0], [2, 2]],
    },
}


@dataclass
class Case:
    """One evaluation scenario, generated identically in every process from a seed."""

    name: str
    num_rows: int
    items: torch.Tensor  # (num_rows, d) float32
    queries: torch.Tensor  # (U, d) float32
    targets: torch.Tensor  # (U,) long in [1, num_rows)
    histories: torch.Tensor  # (U, HIST_LEN) long, 0 = pad
    mask_history: bool
    ks: tuple[int, ...]
    topk: int
    item_chunk: int
    score_cache_bytes: int = 1 << 30
    exact_scores: bool = True
    counts: torch.Tensor | None = None  # popularity case: (num_rows,) long

    @property
    def num_users(self) -> int:
        return int(self.targets.shape[0])


def _histories(gen: torch.Generator, targets: torch.Tensor, num_rows: int) -> torch.Tensor:
    users = targets.shape[0]
    hist = torch.randint(1, num_rows, (users, HIST_LEN), generator=gen)
    hist[torch.rand(users, HIST_LEN, generator=gen) < 0.3] = 0  # padding
    hist[::3, 0] = targets[::3]  # the target inside the history must never be masked
    return hist


def make_case(name: str) -> Case:
    gen = torch.Generator().manual_seed(1234 + sum(map(ord, name)))
    if name.startswith("int"):
        d = 8
        items = torch.randint(-3, 4, (NUM_ROWS, d), generator=gen).float()
        targets = torch.randint(1, NUM_ROWS, (NUM_USERS,), generator=gen)
        queries = torch.randint(-3, 4, (NUM_USERS, d), generator=gen).float()
        close = torch.arange(NUM_USERS) % 2 == 0  # half the users "like" their target
        noisy = (items[targets] + torch.randint(-1, 2, (NUM_USERS, d), generator=gen)).clamp(-3, 3)
        queries[close] = noisy[close]
        mask = name == "int_mask"
        return Case(
            name, NUM_ROWS, items, queries, targets, _histories(gen, targets, NUM_ROWS), mask,
            ks=(1, 5, 10, 50), topk=12, item_chunk=64,
            # int_mask: no score cache, so the second pass recomputes chunks (checked path).
            score_cache_bytes=0 if mask else 1 << 30,
        )
    if name == "randn":
        d = 16
        items = torch.randn(NUM_ROWS, d, generator=gen)
        targets = torch.randint(1, NUM_ROWS, (NUM_USERS,), generator=gen)
        queries = items[targets] * 0.3 + torch.randn(NUM_USERS, d, generator=gen)
        return Case(
            name, NUM_ROWS, items, queries, targets, _histories(gen, targets, NUM_ROWS), True,
            ks=(10, 100, 500), topk=10, item_chunk=100, exact_scores=False,
        )
    if name == "pop":
        counts = torch.randint(0, 25, (NUM_ROWS,), generator=gen)  # many ties
        targets = torch.randint(1, NUM_ROWS, (NUM_USERS,), generator=gen)
        return Case(
            name, NUM_ROWS, counts[:, None].float(), torch.ones(NUM_USERS, 1), targets,
            _histories(gen, targets, NUM_ROWS), True, ks=(1, 10, 100), topk=15, item_chunk=128,
            counts=counts,
        )
    if name == "const":  # a collapsed model: every score equal, no masking
        d = 4
        items = torch.randn(NUM_ROWS, d, generator=gen)
        targets = torch.randint(1, NUM_ROWS, (NUM_USERS,), generator=gen)
        return Case(
            name, NUM_ROWS, items, torch.zeros(NUM_USERS, d), targets,
            _histories(gen, targets, NUM_ROWS), False, ks=(1, 10, 100), topk=3, item_chunk=300,
        )
    if name == "tiny":  # 4 rows: with 3 ranks the last block is empty; topk > #candidates
        items = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        targets = torch.tensor([1, 2, 3, 3, 1])
        queries = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 1.0], [0.0, 1.0]])
        histories = torch.tensor([[1, 2], [0, 0], [1, 0], [3, 1], [3, 3]])
        return Case(
            name, 4, items, queries, targets, histories, True, ks=(1, 2), topk=5, item_chunk=1,
        )
    raise KeyError(name)


CASES = ("int_plain", "int_mask", "randn", "pop", "const", "tiny")


def user_batches(case: Case, world: int, rank: int) -> list[torch.Tensor]:
    """Global user indices of each of this rank's batches (users shuffled, then split)."""
    perm = torch.randperm(case.num_users, generator=torch.Generator().manual_seed(7))
    split = SPLITS[case.num_users][world]
    start = sum(sum(sizes) for sizes in split[:rank])
    out = []
    for size in split[rank]:
        out.append(perm[start : start + size])
        start += size
    return out


# --------------------------------------------------------------------------------------------
# code that runs on every rank
# --------------------------------------------------------------------------------------------


def evaluate_case(
    case: Case, rank: int, world: int, group: dist.ProcessGroup | None
) -> dict[str, Any]:
    lo, hi = row_partition(case.num_rows, world)[rank]
    if case.counts is not None:
        block = popularity_block(case.counts, lo, hi)
    else:
        block = case.items[lo:hi].clone()
    batches = user_batches(case, world, rank)
    n_steps = max_over_ranks(len(batches), group)
    assert n_steps == max(len(s) for s in SPLITS[case.num_users][world])
    accs = {rule: MetricAccumulator(case.ks, rule) for rule in TIE_RULES}
    users, ranks, equal, tids, tscores, targets_scores = [], [], [], [], [], []
    batch_users: list[int] = []
    for step in range(n_steps):
        idx = batches[step] if step < len(batches) else torch.zeros(0, dtype=torch.long)
        hist = case.histories[idx]
        if rank % 2 == 1:  # ranks may disagree on the history length
            hist = torch.cat([hist, torch.zeros(len(idx), 2, dtype=torch.long)], dim=1)
        res = rank_targets(
            case.queries[idx], case.targets[idx], block, lo, case.num_rows,
            histories=hist, mask_history=case.mask_history, ks=case.ks, topk=case.topk,
            group=group, item_chunk=case.item_chunk, score_cache_bytes=case.score_cache_bytes,
        )
        # The one-pass count (no top-k: what validation runs) gives the same integers and
        # target scores as the two-pass path checked against brute force below, bit for bit.
        fast = rank_targets(
            case.queries[idx], case.targets[idx], block, lo, case.num_rows,
            histories=hist, mask_history=case.mask_history, ks=case.ks, topk=0,
            group=group, item_chunk=case.item_chunk,
        )
        assert torch.equal(fast.ranks, res.ranks), (case.name, fast.ranks, res.ranks)
        assert torch.equal(fast.ties_count, res.ties_count), case.name
        assert torch.equal(fast.target_scores, res.target_scores), case.name
        # Every user of this step is counted exactly once, on every rank.
        expected = sum(s[step] for s in SPLITS[case.num_users][world] if step < len(s))
        assert res.num_users == expected, (res.num_users, expected)
        assert res.num_local_users == len(idx)
        assert res.ranks.shape == (len(idx),) and res.ranks.dtype == torch.long
        assert res.topk_ids is not None and res.topk_ids.shape == (len(idx), case.topk)
        for acc in accs.values():
            acc.update(res)
        users.append(idx)
        ranks.append(res.ranks)
        equal.append(res.ties_count)
        tids.append(res.topk_ids)
        tscores.append(res.topk_scores)
        targets_scores.append(res.target_scores)
        batch_users.append(res.num_users)
    return {
        "users": torch.cat(users),
        "ranks": torch.cat(ranks),
        "equal": torch.cat(equal),
        "topk_ids": torch.cat(tids),
        "topk_scores": torch.cat(tscores),
        "target_scores": torch.cat(targets_scores),
        "batch_users": batch_users,
        "local_sums": {rule: acc.local_sums() for rule, acc in accs.items()},
        "final": {rule: acc.compute(group) for rule, acc in accs.items()},
    }


def evaluate_all(rank: int, world: int) -> dict[str, Any]:
    from recsys_dist.eval import onepass

    out: dict[str, Any] = {}
    before = dict(onepass.CALLS)
    for name in CASES:
        out[name] = evaluate_case(make_case(name), rank, world, None)
    out["paths"] = {k: onepass.CALLS[k] - before[k] for k in before}
    if world == 1:
        return out

    if world == 3:
        # Subgroups: rank 0 alone (a one-rank process group) and ranks {1, 2} (world size 2,
        # group ranks differ from global ranks). new_group is collective over all ranks.
        alone = dist.new_group([0])
        pair = dist.new_group([1, 2])
        group, sub_world = (alone, 1) if rank == 0 else (pair, 2)
        sub_rank = dist.get_rank(group)
        out["sub"] = evaluate_case(make_case("int_mask"), sub_rank, sub_world, group)
        out["sub_world"] = sub_world
        dist.barrier()

    # Invalid input on one rank only: every rank must raise (no rank left hanging).
    case = make_case("int_plain")
    lo, hi = row_partition(case.num_rows, world)[rank]
    targets = case.targets[:3].clone()
    if rank == 1:
        targets[0] = case.num_rows  # out of range
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\]"):
        rank_targets(case.queries[:3], targets, case.items[lo:hi], lo, case.num_rows)
    # ... and the group is still usable afterwards.
    assert max_over_ranks(rank, None) == world - 1
    out["invalid_input_raised"] = True

    # Non-finite queries on one rank, non-finite rows on another, and finite inputs whose
    # scores overflow: refused on every rank, never ranked first.
    q = case.queries[:3].clone()
    if rank == world - 1:
        q[1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"rank\(s\) \[{world - 1}\].*NaN/inf"):
        rank_targets(q, case.targets[:3], case.items[lo:hi], lo, case.num_rows)
    rows = case.items[lo:hi].clone()
    if rank == 0:
        rows[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"rank\(s\) \[0\]"):
        rank_targets(case.queries[:3], case.targets[:3], rows, lo, case.num_rows)
    huge = torch.full((hi - lo, case.items.shape[1]), 1e30)
    with pytest.raises(ValueError, match="scores are NaN/inf"):
        rank_targets(torch.full((2, case.items.shape[1]), 1e30), case.targets[:2], huge, lo, case.num_rows)
    assert max_over_ranks(rank, None) == world - 1
    out["nonfinite_raised"] = True
    return out


def _worker(world: int, out_dir: str) -> None:
    """One rank of ``evaluate_all``; its output is saved as tensors (the harness's queue would
    turn them into numpy arrays)."""
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.save(evaluate_all(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))


def _failing_worker() -> None:
    assert int(os.environ["RANK"]) != 1, "deliberate failure on rank 1"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Per world size, the per-rank outputs of ``evaluate_all``."""
    out: dict[int, list[dict[str, Any]]] = {1: [evaluate_all(0, 1)]}  # no process group
    for world in (2, 3):
        tmp = tmp_path_factory.mktemp(f"world{world}")
        run_distributed(_worker, world, world, str(tmp), timeout_s=WORKER_TIMEOUT_S)
        out[world] = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return out


# --------------------------------------------------------------------------------------------
# brute-force reference (single process, independent of the evaluator)
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    ranks: list[int]
    equal: list[int]
    target_scores: list[float]
    topk_ids: list[list[int]]
    topk_scores: list[list[float]]


def fp32_error_bound(case: Case) -> torch.Tensor:
    """(U, N) worst-case |float32 dot product - exact| for any summation order (float64)."""
    d = case.queries.shape[1]
    magnitude = case.queries.double().abs() @ case.items.double().abs().T
    return 2.0 * d * 2.0**-24 * magnitude


def brute_force(case: Case) -> Reference:
    if case.counts is not None:  # popularity: the score of an item is its count
        scores = case.counts.double()[None, :].expand(case.num_users, -1)
    else:
        scores = case.queries.double() @ case.items.double().T
    bound = None if case.exact_scores else fp32_error_bound(case)
    ref = Reference([], [], [], [], [])
    for u in range(case.num_users):
        t = int(case.targets[u])
        cand = torch.ones(case.num_rows, dtype=torch.bool)
        cand[0] = False
        if case.mask_history:
            cand[case.histories[u]] = False
        cand[t] = True  # never masked
        row = scores[u].tolist()
        others = [j for j in range(case.num_rows) if cand[j] and j != t]
        ref.ranks.append(sum(1 for j in others if row[j] > row[t]))
        ref.equal.append(sum(1 for j in others if row[j] == row[t]))
        ref.target_scores.append(row[t])
        order = sorted((j for j in range(case.num_rows) if cand[j]), key=lambda j: (-row[j], j))
        top = order[: case.topk]
        ref.topk_ids.append(top + [-1] * (case.topk - len(top)))
        ref.topk_scores.append([row[j] for j in top] + [-math.inf] * (case.topk - len(top)))
        if bound is not None:
            # Precondition for exact comparison of a float32 evaluation with this float64
            # reference: no decision it makes is within float32 rounding error.
            b = bound[u].tolist()
            for j in others:
                assert abs(row[j] - row[t]) > b[j] + b[t], f"near-tie user {u} item {j}"
            assert ref.equal[-1] == 0
            for a, c in zip(order[: case.topk], order[1 : case.topk + 1]):
                assert abs(row[a] - row[c]) > b[a] + b[c], f"near-tie in top-k of user {u}"
    return ref


_REF_CACHE: dict[str, Reference] = {}


def reference(name: str) -> Reference:
    if name not in _REF_CACHE:
        _REF_CACHE[name] = brute_force(make_case(name))
    return _REF_CACHE[name]


def gather_users(per_rank: list[dict[str, Any]], key: str, field: str) -> dict[int, Any]:
    """{global user index: value} over all ranks; asserts no user appears twice."""
    out: dict[int, Any] = {}
    for res in per_rank:
        part = res[key]
        for pos, u in enumerate(part["users"].tolist()):
            assert u not in out, f"user {u} evaluated twice"
            out[u] = part[field][pos]
    return out


def target_positions(g: int, e: int, ties: str) -> list[int]:
    """The 0-based positions the target can take among ``g`` better and ``e`` tied items."""
    return {"optimistic": [g], "pessimistic": [g + e], "expected": list(range(g, g + e + 1))}[ties]


def reference_sums(name: str, ties: str) -> dict[str, float]:
    """Sums over users of HR@K / NDCG@K: each user's metric averaged over its positions."""
    case, ref = make_case(name), reference(name)
    out: dict[str, float] = {}
    for k in case.ks:
        hr = nd = 0.0
        for g, e in zip(ref.ranks, ref.equal):
            pos = target_positions(g, e, ties)
            hr += sum(1 for r in pos if r < k) / len(pos)
            nd += sum(1 / math.log2(r + 2) for r in pos if r < k) / len(pos)
        out[f"HR@{k}"], out[f"NDCG@{k}"] = hr, nd
    return out


def reference_metrics(name: str, ties: str) -> dict[str, float]:
    n = make_case(name).num_users
    return {key: v / n for key, v in reference_sums(name, ties).items()}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_row_partition_matches_rowwise_sharding() -> None:
    assert row_partition(1003, 2) == [(0, 502), (502, 1003)]
    assert row_partition(1003, 3) == [(0, 335), (335, 670), (670, 1003)]
    assert row_partition(4, 3) == [(0, 2), (2, 4), (4, 4)]
    assert row_partition(10, 1) == [(0, 10)]


@pytest.mark.parametrize("name", CASES)
def test_ranks_equal_brute_force(results: dict[int, list[dict[str, Any]]], name: str) -> None:
    ref = reference(name)
    for world, per_rank in results.items():
        ranks = gather_users(per_rank, name, "ranks")
        assert sorted(ranks) == list(range(len(ref.ranks))), f"world {world}: users lost"
        got = [int(ranks[u]) for u in range(len(ref.ranks))]
        assert got == ref.ranks, f"world {world}"
        equal = gather_users(per_rank, name, "equal")
        assert [int(equal[u]) for u in range(len(ref.ranks))] == ref.equal, f"world {world}"
        if make_case(name).exact_scores:
            scores = gather_users(per_rank, name, "target_scores")
            assert [float(scores[u]) for u in range(len(ref.ranks))] == ref.target_scores


def test_ranks_of_subgroups_equal_brute_force(results: dict[int, list[dict[str, Any]]]) -> None:
    ref = reference("int_mask")
    per_rank = results[3]
    assert [r["sub_world"] for r in per_rank] == [1, 2, 2]
    for members in ([0], [1, 2]):
        sub = [per_rank[r] for r in members]
        ranks = gather_users(sub, "sub", "ranks")
        assert {u: int(ranks[u]) for u in ranks} == {u: ref.ranks[u] for u in ranks}
    # the 1-rank subgroup evaluated everybody, the 2-rank subgroup too
    assert len(per_rank[0]["sub"]["users"]) == NUM_USERS
    assert sum(len(per_rank[r]["sub"]["users"]) for r in (1, 2)) == NUM_USERS


@pytest.mark.parametrize("name", CASES)
def test_topk_equals_brute_force(results: dict[int, list[dict[str, Any]]], name: str) -> None:
    case, ref = make_case(name), reference(name)
    for world, per_rank in results.items():
        ids = gather_users(per_rank, name, "topk_ids")
        scores = gather_users(per_rank, name, "topk_scores")
        for u in range(case.num_users):
            assert ids[u].tolist() == ref.topk_ids[u], f"world {world} user {u}"
            if case.exact_scores:
                assert scores[u].tolist() == ref.topk_scores[u], f"world {world} user {u}"
            else:  # float64 reference vs float32 scores: within the rounding bound
                bound = fp32_error_bound(case)[u, ids[u]]
                diff = (scores[u].double() - torch.tensor(ref.topk_scores[u])).abs()
                assert bool((diff <= bound).all()), f"world {world} user {u}"


def test_popularity_is_count_ranking(results: dict[int, list[dict[str, Any]]]) -> None:
    """d = 1 with ones as queries ranks by count; checked against counts directly."""
    case = make_case("pop")
    assert case.counts is not None
    counts = case.counts.tolist()
    for u in range(case.num_users):
        t = int(case.targets[u])
        seen = set(case.histories[u].tolist()) - {t}
        above = sum(
            1 for j in range(1, case.num_rows) if j != t and j not in seen and counts[j] > counts[t]
        )
        assert reference("pop").ranks[u] == above
    for world, per_rank in results.items():
        ranks = gather_users(per_rank, "pop", "ranks")
        assert [int(ranks[u]) for u in range(case.num_users)] == reference("pop").ranks
        ids = gather_users(per_rank, "pop", "topk_ids")
        for u in range(case.num_users):
            got = ids[u].tolist()
            keys = [(-counts[j], j) for j in got]
            assert keys == sorted(keys), f"world {world}: top-k not ordered by (count desc, id)"


@pytest.mark.parametrize("ties", TIE_RULES)
@pytest.mark.parametrize("name", CASES)
def test_every_user_counted_once(results: dict[int, list[dict[str, Any]]], name: str, ties: str) -> None:
    case = make_case(name)
    expected = reference_metrics(name, ties)
    sums = reference_sums(name, ties)
    finals = []
    for world, per_rank in results.items():
        for res in per_rank:
            final = res[name]["final"][ties]
            assert final["num_users"] == case.num_users
            for key, value in expected.items():
                if key.startswith("HR@") and ties != "expected":  # ratios of integers
                    assert final[key] == value, (world, key)
                else:
                    assert math.isclose(final[key], value, rel_tol=1e-12, abs_tol=1e-15), (world, key)
            finals.append(final)
        # local sums partition the global sums: each user on exactly one rank
        total_users = sum(res[name]["local_sums"][ties]["num_users"] for res in per_rank)
        assert total_users == case.num_users
        for key, value in sums.items():
            got = sum(res[name]["local_sums"][ties][key] for res in per_rank)
            assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-15), (world, key)
    # bit-identical whatever the world size and split
    assert all(f == finals[0] for f in finals)


def test_collapsed_model_scores_like_random(results: dict[int, list[dict[str, Any]]]) -> None:
    """Constant scores: every other candidate ties with the target. The default rule gives the
    random ranker's HR@K = K / (n + 1) with n = num_rows - 2 other candidates; the optimistic
    rule would call it perfect."""
    case = make_case("const")
    n = case.num_rows - 2
    for world, per_rank in results.items():
        for res in per_rank:
            final = res["const"]["final"]
            for k in case.ks:
                assert math.isclose(final["expected"][f"HR@{k}"], k / (n + 1), rel_tol=1e-12), (world, k)
                if k > 1:  # NDCG@1 == HR@1
                    assert final["expected"][f"NDCG@{k}"] < final["expected"][f"HR@{k}"]
                assert final["pessimistic"][f"HR@{k}"] == 0.0
            assert final["optimistic"]["HR@1"] == 1.0


def test_expected_rule_equals_average_over_tie_orders() -> None:
    """Brute force over every order of the tied items of a tiny catalog (one process)."""
    import itertools

    from recsys_dist.eval import per_user_metrics

    scores = [0.0, 3.0, 1.0, 1.0, 2.0, 1.0, 1.0]  # row 0 = padding; target = item 2 (score 1)
    items = torch.tensor(scores)[:, None]
    res = rank_targets(torch.ones(1, 1), torch.tensor([2]), items, 0, len(scores), ks=(1, 2, 3, 4, 6))
    assert (int(res.ranks[0]), int(res.ties_count[0])) == (2, 3)  # items 1, 4 above; 3, 5, 6 tie
    tied = [2, 3, 5, 6]
    hr = {k: 0.0 for k in res.ks}
    nd = {k: 0.0 for k in res.ks}
    orders = list(itertools.permutations(tied))
    for order in orders:
        pos = 2 + order.index(2)
        for k in res.ks:
            hr[k] += (pos < k) / len(orders)
            nd[k] += (1 / math.log2(pos + 2) if pos < k else 0.0) / len(orders)
    per_user = per_user_metrics(res.ranks, res.ks, res.ties_count, "expected")
    for k in res.ks:
        assert math.isclose(res.metrics[f"HR@{k}"], hr[k], rel_tol=1e-12)
        assert math.isclose(res.metrics[f"NDCG@{k}"], nd[k], rel_tol=1e-12)
        assert math.isclose(float(per_user[f"HR@{k}"][0]), hr[k], rel_tol=1e-12)


def test_invalid_input_on_one_rank_raises_everywhere(
    results: dict[int, list[dict[str, Any]]],
) -> None:
    for world in (2, 3):
        assert all(res["invalid_input_raised"] for res in results[world])
        assert all(res["nonfinite_raised"] for res in results[world])


def test_worker_failure_propagates() -> None:
    with pytest.raises(AssertionError, match=r"rank 1 failed:(.|\n)*deliberate failure on rank 1"):
        run_distributed(_failing_worker, 2, timeout_s=WORKER_TIMEOUT_S)


def test_one_pass_ran_and_falls_back_exactly(results: dict[int, list[dict[str, Any]]], monkeypatch) -> None:
    """Every topk-0 call of the cases above took the one-pass count (none fell back), and when
    a chunk does not reproduce a target score of the owner's small matmul (here: one score off
    by one ulp), the call falls back to the two-pass count and gives its result exactly."""
    for world, per_rank in results.items():
        for out in per_rank:
            assert out["paths"]["one_pass"] > 0 and out["paths"]["fallback"] == 0, (world, out["paths"])
    from recsys_dist.eval import onepass

    case = make_case("randn")
    args = (case.queries, case.targets, case.items, 0, case.num_rows)
    kwargs = dict(histories=case.histories, mask_history=True, ks=case.ks, item_chunk=case.item_chunk)
    fast = rank_targets(*args, **kwargs)
    exact = onepass.owner_scores

    def off_by_one_ulp(q_all, rows, users):
        out = exact(q_all, rows, users)
        out[0] = torch.nextafter(out[0], torch.tensor(math.inf))
        return out

    monkeypatch.setattr(onepass, "owner_scores", off_by_one_ulp)
    before = dict(onepass.CALLS)
    slow = rank_targets(*args, **kwargs)
    assert onepass.CALLS["fallback"] == before["fallback"] + 1
    assert torch.equal(fast.ranks, slow.ranks) and torch.equal(fast.ties_count, slow.ties_count)
    assert torch.equal(fast.target_scores, slow.target_scores)


def test_compiled_counts_equal_the_two_pass_count(monkeypatch) -> None:
    """The fused (torch.compile) compare-and-count that large catalogs use gives the integers of
    the two-pass path, on every case (tests run small catalogs, which count eagerly otherwise)."""
    from recsys_dist.eval import onepass

    monkeypatch.setattr(onepass, "COMPILE_MIN_SCORES", 0)
    for name in CASES:
        case = make_case(name)
        block = popularity_block(case.counts, 0, case.num_rows) if case.counts is not None else case.items
        args = (case.queries, case.targets, block, 0, case.num_rows)
        kwargs = dict(histories=case.histories, mask_history=case.mask_history, ks=case.ks,
                      item_chunk=case.item_chunk)
        two_pass = rank_targets(*args, topk=1, **kwargs)
        one_pass = rank_targets(*args, **kwargs)
        assert torch.equal(one_pass.ranks, two_pass.ranks), name
        assert torch.equal(one_pass.ties_count, two_pass.ties_count), name
    assert onepass._compiled not in (None, False)  # it did compile (a failure counts eagerly)


def test_inputs_that_require_grad_are_ranked() -> None:
    """A caller evaluating with grad mode on (queries or rows that require grad) gets the same
    ranks as with detached inputs (the one pass matmuls into a reused buffer, without autograd)."""
    case = make_case("randn")
    items = case.items.clone().requires_grad_(True)
    queries = case.queries.clone().requires_grad_(True)
    with_grad = rank_targets(queries, case.targets, items, 0, case.num_rows, ks=case.ks)
    plain = rank_targets(case.queries, case.targets, case.items, 0, case.num_rows, ks=case.ks)
    assert torch.equal(with_grad.ranks, plain.ranks) and torch.equal(with_grad.ties_count, plain.ties_count)
