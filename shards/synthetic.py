"""Synthetic ``recsys-dist/seq-v1`` datasets: Zipf popularity, interest clusters, drifting users.

``python -m shards synth`` / :func:`synth_shards` writes train/val/test shards,
``item_counts.npy`` and ``manifest.json`` in exactly the layout of a
leave-one-out build (:mod:`shards.build`), so training, evaluation and the
popularity baseline read them unchanged. It needs no raw data, so it scales the
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

Splits are leave-one-out exactly as :func:`shards.build.split_samples`
(test = last item, val = second-to-last, train = prefixes ``j = 2..n-2``, or the
last ``train_prefixes_per_user`` of them; histories keep their last ``max_len``
items; ``min_seq_len >= 3`` so every user has a val and a test sample).
``item_counts.npy`` holds the exact occurrences of each item in ``s_1..s_{n-2}``
of every user (same definition as :func:`shards.build.train_item_counts`; row
0 = 0), for popularity-aware (logQ-corrected) negative sampling.

Streaming and memory. Users are generated in chunks of ``chunk_users``
(default 10,000); each chunk's samples go straight into the open shard writers
(one per split, a shard is closed and renamed into place every
``samples_per_shard`` samples), so memory does not grow with the number of users
or samples. It does grow with the catalog (O(num_items), not constant): 20
bytes per item stay resident (item ids grouped by cluster, int32; their
cumulative weights, float64; ``item_counts``, int64: 200 MB at 10M items), ~26
bytes per item at the peak while the catalog is built. Measured at 10M items
(20k users, max_len 20): peak RSS 540 MB, of which ~230 MB is the interpreter
with torch imported by the ``shards`` package.

Deviation from :mod:`shards.build`: train samples cannot be shuffled globally
while streaming; they are shuffled within each chunk (a permutation of the
chunk's train samples, RNG seeded by ``(seed, chunk index)``) and the chunks are
written in order. Users are i.i.d. across chunks, so the chunk order carries no
signal; the reader's per-epoch shard shuffle and shuffle buffer mix further.
val/test samples are written in user order, as in a build.

``id_map.json`` is a tiny ``{"identity": true, ...}`` object instead of a raw-id
list (ids are their own raw ids; nothing in the trainer reads the id map).

"Byte-identical" holds for the same arguments, numpy version and CPU family:
numpy's SIMD ``power`` / ``log`` / ``exp`` may differ in the last ulp across
platforms, which can move a rare draw across a boundary.

Shard bytes are produced by a fast tar writer (templated headers, ~15x faster
than :class:`webdataset.TarWriter` with :mod:`tarfile`) that emits *exactly*
the bytes TarWriter emits in :mod:`shards.build`; this is checked at run time on
a probe sample (falling back to TarWriter on any mismatch) and in the tests.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import posixpath
import struct
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import fsspec
import numpy as np
from tqdm.auto import tqdm
from webdataset import TarWriter

from .build import _HashingWriter, _replace, _up_to_date, _write_bytes_atomic, remove_stale_shards, split_samples
from .schema import (
    FORMAT,
    HISTORY,
    ID_MAP_NAME,
    ITEM_COUNTS_NAME,
    LEAVE_ONE_OUT,
    MANIFEST_NAME,
    PAD_ID,
    SPLITS,
    TARGET,
    USER,
    encode_sample,
    make_key,
    shard_name,
)

log = logging.getLogger(__name__)

SYNTH_VERSION = 1
DATASET_NAME = "synthetic"
DEFAULT_CHUNK_USERS = 10_000
# gzip level of --compress: 6 is ~4x faster than the GzipFile default 9 used by shards.build on these
# padding-heavy tars, for ~7% larger files
DEFAULT_COMPRESS_LEVEL = 6

_TAR_USER = "recsys"  # same tar header fields as shards.build._write_split
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


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
        if not 1 <= self.num_users <= 99_999_999:
            raise ValueError(f"num_users must be in 1..99999999, got {self.num_users}")
        if self.min_seq_len < 3:
            raise ValueError(f"min_seq_len must be >= 3 (every user needs a val and a test item), got {self.min_seq_len}")
        if self.max_seq_len < self.min_seq_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be >= min_seq_len ({self.min_seq_len})")
        if self.max_seq_len > 99_999:
            raise ValueError(f"max_seq_len must be <= 99999 (5-digit key position), got {self.max_seq_len}")
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


def chunk_train_counts(chunk: UserChunk, counts: np.ndarray) -> None:
    """Add the occurrences of each item in ``s_1..s_{n-2}`` of the chunk's users to ``counts`` (in place)."""
    pos = np.arange(chunk.items.size, dtype=np.int64) - np.repeat(chunk.offsets[:-1], chunk.lengths)
    keep = pos < np.repeat(chunk.lengths - 2, chunk.lengths)
    ids, cnt = np.unique(chunk.items[keep], return_counts=True)
    counts[ids] += cnt


