"""Synthetic ``recsys-dist/seq-v2`` datasets: Zipf popularity, interest clusters, drifting users.

``python -m shards synth`` / :func:`synth_shards` writes leave-one-out records through the
same writer as every dataset (:func:`shards.build.write_shards`), so training, evaluation
and the popularity baseline read them unchanged. It needs no raw data, so it scales the
catalog (default 10M items) and the user count freely.

Generative process (all randomness from ``numpy.random.default_rng`` seeded
with ``seed``; the same arguments give byte-identical shards):

1. **Catalog.** Item ids ``1..N`` get popularity ranks by a random permutation
   (so popularity is not id order); rank ``r = 1..N`` has weight
   ``w_r = (r + b)^-alpha`` (Zipf-Mandelbrot; ``zipf_alpha``, ``zipf_offset``).
   Every rank is assigned to one of ``C = num_interests`` interest clusters
   uniformly at random (cluster sizes ~N/C, masses ``W_c = sum of w_r in c``
   vary: a cluster holding a head item is heavy). Sampling "Zipf within
   cluster ``c``" is a ``searchsorted`` in the global cumulative weights
   restricted to ``c``'s slice; sampling a cluster "by popularity" is one
   ``∝ W_c``. Drawing a cluster ``∝ W_c`` and then an item within it is exactly
   a draw from the global Zipf law.
2. **Users** (i.i.d.). Sequence length ``n`` log-uniform in
   ``[min_seq_len, max_seq_len]``. ``interests_per_user`` clusters drawn
   ``∝ W_c`` (with replacement). The *current interest* at step 1 is one of
   them uniformly; at every later step, with probability ``drift`` it is
   re-drawn: with probability ``p_new_interest`` a fresh cluster ``∝ W_c``
   (an excursion outside the user's set), otherwise uniformly one of the
   user's own clusters (possibly the same one: the effective switch rate among
   own interests is ``drift * (K - 1) / K``). Otherwise it is kept.
3. **Items.** At each step the item is, with probability ``p_popular``, a draw
   from the global Zipf law (a popular "distractor"; the interest is not
   changed), otherwise a Zipf draw within the current interest's cluster.
   Repeats are possible (re-consumption).

So the marginal item distribution is the global Zipf law (up to the user-level
mixing), which makes the popularity ranker a meaningful baseline, while the
next item depends on the current interest, which persists with probability
about ``1 - drift``: "the most popular items of the last item's cluster" beats
global popularity by a wide margin (``tests/test_synthetic.py`` checks it), and
a sequential model has to learn item clusters from co-occurrence to do so.

Splits are leave-one-out (test = last item, valid = second-to-last, train = the rest;
``min_seq_len >= 3`` so every user has a valid and a test item); the samples are made at
read time (:mod:`shards.samples`), so ``max_len`` is not a build parameter.

Streaming and memory. Users are generated in chunks of ``chunk_users`` (default 10,000)
that go straight into the block writer, so memory does not grow with the number of users.
It does grow with the catalog (O(num_items)): 20 bytes per item stay resident (item ids
grouped by cluster, int32; their cumulative weights, float64; the two count arrays of the
manifest, int64 each: ~360 MB at 10M items).

"Byte-identical" holds for the same arguments, numpy version and CPU family:
numpy's SIMD ``power`` / ``log`` / ``exp`` may differ in the last ulp across
platforms, which can move a rare draw across a boundary.

"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, Optional

import numpy as np

from .build import DEFAULT_BLOCKS_PER_SHARD, DEFAULT_RECORDS_PER_BLOCK, up_to_date, write_shards
from .format import FORMAT
from .records import Records

log = logging.getLogger(__name__)

SYNTH_VERSION = 2
DATASET_NAME = "synthetic"
DEFAULT_CHUNK_USERS = 10_000


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generative process (see the module docstring).

    Attributes:
        num_items: catalog size N (item ids ``1..N``).
        num_users: number of users U (user indices ``0..U-1``).
        min_seq_len, max_seq_len: bounds of the log-uniform sequence length (``min_seq_len >= 3``).
        zipf_alpha: Zipf exponent of the rank weights ``(r + b)^-alpha``.
        zipf_offset: ``b`` (>= 0); larger flattens the head.
        num_interests: number of interest clusters C of the catalog (``<= num_items``).
        interests_per_user: clusters each user holds (K).
        drift: per-step probability that the current interest is re-drawn.
        p_new_interest: probability that a re-draw is a fresh cluster outside the user's set.
        p_popular: per-step probability of a global-Zipf (popular) item.
        seed: seed of everything (catalog, users, train shuffle).
    """

    num_items: int = 10_000_000
    num_users: int = 100_000
    min_seq_len: int = 5
    max_seq_len: int = 50
    zipf_alpha: float = 1.1
    zipf_offset: float = 10.0
    num_interests: int = 1000
    interests_per_user: int = 3
    drift: float = 0.1
    p_new_interest: float = 0.1
    p_popular: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid parameter."""
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.num_items > np.iinfo(np.int32).max:
            raise ValueError(f"num_items must fit int32, got {self.num_items}")
        if self.num_users < 1:
            raise ValueError(f"num_users must be >= 1, got {self.num_users}")
        if self.min_seq_len < 3:
            raise ValueError(f"min_seq_len must be >= 3 (every user needs a val and a test item), got {self.min_seq_len}")
        if self.max_seq_len < self.min_seq_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be >= min_seq_len ({self.min_seq_len})")
        if not self.zipf_alpha > 0:
            raise ValueError(f"zipf_alpha must be > 0, got {self.zipf_alpha}")
        if not self.zipf_offset >= 0:
            raise ValueError(f"zipf_offset must be >= 0, got {self.zipf_offset}")
        if not 1 <= self.num_interests <= self.num_items:
            raise ValueError(f"num_interests must be in 1..num_items, got {self.num_interests}")
        if self.interests_per_user < 1:
            raise ValueError(f"interests_per_user must be >= 1, got {self.interests_per_user}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for k in ("drift", "p_new_interest", "p_popular"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v}")


# --------------------------------------------------------------------------- catalog


class Catalog:
    """Item popularity and interest clusters of a synthetic catalog (O(num_items) memory).

    Attributes:
        num_items, num_interests: N and C.
        items: int32 (N,), item ids grouped by cluster, within a cluster by
            descending popularity (ascending rank).
        cum: float64 (N,), cumulative rank weights in the order of ``items``.
        start: int64 (C + 1,), cluster ``c`` is ``items[start[c]:start[c + 1]]``.
        lo, mass: float64 (C,), ``cum`` just before cluster ``c`` and its total weight ``W_c``.
        cluster_cum: float64 (C,), cumulative cluster masses (``cluster_cum[-1]`` = total).
    """

    def __init__(self, num_items: int, num_interests: int, zipf_alpha: float, zipf_offset: float, seed: int) -> None:
        n, c = int(num_items), int(num_interests)
        rng = np.random.default_rng([int(seed), 0])
        item_of_rank = np.arange(1, n + 1, dtype=np.int32)
        rng.shuffle(item_of_rank)  # item_of_rank[r - 1] = item id of popularity rank r
        key_dtype = np.int16 if c <= np.iinfo(np.int16).max else np.int32
        cluster_of_rank = rng.integers(0, c, size=n, dtype=key_dtype)
        sizes = np.bincount(cluster_of_rank, minlength=c)
        order = np.argsort(cluster_of_rank, kind="stable")  # ranks grouped by cluster, ascending rank within
        del cluster_of_rank
        self.items = item_of_rank[order]
        del item_of_rank
        cum = order.astype(np.float64)
        del order
        cum += 1.0 + float(zipf_offset)
        np.power(cum, -float(zipf_alpha), out=cum)
        np.cumsum(cum, out=cum)
        self.cum = cum
        self.num_items, self.num_interests = n, c
        self.start = np.zeros(c + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.start[1:])
        # cum just before each cluster boundary (0 before the first); an empty cluster gets mass 0
        before = np.where(self.start > 0, cum[np.maximum(self.start - 1, 0)], 0.0)
        self.lo = before[:-1]
        self.mass = before[1:] - before[:-1]
        self.cluster_cum = np.cumsum(self.mass)
        self._last_cluster = int(np.flatnonzero(self.mass > 0)[-1])  # clip target for x rounding up to the total

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> "Catalog":
        return cls(cfg.num_items, cfg.num_interests, cfg.zipf_alpha, cfg.zipf_offset, cfg.seed)

    def sample_clusters(self, rng: np.random.Generator, size: Any) -> np.ndarray:
        """Clusters drawn with probability ``W_c / sum(W)`` (int64 array of shape ``size``)."""
        x = rng.random(size) * self.cluster_cum[-1]
        return np.minimum(np.searchsorted(self.cluster_cum, x, side="right"), self._last_cluster)

    def sample_items(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """One item per entry of ``clusters``, Zipf within the cluster (int32, same shape)."""
        lo, hi = self.lo[clusters], self.lo[clusters] + self.mass[clusters]
        x = lo + rng.random(clusters.shape) * (hi - lo)
        idx = np.searchsorted(self.cum, x, side="right")
        np.clip(idx, self.start[clusters], self.start[clusters + 1] - 1, out=idx)
        return self.items[idx]

    def item_cluster(self) -> np.ndarray:
        """int32 (N + 1,): cluster of each item id (row 0 = pad = -1)."""
        out = np.full(self.num_items + 1, -1, dtype=np.int32)
        out[self.items] = np.repeat(np.arange(self.num_interests, dtype=np.int32), np.diff(self.start))
        return out

    def item_probability(self) -> np.ndarray:
        """float64 (N + 1,): global Zipf probability of each item id (row 0 = 0)."""
        out = np.zeros(self.num_items + 1, dtype=np.float64)
        out[self.items] = np.diff(self.cum, prepend=0.0) / self.cum[-1]
        return out


# --------------------------------------------------------------------------- users


@dataclass
class UserChunk:
    """Sequences of users ``first_user .. first_user + len(lengths) - 1``.

    ``items[offsets[u]:offsets[u + 1]]`` is the full sequence ``s_1..s_n`` of
    local user ``u`` (int32, oldest first).
    """

    index: int
    first_user: int
    lengths: np.ndarray
    offsets: np.ndarray
    items: np.ndarray


def _chunk_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 1, int(index)])


def generate_chunk(cfg: SynthConfig, catalog: Catalog, index: int, first_user: int, num_users: int) -> UserChunk:
    """Generate the sequences of ``num_users`` users (chunk ``index``), vectorised."""
    rng = _chunk_rng(cfg.seed, index)
    m, k = int(num_users), int(cfg.interests_per_user)
    a, b = cfg.min_seq_len, cfg.max_seq_len
    lengths = np.floor(np.exp(rng.uniform(np.log(a), np.log(b + 1), size=m))).astype(np.int64)
    np.clip(lengths, a, b, out=lengths)
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    user_of = np.repeat(np.arange(m, dtype=np.int64), lengths)
    first = np.zeros(total, dtype=bool)
    first[offsets[:-1]] = True

    own = catalog.sample_clusters(rng, (m, k))                  # each user's interests
    switch = rng.random(total) < cfg.drift
    switch |= first
    pick = rng.integers(0, k, size=total)
    fresh = (rng.random(total) < cfg.p_new_interest) & ~first
    fresh_cluster = catalog.sample_clusters(rng, total)
    at_switch = np.where(fresh, fresh_cluster, own[user_of, pick])
    last_switch = np.where(switch, np.arange(total, dtype=np.int64), 0)
    np.maximum.accumulate(last_switch, out=last_switch)        # never crosses users: step 1 always switches
    current = at_switch[last_switch]
    popular = rng.random(total) < cfg.p_popular
    drawn = np.where(popular, catalog.sample_clusters(rng, total), current)
    items = catalog.sample_items(rng, drawn)
    return UserChunk(index, int(first_user), lengths, offsets, items)


def iter_chunks(cfg: SynthConfig, catalog: Catalog, chunk_users: int = DEFAULT_CHUNK_USERS) -> Iterator[UserChunk]:
    """Yield the users of ``cfg`` chunk by chunk (one chunk alive at a time if the caller drops it)."""
    for index, lo in enumerate(range(0, cfg.num_users, chunk_users)):
        yield generate_chunk(cfg, catalog, index, lo, min(chunk_users, cfg.num_users - lo))


def chunk_records(chunk: UserChunk, num_items: int) -> Records:
    """The chunk's users as leave-one-out records (bounds ``(n - 2, n - 1)``)."""
    n = chunk.lengths
    return Records(chunk.offsets, chunk.items.astype(np.int32), np.stack([n - 2, n - 1], axis=1),
                   num_items, "leave_one_out")


