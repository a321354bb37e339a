"""Tests of the synthetic dataset generator (shards/synthetic.py): format, determinism, learnability,
popularity skew, streaming memory, and the ``python -m shards synth`` CLI. All configs are small."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from webdataset import TarWriter

from shards import ShardReader, load_manifest, verify_shards
from shards.build import split_samples
from shards.schema import encode_sample, make_key
from shards.synthetic import (
    Catalog,
    SynthConfig,
    _FastTar,
    fast_tar_matches_tarwriter,
    generate_chunk,
    iter_chunks,
    synth_shards,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# main fixture: small catalog, several chunks and shards per split
SMALL = dict(num_items=3000, num_users=1200, min_seq_len=3, max_seq_len=25, num_interests=30, seed=3)
MAX_LEN = 8
CHUNK = 500
PER_SHARD = 1000


def _make(out, **kw):
    args = {**SMALL, "max_len": MAX_LEN, "samples_per_shard": PER_SHARD, "chunk_users": CHUNK, "progress": False}
    args.update(kw)
    return synth_shards(str(out), **args)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "small"
    return str(out), _make(out)


def _read(out, split, **kw):
    rows = []
    for b in ShardReader(out, split, 256, **kw):
        for h, t, u in zip(b["history"].tolist(), b["target"].tolist(), b["user"].tolist()):
            rows.append((u, t, tuple(x for x in h if x != 0)))
    return rows


def _sequences(cfg: SynthConfig, chunk_users: int):
    """Regenerate every user's full sequence through the public chunk API."""
    seqs = []
    for ch in iter_chunks(cfg, Catalog.from_config(cfg), chunk_users):
        seqs += [ch.items[ch.offsets[u]:ch.offsets[u + 1]].tolist() for u in range(ch.lengths.size)]
    return seqs


def _cfg(**kw):
    return SynthConfig(**{**SMALL, **kw})


# --------------------------------------------------------------------------- format


