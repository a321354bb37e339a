"""Eval noise: counter-based per-user normal streams (recsys_dist/noise.py, ``eval.noise:
counter``) and the per-user ``torch.Generator`` loop they replace (``eval.noise: generator``).

A user's noise is a function of (seed, user) only: the same in any batch, at any row, beside
any users, on any world size. The compiled kernel and the eager ops agree bit for bit; the
values pass moment and Kolmogorov-Smirnov checks against N(0, 1) that broken generators fail;
different users' and seeds' streams are uncorrelated; successive draws continue each stream.
"""

from __future__ import annotations

import math

import pytest
import torch

from distributed_harness import run_distributed
from model_checks import small_model_config
from recsys_dist import noise as nz
from recsys_dist.config import JobConfig, stream_seed, stored_config_as_now
from recsys_dist.models import build_model
from recsys_dist.train.validate import eval_noise

L, D = 6, 16


def _model(name: str = "dreamrec"):
    cfg = small_model_config(name, dim=D, num_heads=2, dropout=0.0, emb_dropout=0.0, diffusion_steps=8,
                             sample_steps=4)
    torch.manual_seed(0)
    return build_model(cfg, L).eval()


def _streams(seed, users, purpose="eval-noise"):
    return nz.UserNormalStreams(seed, purpose, torch.as_tensor(users), compiled=False)


# ---------------------------------------------------------------- statistics (no scipy here)

def ks_statistic(x: torch.Tensor) -> float:
    """sqrt(n) * sup |F_n - Phi|: asymptotically Kolmogorov-distributed under N(0, 1)."""
    x, _ = torch.sort(x.double().flatten())
    n = x.numel()
    cdf = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return math.sqrt(n) * max(float((i / n - cdf).max()), float((cdf - (i - 1) / n).max()))


def looks_standard_normal(x: torch.Tensor) -> bool:
    """Mean, variance, skewness and excess kurtosis within 5 standard errors of N(0, 1)'s, and
    the KS statistic below 1.95 (p = 0.001)."""
    x = x.double().flatten()
    n = x.numel()
    mean = float(x.mean())
    c = x - mean
    var = float(c.square().mean())
    if var <= 0:
        return False
    skew = float((c ** 3).mean()) / var ** 1.5
    kurt = float((c ** 4).mean()) / var ** 2 - 3.0
    return (abs(mean) < 5 / math.sqrt(n) and abs(var - 1) < 5 * math.sqrt(2 / n)
            and abs(skew) < 5 * math.sqrt(6 / n) and abs(kurt) < 5 * math.sqrt(24 / n)
            and ks_statistic(x) < 1.95)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------- the construction