def synth_build_params(cfg: SynthConfig, train_prefixes_per_user: Optional[int], records_per_block: int,
                       blocks_per_shard: int, compress: bool, chunk_users: int) -> Dict[str, Any]:
    """The manifest ``build`` block (every parameter that changes the output)."""
    return {"format": FORMAT, "builder_version": SYNTH_VERSION, "dataset": DATASET_NAME,
            "generator": "shards.synthetic", "synthetic": asdict(cfg),
            "train_prefixes_per_user": None if train_prefixes_per_user is None else int(train_prefixes_per_user),
            "records_per_block": int(records_per_block), "blocks_per_shard": int(blocks_per_shard),
            "compress": bool(compress), "chunk_users": int(chunk_users)}


def synth_shards(
    out: str,
    num_items: int = 10_000_000,
    num_users: int = 100_000,
    min_seq_len: int = 5,
    max_seq_len: int = 50,
    zipf_alpha: float = 1.1,
    zipf_offset: float = 10.0,
    num_interests: int = 1000,
    interests_per_user: int = 3,
    drift: float = 0.1,
    p_new_interest: float = 0.1,
    p_popular: float = 0.05,
    seed: int = 0,
    train_prefixes_per_user: Optional[int] = None,
    records_per_block: int = DEFAULT_RECORDS_PER_BLOCK,
    blocks_per_shard: int = DEFAULT_BLOCKS_PER_SHARD,
    compress: bool = False,
    force: bool = False,
    progress: Optional[bool] = None,
    chunk_users: int = DEFAULT_CHUNK_USERS,
) -> Dict[str, Any]:
    """Generate a synthetic dataset into ``out`` (path or fsspec URL) and return its manifest.

    Parameters of the generative process are those of :class:`SynthConfig`; the others are
    :func:`shards.build.write_shards`'s. Idempotent like a build (same parameters: nothing
    is written). ``chunk_users`` changes the output (RNG per chunk), so it is a build parameter.
    """
    cfg = SynthConfig(num_items=int(num_items), num_users=int(num_users), min_seq_len=int(min_seq_len),
                      max_seq_len=int(max_seq_len), zipf_alpha=float(zipf_alpha), zipf_offset=float(zipf_offset),
                      num_interests=int(num_interests), interests_per_user=int(interests_per_user),
                      drift=float(drift), p_new_interest=float(p_new_interest), p_popular=float(p_popular),
                      seed=int(seed))
    cfg.validate()
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    build = synth_build_params(cfg, train_prefixes_per_user, records_per_block, blocks_per_shard, compress,
                               chunk_users)
    build = json.loads(json.dumps(build))  # as the manifest stores it, so it compares equal
    done = up_to_date(out, build, force)
    if done is not None:
        return done
    t0 = time.time()
    catalog = Catalog.from_config(cfg)
    log.info("catalog: %d items in %d interest clusters (%.1f s)", cfg.num_items, cfg.num_interests, time.time() - t0)
    chunks = (chunk_records(c, cfg.num_items) for c in iter_chunks(cfg, catalog, chunk_users))
    id_map = {"identity": True, "note": "synthetic data: item id = raw item id, record = user index"}
    return write_shards(chunks, out, dataset=DATASET_NAME, protocol="leave_one_out", num_items=cfg.num_items,
                        build=build, records_per_block=records_per_block, blocks_per_shard=blocks_per_shard,
                        compress=compress, train_prefixes_per_user=train_prefixes_per_user,
                        stats={"generator": asdict(cfg)}, id_map=id_map, progress=progress,
                        total_records=cfg.num_users)