# --------------------------------------------------------------------------- tar writing


def _tar_template() -> bytes:
    """The header ``shards.build`` (TarWriter -> tarfile) writes for a member, with an empty name and size 0."""
    ti = tarfile.TarInfo("")
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = 0, 0, 0o444, _TAR_USER, _TAR_USER
    return ti.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


class _FastTar:
    """Minimal tar stream writer for seq-v1 samples, byte-identical to TarWriter's output.

    Headers are a template with only name, size and checksum patched; members in
    the order TarWriter writes them (sorted: history, target, user).
    """

    _T = _tar_template()
    _HEAD, _MID, _TAIL = _T[100:124], _T[136:148], _T[156:]
    _BASE_SUM = sum(_T[:148]) + sum(_T[156:]) + 8 * 32 - sum(_T[:100]) - sum(_T[124:136])

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.offset = 0
        self._size_fields: Dict[int, Tuple[bytes, int]] = {}
        self._suffix = {m: ("." + m).encode("ascii") for m in (HISTORY, TARGET, USER)}
        self._suffix_sum = {m: sum(s) for m, s in self._suffix.items()}

    def _header(self, key: bytes, key_sum: int, member: str, size: int) -> bytes:
        sf = self._size_fields.get(size)
        if sf is None:
            f = b"%011o\0" % size
            sf = self._size_fields[size] = (f, sum(f))
        name = key + self._suffix[member]
        if len(name) > 100:
            raise ValueError(f"tar member name too long for the fast writer: {name!r}")
        chk = self._BASE_SUM + key_sum + self._suffix_sum[member] + sf[1]
        return b"".join((name.ljust(100, b"\0"), self._HEAD, sf[0], self._MID, b"%06o\0 " % chk, self._TAIL))

    def write(self, key: str, history: bytes, target: int, user: int) -> None:
        kb = key.encode("ascii")
        ks = sum(kb)
        hpad = -len(history) % _BLOCK
        buf = b"".join((
            self._header(kb, ks, HISTORY, len(history)), history, b"\0" * hpad,
            self._header(kb, ks, TARGET, 4), struct.pack("<i", target), b"\0" * (_BLOCK - 4),
            self._header(kb, ks, USER, 4), struct.pack("<i", user), b"\0" * (_BLOCK - 4),
        ))
        self.sink.write(buf)
        self.offset += len(buf)

    def close(self) -> None:
        end = self.offset + 2 * _BLOCK
        self.sink.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))


class _SlowTar:
    """The TarWriter path of :mod:`shards.build` (fallback if the fast writer ever disagrees)."""

    def __init__(self, sink: Any) -> None:
        self.tw = TarWriter(sink, encoder=False, mtime=0, compress=False, user=_TAR_USER, group=_TAR_USER)

    def write(self, key: str, history: bytes, target: int, user: int) -> None:
        split, u, j = key.split("-")
        self.tw.write(encode_sample(split, int(u), int(j), np.frombuffer(history, dtype="<i4"), target))

    def close(self) -> None:
        self.tw.close()


def _tar_bytes(cls: Any, samples: List[Tuple[str, bytes, int, int]]) -> bytes:
    buf = io.BytesIO()
    t = cls(buf)
    for s in samples:
        t.write(*s)
    t.close()
    return buf.getvalue()


def fast_tar_matches_tarwriter() -> bool:
    """True if :class:`_FastTar` writes the same bytes as TarWriter for probe samples (short and >512-byte histories)."""
    probe = [
        (make_key("train", 0, 2), np.arange(1, 2, dtype="<i4").tobytes(), 7, 0),
        (make_key("val", 12345678, 99999), np.arange(1, 200, dtype="<i4").tobytes(), 2**31 - 1, 12345678),
        (make_key("test", 3, 129), np.arange(5, 133, dtype="<i4").tobytes(), 1, 3),
    ]
    return _tar_bytes(_FastTar, probe) == _tar_bytes(_SlowTar, probe)