def _hash32_reference(x: int) -> int:
    """lowbias32 on Python's unbounded ints (the tensor version must never overflow)."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def _feistel_reference(hi: int, lo: int, k0: int, k1: int, rounds: int) -> tuple[int, int]:
    for r in range(rounds):
        hi, lo = lo, hi ^ _hash32_reference(lo ^ (k0 if r % 2 == 0 else k1) ^ nz.ROUND_CONSTANTS[r])
    return hi, lo


def test_the_integers_follow_the_documented_construction() -> None:
    words = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 123456789] + torch.randint(0, 1 << 32, (200,)).tolist()
    assert nz.hash32(torch.tensor(words)).tolist() == [_hash32_reference(w) for w in words]
    # one user's key and first blocks, and their Box-Muller values, in plain Python
    seed, user = 2024, 987654321012
    key = stream_seed(seed, "counter:eval-noise")
    s0, s1 = _feistel_reference(user >> 32, user & 0xFFFFFFFF, key >> 32, key & 0xFFFFFFFF, nz.KEY_ROUNDS)
    expect = []
    for p in range(6):
        w0, w1 = _feistel_reference(0, p, s0, s1, nz.ROUNDS)
        u1, u2 = (2 * (w0 >> 8) + 1) / 2 ** 25, (2 * (w1 >> 8) + 1) / 2 ** 25
        r = math.sqrt(-2 * math.log(u1))
        expect += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    got = nz.randn((1, 12), _streams(seed, [user]))[0].double()
    assert torch.allclose(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_randn_with_a_generator_is_torch_randn() -> None:
    a = nz.randn((3, 4, 5), torch.Generator().manual_seed(9))
    assert torch.equal(a, torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError, match="batch size"):
        nz.randn((4, 5), _streams(1, [1, 2, 3]))


# ---------------------------------------------------------------- batching / world-size independence

def test_a_users_noise_does_not_depend_on_its_batch() -> None:
    users = torch.tensor([17, 3, 1 << 40, 0, 999, 5])
    whole = _streams(7, users)
    ref = nz.randn((6, 4, 9), whole)
    for order in ([5, 0, 2], [2], [4, 1, 3, 0, 5, 2]):
        part = nz.randn((len(order), 4, 9), _streams(7, users[order]))
        assert torch.equal(part, ref[order]), order
    other = nz.randn((3, 4, 9), _streams(7, torch.tensor([3, 12345, 17])))  # beside other users
    assert torch.equal(other[0], ref[1]) and torch.equal(other[2], ref[0])
    assert not torch.equal(nz.randn((6, 4, 9), _streams(8, users)), ref)  # another seed: other noise
    assert not torch.equal(nz.randn((6, 4, 9), _streams(7, users, "other")), ref)  # another purpose


@pytest.mark.parametrize("name", ["dreamrec", "diffurec", "dimerec", "areal"])
@pytest.mark.parametrize("kind", ["counter", "generator"])
def test_eval_noise_is_per_user_for_every_model(name, kind) -> None:
    model = _model(name)
    users = torch.tensor([11, 4, 250, 7, 3])
    whole = eval_noise(model, users, L, 2024, kind)
    assert whole and all(v.shape[0] == 5 and v.dtype == torch.float32 for v in whole.values())
    for part in ([3, 1], [4], [0, 2, 1, 3, 4]):  # any split over ranks / batches, any order
        got = eval_noise(model, users[part], L, 2024, kind)
        for k in whole:
            assert torch.equal(got[k], whole[k][part]), (k, part)
    empty = eval_noise(model, users[:0], L, 2024, kind)
    assert {k: v.shape[1:] for k, v in empty.items()} == {k: v.shape[1:] for k, v in whole.items()}
    assert all(v.shape[0] == 0 for v in empty.values())


def test_successive_draws_continue_each_stream() -> None:
    users = torch.tensor([2, 8, 1000003])
    one = nz.randn((3, 8), _streams(5, users))
    st = _streams(5, users)
    assert torch.equal(torch.cat([nz.randn((3, 3), st), nz.randn((3, 5), st)], dim=1), one)
    st = _streams(5, users)  # odd offsets and a draw of one value
    parts = [nz.randn((3, 1), st), nz.randn((3, 2), st), nz.randn((3,), st)[:, None], nz.randn((3, 4), st)]
    assert torch.equal(torch.cat(parts, dim=1), one)
    assert st.offset == 8
    # a model's draws are one stream: x_T then eps, as the per-user generator drew them
    model = _model("dreamrec")
    noise = model.draw_eval_noise(3, L, _streams(5, users))
    flat = nz.randn((3, D * 5), _streams(5, users))
    assert torch.equal(noise["x_T"], flat[:, :D]) and torch.equal(noise["eps"].reshape(3, -1), flat[:, D:])


def test_generator_mode_is_the_old_loop_bit_for_bit() -> None:
    model = _model("diffurec")
    users = torch.tensor([9, 1, 77])
    parts = [model.draw_eval_noise(1, L, torch.Generator().manual_seed(stream_seed(2025, "eval-noise", int(u))))
             for u in users]
    old = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    new = eval_noise(model, users, L, 2025, "generator")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert all(torch.equal(old[k], eval_noise(model, users, L, 2025)[k]) for k in old)  # the default
    counter = eval_noise(model, users, L, 2025, "counter")  # other values
    assert not torch.equal(counter["x_T"], old["x_T"])
    with pytest.raises(ValueError, match="unknown eval noise"):
        eval_noise(model, users, L, 2025, "philox")


def test_configs_stored_before_the_field_read_as_the_generator_loop() -> None:
    assert JobConfig().eval.noise == "generator"  # the default: what every earlier run used
    old = JobConfig().to_dict()
    del old["eval"]["noise"]
    assert stored_config_as_now(old)["eval"]["noise"] == "generator"


# ---------------------------------------------------------------- compiled == eager

def test_compiled_kernel_equals_the_eager_ops(monkeypatch) -> None:
    """The fused torch.compile kernel (large draws) gives the eager ops' values bit for bit, on
    batch sizes and lengths that dynamo would specialise (0/1/equal) and odd offsets."""
    monkeypatch.setattr(nz, "COMPILE_MIN_VALUES", 0)
    users = torch.tensor([5, 1 << 33, 17, 2, 99, 123456, 0])
    for b in (7, 1, 2):
        eager = nz.UserNormalStreams(3, "eval-noise", users[:b], compiled=False)
        comp = nz.UserNormalStreams(3, "eval-noise", users[:b])  # by size: compiled here
        for rest in [(16,), (3,), (4, 16), (1,), (2, 3, 5), (b // 2 + 1,)]:
            a, c = nz.randn((b, *rest), eager), nz.randn((b, *rest), comp)
            assert torch.equal(a, c), (b, rest, int((a != c).sum()))
    assert nz._compiled not in (None, False)  # it did compile (a failure draws eagerly)
    key, column = torch.tensor([5, 1 << 31]), torch.tensor([[3], [1 << 50], [7], [0]])
    for b, p in [(1, 1), (1, 5), (3, 3), (4, 2), (2, 2)]:  # padded so that dynamo never specialises
        pairs = torch.arange(10, 10 + p)
        assert torch.equal(nz._blocks(column[:b], key, pairs, True), nz.normal_blocks(column[:b], key, pairs))
    big = torch.arange(300)  # and one draw of 1e5 values
    assert torch.equal(nz.randn((300, 333), nz.UserNormalStreams(4, "x", big, compiled=True)),
                       nz.randn((300, 333), nz.UserNormalStreams(4, "x", big, compiled=False)))


def test_eager_chunks_and_devices_give_the_same_values(monkeypatch) -> None:
    users = torch.arange(3, 300, 11)
    ref = nz.randn((len(users), 5, 7), _streams(9, users))
    monkeypatch.setattr(nz, "EAGER_CHUNK_PAIRS", 20)  # several users per chunk, and one
    assert torch.equal(nz.randn((len(users), 5, 7), _streams(9, users)), ref)
    monkeypatch.setattr(nz, "EAGER_CHUNK_PAIRS", 1)
    assert torch.equal(nz.randn((len(users), 5, 7), _streams(9, users)), ref)
    if torch.cuda.is_available():  # exact float32 + and * and integer ops: the same bits on a GPU
        gpu = nz.randn((len(users), 5, 7), nz.UserNormalStreams(9, "eval-noise", users, device="cuda"))
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), ref)


# ---------------------------------------------------------------- the distribution

def test_values_are_standard_normal_and_broken_generators_fail(monkeypatch) -> None:
    x = nz.randn((1000, 1000), _streams(11, torch.arange(1000)))  # 1e6 values, 1000 users
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert looks_standard_normal(x), (ks_statistic(x), float(x.mean()), float(x.var()))
    assert float(x.abs().max()) < math.sqrt(2 * 25 * math.log(2))  # Box-Muller's bound from 24 bits
    # what a broken generator gives fails the same checks
    assert not looks_standard_normal(torch.zeros(10 ** 6))
    uniform = (torch.rand(10 ** 6, generator=torch.Generator().manual_seed(0)) - 0.5) * math.sqrt(12)
    assert not looks_standard_normal(uniform)  # mean 0, variance 1, but not normal
    assert not looks_standard_normal(x * 1.01)  # 1 % too wide
    assert not looks_standard_normal(x + 0.01)  # shifted
    assert not looks_standard_normal(x.abs() * torch.sign(x - 0.1))  # signs skewed
    # so does this construction with one Feistel round (too weak to mix the counter)
    monkeypatch.setattr(nz, "ROUNDS", 1)
    assert not looks_standard_normal(nz.randn((100, 1000), _streams(11, torch.arange(100))))


def test_users_seeds_and_positions_are_uncorrelated() -> None:
    n = 100_000
    bound = 5 / math.sqrt(n)
    a = nz.randn((4, n), _streams(11, torch.tensor([0, 1, 2, 1 << 32])))
    b = nz.randn((1, n), _streams(12, torch.tensor([0])))
    pairs = {"users 0/1": (a[0], a[1]), "users 1/2": (a[1], a[2]), "users 0/2^32": (a[0], a[3]),
             "seeds 11/12": (a[0], b[0]), "lag 1": (a[0, :-1], a[0, 1:]), "lag 2": (a[0, :-2], a[0, 2:]),
             "pair cos/sin": (a[0, 0::2], a[0, 1::2]), "pair squares": (a[0, 0::2] ** 2, a[0, 1::2] ** 2)}
    for name, (x, y) in pairs.items():
        assert abs(corr(x, y)) < bound, (name, corr(x, y))
    # the check sees a systematic relation: a user-blind stream, a weak lag-1 dependence
    assert abs(corr(a[0], nz.randn((1, n), _streams(11, torch.tensor([7])))[0])) < bound
    assert corr(a[0], nz.randn((1, n), _streams(11, torch.tensor([0])))[0]) == pytest.approx(1.0)
    z = a[0, 1:] + 0.1 * a[0, :-1]
    assert abs(corr(z[:-1], z[1:])) > 2 * bound


# ---------------------------------------------------------------- end to end: the evaluator, 1 vs 2 ranks

ROWS, USERS = 301, 37


def _evaluate(batch_size: int, kind: str):
    from recsys_dist.config import EvalConfig, SparseConfig
    from recsys_dist.distributed import init_distributed, seed_everything
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.train.validate import evaluate_model

    rank, world = init_distributed(torch.device("cpu"))
    seed_everything(0)
    model = _model("dreamrec")
    table = ShardedItemTable.create(ROWS, D, SparseConfig(), torch.device("cpu"), batch_size, seed=5)
    g = torch.Generator().manual_seed(1)
    history = torch.randint(1, ROWS, (USERS, L), generator=g)
    target = torch.randint(1, ROWS, (USERS,), generator=g)
    mine = torch.arange(rank, USERS, world)  # this rank's users
    batches = [{"history": history[u], "target": target[u], "user": u + 1000, "seen": history[u]}
               for u in mine.split(batch_size)]
    noise = {int(u): v for bt in batches
             for u, v in zip(bt["user"], eval_noise(model, bt["user"], L, 2024, kind)["x_T"])}
    cfg = EvalConfig(ks=(1, 10, 100, 250), noise=kind)  # deep cut-offs: most users' ranks count
    return {"metrics": evaluate_model(model, table, batches, cfg, L), "noise": noise}


def test_the_evaluator_gives_the_same_metrics_on_any_world_size() -> None:
    """DreamRec's queries follow its noise closely, so equal metrics on 1 rank (batches of 5)
    and 2 ranks (batches of 3, an uneven split) need every user to draw the same noise."""
    one = run_distributed(_evaluate, 1, 5, "counter")[0]
    two = run_distributed(_evaluate, 2, 3, "counter")
    assert one["metrics"]["num_users"] == USERS
    assert two[0]["metrics"] == two[1]["metrics"] == one["metrics"]
    merged = {**two[0]["noise"], **two[1]["noise"]}
    assert merged.keys() == one["noise"].keys()
    assert all((merged[u] == one["noise"][u]).all() for u in merged)