def test_round_trip_through_reader(small):
    out, m = small
    m2 = load_manifest(out)
    assert m2["protocol"] == "leave_one_out" and m2["min_history_len"] == 1 and m2["max_len"] == MAX_LEN
    assert m2["num_items"] == SMALL["num_items"] and m2["num_users"] == SMALL["num_users"]
    assert verify_shards(out)["problems"] == []
    seqs = _sequences(_cfg(), CHUNK)
    assert len(seqs) == SMALL["num_users"]
    lengths = np.array([len(s) for s in seqs])
    assert lengths.min() >= SMALL["min_seq_len"] and lengths.max() <= SMALL["max_seq_len"]
    expected = {}
    for split, (us, js) in split_samples(lengths).items():
        expected[split] = Counter(
            (int(u), seqs[u][j - 1], tuple(seqs[u][max(0, j - 1 - MAX_LEN):j - 1])) for u, j in zip(us, js))
    for split in ("train", "val", "test"):
        rows = _read(out, split)
        assert len(rows) == m["splits"][split]["num_samples"] == sum(sh["num_samples"] for sh in m["splits"][split]["shards"])
        assert Counter(rows) == expected[split], split
        for u, t, h in rows:
            assert 1 <= t <= SMALL["num_items"] and 1 <= len(h) <= MAX_LEN
            assert all(1 <= x <= SMALL["num_items"] for x in h)
        if split != "train":  # one per user, in user order
            assert [r[0] for r in rows] == list(range(SMALL["num_users"]))
    assert len(m["splits"]["train"]["shards"]) > 2
    # train: shuffled, but only within chunks of CHUNK users (written chunk after chunk)
    users = [r[0] for r in _read(out, "train")]
    chunk_of = [u // CHUNK for u in users]
    assert chunk_of == sorted(chunk_of)
    assert users != sorted(users)


def test_item_counts_are_exact_train_counts(small):
    out, m = small
    counts = np.load(os.path.join(out, m["train_item_counts_file"]))
    assert counts.dtype == np.int64 and counts.shape == (SMALL["num_items"] + 1,) and counts[0] == 0
    ref = np.zeros_like(counts)
    for s in _sequences(_cfg(), CHUNK):
        for x in s[:-2]:  # s_1..s_{n-2}
            ref[x] += 1
    np.testing.assert_array_equal(counts, ref)
    assert m["stats"]["train_interactions"] == int(ref.sum())
    with open(os.path.join(out, m["id_map_file"])) as f:
        assert json.load(f)["identity"] is True


def test_train_prefixes_per_user_and_compress(tmp_path):
    m = _make(tmp_path / "k2", train_prefixes_per_user=2, compress=True, num_users=300)
    out = str(tmp_path / "k2")
    assert all(sh["name"].endswith(".tar.gz") for s in m["splits"].values() for sh in s["shards"])
    rows = _read(out, "train")
    per_user = Counter(u for u, _, _ in rows)
    assert max(per_user.values()) == 2
    assert len(rows) == m["splits"]["train"]["num_samples"]
    assert len(_read(out, "test")) == len(_read(out, "val")) == 300


def test_fast_tar_writer_is_byte_identical_to_tarwriter():
    assert fast_tar_matches_tarwriter()
    rng = np.random.default_rng(0)
    samples = [(s, int(u), int(j), rng.integers(1, 2**31 - 1, size=int(n)).astype("<i4"), int(t))
               for s, u, j, n, t in zip(rng.choice(["train", "val", "test"], 60), rng.integers(0, 10**8, 60),
                                        rng.integers(2, 10**5, 60), rng.integers(1, 300, 60),
                                        rng.integers(1, 2**31 - 1, 60))]
    a, b = io.BytesIO(), io.BytesIO()
    with TarWriter(a, encoder=False, mtime=0, compress=False, user="recsys", group="recsys") as tw:
        for s, u, j, h, t in samples:
            tw.write(encode_sample(s, u, j, h, t))
    ft = _FastTar(b)
    for s, u, j, h, t in samples:
        ft.write(make_key(s, u, j), h.tobytes(), t, u)
    ft.close()
    assert a.getvalue() == b.getvalue()


# --------------------------------------------------------------------------- determinism / idempotency


def _digest(m):
    return {s: [(sh["name"], sh["sha256"], sh["bytes"]) for sh in v["shards"]] for s, v in m["splits"].items()}


def test_deterministic_by_seed(tmp_path):
    kw = dict(num_users=400)
    a, b, c = (_make(tmp_path / n, **kw, **({"seed": 4} if n == "c" else {})) for n in ("a", "b", "c"))
    assert _digest(a) == _digest(b)
    with open(tmp_path / "a" / "item_counts.npy", "rb") as fa, open(tmp_path / "b" / "item_counts.npy", "rb") as fb:
        assert fa.read() == fb.read()
    assert _digest(a)["test"] != _digest(c)["test"]
    with open(tmp_path / "a" / "manifest.json") as fa, open(tmp_path / "b" / "manifest.json") as fb:
        assert fa.read() == fb.read()


def test_idempotent_and_force(tmp_path):
    out = tmp_path / "x"
    m = _make(out, num_users=200)
    shard = out / m["splits"]["test"]["shards"][0]["name"]
    t0 = os.stat(shard).st_mtime_ns
    assert _make(out, num_users=200) == m
    assert os.stat(shard).st_mtime_ns == t0
    # other parameters -> rebuilt; stale shards of the bigger earlier build are removed
    m2 = _make(out, num_users=200, samples_per_shard=100)
    assert len(m2["splits"]["train"]["shards"]) > len(m["splits"]["train"]["shards"])
    m3 = _make(out, num_users=200)
    assert _digest(m3) == _digest(m)
    names = {sh["name"] for s in m3["splits"].values() for sh in s["shards"]}
    assert {p for p in os.listdir(out) if ".tar" in p} == names
    _make(out, num_users=200, force=True)
    assert os.stat(shard).st_mtime_ns != t0


# --------------------------------------------------------------------------- statistics


def _hr_oracle_vs_pop(cfg, k=10):
    """HR@k on the last item: cluster oracle (top-k by train count within the last history item's
    cluster) vs global popularity (top-k by train count)."""
    cat = Catalog.from_config(cfg)
    ch = generate_chunk(cfg, cat, 0, 0, cfg.num_users)
    pos = np.arange(ch.items.size) - np.repeat(ch.offsets[:-1], ch.lengths)
    counts = np.bincount(ch.items[pos < np.repeat(ch.lengths - 2, ch.lengths)], minlength=cfg.num_items + 1)
    counts[0] = 0
    cluster = cat.item_cluster()
    order = np.argsort(-counts, kind="stable")
    order = order[order > 0]
    top_in = {c: set(order[cluster[order] == c][:k].tolist()) for c in range(cfg.num_interests)}
    last, target = ch.items[ch.offsets[1:] - 2], ch.items[ch.offsets[1:] - 1]
    pop = set(order[:k].tolist())
    hr_pop = float(np.mean([t in pop for t in target.tolist()]))
    hr_oracle = float(np.mean([t in top_in[cluster[l]] for l, t in zip(last.tolist(), target.tolist())]))
    return hr_oracle, hr_pop


def test_interest_oracle_beats_popularity_on_generated_test_split(small):
    """The same check on the shards: test split read back, counts from item_counts.npy."""
    out, m = small
    cfg = _cfg()
    cluster = Catalog.from_config(cfg).item_cluster()
    counts = np.load(os.path.join(out, "item_counts.npy"))
    order = np.argsort(-counts, kind="stable")
    order = order[order > 0]
    top_in = {c: set(order[cluster[order] == c][:10].tolist()) for c in range(cfg.num_interests)}
    pop = set(order[:10].tolist())
    rows = _read(out, "test")
    hr_pop = np.mean([t in pop for _, t, _ in rows])
    hr_oracle = np.mean([t in top_in[cluster[h[-1]]] for _, t, h in rows])
    assert hr_oracle > 2 * hr_pop and hr_oracle - hr_pop > 0.2, (hr_oracle, hr_pop)


def test_learnable_signal_comes_from_interest_persistence():
    base = dict(num_items=5000, num_users=3000, num_interests=50, min_seq_len=5, max_seq_len=30, seed=1)
    hr_oracle, hr_pop = _hr_oracle_vs_pop(SynthConfig(**base))
    assert hr_oracle > 2 * hr_pop and hr_oracle - hr_pop > 0.2, (hr_oracle, hr_pop)
    # negative control: interest re-drawn from scratch every step -> last item's cluster says nothing
    hr_oracle, hr_pop = _hr_oracle_vs_pop(SynthConfig(**base, drift=1.0, p_new_interest=1.0))
    assert hr_oracle < hr_pop + 0.03, (hr_oracle, hr_pop)


def test_zipf_skew_and_permuted_popularity():
    cfg = SynthConfig(num_items=10000, num_users=4000, num_interests=40, min_seq_len=5, max_seq_len=40, seed=2)
    cat = Catalog.from_config(cfg)
    ch = generate_chunk(cfg, cat, 0, 0, cfg.num_users)
    counts = np.bincount(ch.items, minlength=cfg.num_items + 1)[1:]
    top = cfg.num_items // 100
    share = np.sort(counts)[::-1][:top].sum() / counts.sum()
    p = cat.item_probability()
    assert p[0] == 0 and abs(p.sum() - 1) < 1e-9
    theory = np.sort(p)[::-1][:top].sum()
    assert share > 0.3, share  # top 1% of items get about a third of all interactions (alpha 1.1, b 10)
    assert abs(share - theory) < 0.05, (share, theory)  # marginal is the global Zipf law
    assert np.corrcoef(counts, p[1:])[0, 1] > 0.95
    top_ids = np.argsort(-p)[:100]
    assert top_ids.mean() > cfg.num_items / 5  # popularity is not id order
    # a flatter law gives less skew
    flat = SynthConfig(**{**cfg.__dict__, "zipf_alpha": 0.3})
    cf = np.bincount(generate_chunk(flat, Catalog.from_config(flat), 0, 0, 2000).items, minlength=cfg.num_items + 1)
    assert np.sort(cf)[::-1][:top].sum() / cf.sum() < share / 2


def test_catalog_sampling_stays_in_cluster():
    cat = Catalog(2000, 7, 1.1, 0.0, 0)
    assert sorted(cat.items.tolist()) == list(range(1, 2001))
    cluster = cat.item_cluster()
    rng = np.random.default_rng(0)
    cs = rng.integers(0, 7, 5000)
    assert (cluster[cat.sample_items(rng, cs)] == cs).all()
    # more clusters than a few items can fill: empty clusters are never drawn
    tiny = Catalog(50, 40, 1.1, 0.0, 0)
    empty = np.flatnonzero(np.diff(tiny.start) == 0)
    assert empty.size > 0
    drawn = tiny.sample_clusters(rng, 20000)
    assert not np.isin(drawn, empty).any()
    assert (tiny.item_cluster()[tiny.sample_items(rng, drawn)] == drawn).all()


# --------------------------------------------------------------------------- streaming memory


def test_chunks_are_bounded():
    cfg = _cfg(num_users=1234)
    sizes = [c.lengths.size for c in iter_chunks(cfg, Catalog.from_config(cfg), 500)]
    assert sizes == [500, 500, 234]


def test_peak_memory_does_not_grow_with_users(tmp_path):
    """Peak traced (Python + numpy) memory of a whole run with 4x the users stays within 60 kB (measured
    difference ~7 kB): anything retained per user beyond ~10 bytes (6000 extra users) would exceed it.
    A warm-up run first, so one-off import / cache allocations are not counted."""
    def peak(users):
        tracemalloc.start()
        synth_shards(str(tmp_path / f"u{users}"), num_items=20000, num_users=users, num_interests=50,
                     min_seq_len=3, max_seq_len=4, max_len=4, samples_per_shard=1000, chunk_users=500,
                     progress=False)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    peak(500)
    peaks = [peak(2000), peak(8000)]
    assert peaks[1] < peaks[0] + 60_000, peaks


# --------------------------------------------------------------------------- CLI


def test_cli_synth_and_verify(tmp_path):
    out = str(tmp_path / "cli")
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "shards", "synth", "--out", out, "--num-items", "2_000", "--num-users", "150",
           "--min-seq-len", "4", "--max-seq-len", "12", "--max-len", "5", "--num-interests", "20",
           "--zipf-alpha", "1.2", "--drift", "0.2", "--samples-per-shard", "300", "--seed", "7", "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "150 users, 2000 items" in r.stdout
    m = load_manifest(out)
    assert m["build"]["synthetic"]["zipf_alpha"] == 1.2 and m["build"]["synthetic"]["seed"] == 7
    assert m["splits"]["test"]["num_samples"] == 150 and m["max_len"] == 5
    r = subprocess.run([sys.executable, "-m", "shards", "verify", out], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "ok:" in r.stdout, r.stderr
    bad = subprocess.run(cmd[:-1] + ["--min-seq-len", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "min_seq_len must be >= 3" in bad.stderr