class _SplitWriter:
    """Streams the samples of one split into consecutive shards (tmp file + rename each, sha256 recorded)."""

    def __init__(self, fs: Any, root: str, split: str, samples_per_shard: int, compress: bool, tar_cls: Any,
                 pbar: Any, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> None:
        self.fs, self.root, self.split = fs, root, split
        self.per_shard, self.compress, self.tar_cls, self.pbar = int(samples_per_shard), bool(compress), tar_cls, pbar
        self.compress_level = int(compress_level)
        self.shards: List[Dict[str, Any]] = []
        self.num_samples = 0
        self._open: Optional[Tuple[Any, ...]] = None
        self._in_shard = 0

    def _start(self) -> None:
        name = shard_name(self.split, len(self.shards), self.compress)
        path = posixpath.join(self.root, name)
        raw = self.fs.open(path + ".tmp", "wb")
        hw = _HashingWriter(raw)
        gz = gzip.GzipFile(fileobj=hw, mode="wb", mtime=0, compresslevel=self.compress_level) if self.compress else None
        self._open = (name, path, raw, hw, gz, self.tar_cls(gz if gz is not None else hw))
        self._in_shard = 0

    def _finish(self) -> None:
        assert self._open is not None
        name, path, raw, hw, gz, tar = self._open
        tar.close()
        if gz is not None:
            gz.close()
        raw.close()
        _replace(self.fs, path + ".tmp", path)
        self.shards.append({"name": name, "num_samples": self._in_shard, "sha256": hw.sha.hexdigest(),
                            "bytes": hw.bytes})
        self._open = None

    def write_chunk(self, chunk: UserChunk, users: np.ndarray, js: np.ndarray, max_len: int) -> None:
        """Write the samples ``(users[i], js[i])`` (local user index, 1-based target position) of ``chunk``."""
        items, offsets = chunk.items, chunk.offsets
        split, first_user = self.split, chunk.first_user
        base = offsets[users]
        hi = base + js - 1                    # target index in items
        lo = np.maximum(base, hi - max_len)   # history = items[lo:hi]
        targets = items[hi].tolist()
        gu = (users + first_user).tolist()
        lo_l, hi_l, js_l = lo.tolist(), hi.tolist(), js.tolist()
        for i in range(len(gu)):
            if self._open is None:
                self._start()
            u = gu[i]
            self._open[5].write(f"{split}-{u:08d}-{js_l[i]:05d}", items[lo_l[i]:hi_l[i]].tobytes(), targets[i], u)
            self._in_shard += 1
            if self._in_shard == self.per_shard:
                self._finish()
        self.num_samples += len(gu)
        self.pbar.update(len(gu))

    def close(self) -> Dict[str, Any]:
        if self._open is not None:
            self._finish()
        return {"num_samples": int(self.num_samples), "shards": self.shards}

    def abort(self) -> None:
        if self._open is not None:
            self._open[2].close()  # leave the .tmp file; the next build removes it
            self._open = None


# --------------------------------------------------------------------------- build


def synth_build_params(cfg: SynthConfig, max_len: int, train_prefixes_per_user: Optional[int],
                       samples_per_shard: int, compress: bool, chunk_users: int,
                       compress_level: int = DEFAULT_COMPRESS_LEVEL) -> Dict[str, Any]:
    """The manifest ``build`` block (every parameter that changes the output bytes)."""
    return {
        "format": FORMAT,
        "builder_version": SYNTH_VERSION,
        "dataset": DATASET_NAME,
        "generator": "shards.synthetic",
        "synthetic": asdict(cfg),
        "max_len": int(max_len),
        "train_prefixes_per_user": None if train_prefixes_per_user is None else int(train_prefixes_per_user),
        "samples_per_shard": int(samples_per_shard),
        "seed": int(cfg.seed),
        "compress": bool(compress),
        "compress_level": int(compress_level) if compress else None,
        "chunk_users": int(chunk_users),
        "split_rule": "leave-one-out",
        "train_shuffle": "within each chunk of chunk_users users (streaming; users are i.i.d.)",
        "item_index": "synthetic ids 1..num_items (popularity rank = seeded permutation)",
    }


def synth_shards(
    out: str,
    num_items: int = 10_000_000,
    num_users: int = 100_000,
    min_seq_len: int = 5,
    max_seq_len: int = 50,
    max_len: int = 50,
    zipf_alpha: float = 1.1,
    zipf_offset: float = 10.0,
    num_interests: int = 1000,
    interests_per_user: int = 3,
    drift: float = 0.1,
    p_new_interest: float = 0.1,
    p_popular: float = 0.05,
    seed: int = 0,
    train_prefixes_per_user: Optional[int] = None,
    samples_per_shard: int = 20000,
    compress: bool = False,
    force: bool = False,
    progress: Optional[bool] = None,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    compress_level: int = DEFAULT_COMPRESS_LEVEL,
) -> Dict[str, Any]:
    """Generate a synthetic dataset into ``out`` (path or fsspec URL) and return its manifest.

    Parameters of the generative process are those of :class:`SynthConfig`. The
    others are as in :func:`shards.build.build_shards`: ``max_len`` (history
    truncation), ``train_prefixes_per_user`` (keep each user's last K train
    prefixes), ``samples_per_shard``, ``compress`` (``.tar.gz``, gzip level
    ``compress_level``), ``force``
    (rebuild although an identical build exists at ``out``), ``progress``
    (tqdm bars; None = only on a terminal). ``chunk_users``: users generated
    (and train samples shuffled) together; it changes the output, so it is part
    of the build parameters.

    Returns:
        The manifest dict (also written, last and atomically, to ``<out>/manifest.json``).
    """
    cfg = SynthConfig(num_items=int(num_items), num_users=int(num_users), min_seq_len=int(min_seq_len),
                      max_seq_len=int(max_seq_len), zipf_alpha=float(zipf_alpha), zipf_offset=float(zipf_offset),
                      num_interests=int(num_interests), interests_per_user=int(interests_per_user),
                      drift=float(drift), p_new_interest=float(p_new_interest), p_popular=float(p_popular),
                      seed=int(seed))
    cfg.validate()
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 1 <= compress_level <= 9:
        raise ValueError(f"compress_level must be in 1..9, got {compress_level}")
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    if train_prefixes_per_user is not None and train_prefixes_per_user < 1:
        raise ValueError(f"train_prefixes_per_user must be >= 1 or None, got {train_prefixes_per_user}")
    build = synth_build_params(cfg, max_len, train_prefixes_per_user, samples_per_shard, compress, chunk_users,
                               compress_level)
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/") or "/"
    existing, done = _up_to_date(fs, root, build, True, force, out)
    if done is not None:
        return done

    t0 = time.time()
    tar_cls: Any = _FastTar
    if not fast_tar_matches_tarwriter():  # pragma: no cover - only if tarfile's header layout changes
        log.warning("fast tar writer disagrees with webdataset.TarWriter on this Python; using TarWriter (slow)")
        tar_cls = _SlowTar
    catalog = Catalog.from_config(cfg)
    log.info("catalog: %d items in %d interest clusters (%.1f s)", cfg.num_items, cfg.num_interests, time.time() - t0)

    manifest_path = posixpath.join(root, MANIFEST_NAME)
    fs.makedirs(root, exist_ok=True)
    if existing is not None and fs.exists(manifest_path):
        fs.rm(manifest_path)  # never leave a manifest that points at shards being rewritten

    counts = np.zeros(cfg.num_items + 1, dtype=np.int64)
    interactions = 0
    disable = None if progress is None else not progress
    with tqdm(total=cfg.num_users, desc="synth users", unit="user", disable=disable, position=0) as ubar, \
            tqdm(desc="synth samples", unit="sample", disable=disable, position=1) as sbar:
        writers = {s: _SplitWriter(fs, root, s, samples_per_shard, compress, tar_cls, sbar, compress_level)
                   for s in SPLITS}
        try:
            for chunk in iter_chunks(cfg, catalog, chunk_users):
                chunk_train_counts(chunk, counts)
                interactions += int(chunk.items.size)
                samples = split_samples(chunk.lengths, train_prefixes_per_user)
                tu, tj = samples["train"]
                perm = np.random.default_rng([int(seed), 2, chunk.index]).permutation(tu.size)
                writers["train"].write_chunk(chunk, tu[perm], tj[perm], max_len)
                for s in ("val", "test"):
                    writers[s].write_chunk(chunk, *samples[s], max_len)
                ubar.update(chunk.lengths.size)
                del chunk, samples, tu, tj, perm
            splits = {s: writers[s].close() for s in SPLITS}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

    buf = io.BytesIO()
    np.save(buf, counts, allow_pickle=False)
    _write_bytes_atomic(fs, posixpath.join(root, ITEM_COUNTS_NAME), buf.getvalue())
    id_map = {"identity": True, "num_items": cfg.num_items, "num_users": cfg.num_users,
              "note": "synthetic data: item id = raw item id (1..num_items), user index = raw user id"}
    _write_bytes_atomic(fs, posixpath.join(root, ID_MAP_NAME), json.dumps(id_map).encode("utf-8"))
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "dataset": DATASET_NAME,
        "protocol": LEAVE_ONE_OUT,
        "num_items": cfg.num_items,
        "num_users": cfg.num_users,
        "max_len": int(max_len),
        "pad_id": PAD_ID,
        "min_history_len": 1,
        "stats": {"interactions": interactions, "train_interactions": int(counts.sum()),
                  "train_items_seen": int(np.count_nonzero(counts))},
        "splits": splits,
        "train_item_counts_file": ITEM_COUNTS_NAME,
        "id_map_file": ID_MAP_NAME,
        "build": build,
    }
    _write_bytes_atomic(fs, manifest_path, json.dumps(manifest, indent=1).encode("utf-8"))
    remove_stale_shards(fs, root, splits)
    nbytes = sum(sh["bytes"] for s in splits.values() for sh in s["shards"])
    log.info("synthetic: %d users, %d interactions, %s samples, %.1f MiB in %d shards, %.1f s",
             cfg.num_users, interactions, {s: splits[s]["num_samples"] for s in SPLITS}, nbytes / 2**20,
             sum(len(s["shards"]) for s in splits.values()), time.time() - t0)
    return manifest

