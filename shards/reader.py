"""Streaming, rank/worker-sharded reader of ``recsys-dist/seq-v1`` shards.

Use with ``torch.utils.data.DataLoader(reader, batch_size=None, num_workers=W)``:
the reader yields whole batches::

    {"history": LongTensor (B, max_len)  # left-padded with 0, most recent item last
     "target":  LongTensor (B,),
     "user":    LongTensor (B,),
     "seen":    LongTensor (B, S)}     # val/test only: the whole seen set, 0-padded

``seen`` is what evaluation masks: the user's every earlier item, however many
(the shard's ``seen.i32`` member when the history was cut to ``max_len``).

With a ``"session_split"`` manifest (``"min_history_len": 0``) a history may be
empty: its row is all padding. ``user`` is then the sample's row index in its
split (unique within the split).

Sharding. There are ``R = world_size * num_workers`` readers; reader
``g = rank * num_workers + worker_id``.

* ``num_shards >= R``: shard at position ``p`` of the epoch's shard order goes
  to reader ``p % R``. With ``shuffle=True`` the order is a deterministic
  per-epoch permutation (``numpy.random.default_rng([seed, epoch])``) that only
  swaps shards holding the *same* number of samples, so every reader's sample
  count, and therefore :func:`plan_batches`, is the same in every epoch.
* ``num_shards < R``: every reader streams all shards and keeps global sample
  ``i`` (counter over the epoch's shard order) iff ``i % R == g``.

``assignment="balanced"`` (opt-in) deals out only whole rounds of ``R`` shards
round-robin and splits the ``num_shards % R`` leftover shards sample-wise as in
the second case; it avoids ranks differing by a whole shard (with 50 shards and
32 readers, round-robin gives half the readers twice the data of the others).

Either way every sample is read exactly once per epoch. With ``shuffle=True``
samples are also shuffled within a ``shuffle_buffer``-sized buffer whose RNG is
seeded with ``(seed, epoch, g)``.

Batch counts are known without reading data (:func:`plan_batches`); training
passes ``max_batches=steps_per_epoch(...)`` so that every rank yields the same
number of batches. The per-worker caps mimic the DataLoader's round-robin over
workers, so a capped epoch is a prefix of the uncapped one.

Mid-epoch resume. ``start_batch=k`` (or :meth:`ShardReader.set_position`)
makes the epoch's stream start at this rank's batch ``k``: the batches are
exactly those a fresh reader yields from index ``k`` on (same tensors, same
order), for any ``num_workers``, with ``shuffle`` and ``max_batches``. The
DataLoader (``batch_size=None``, in order) takes batches round-robin from its
workers starting at worker 0 and skips exhausted ones, so the first ``k``
batches hold ``worker_batch_caps(caps, k)[w]`` batches of worker ``w``; each
worker skips that many of its own, and the workers' roles are rotated so the
fresh round-robin continues with the worker after the one that produced batch
``k - 1`` (:func:`worker_resume`; the DataLoader restarts its round-robin at
worker 0 on every ``iter()``, persistent workers included). Skipped batches
are never collated and, with ``on_error="raise"``, their samples are not
decoded and mostly not even read: the shuffle buffer's RNG draws depend only
on how many samples went in, so the resume point is found by running the
buffer on sample *indices* (no I/O); then only the samples still in the buffer
and those after the point are decoded, and shards holding none of them are not
opened (``on_error="skip"`` replays the skipped part instead, because bad
samples change the stream). A checkpoint stores
:meth:`ShardReader.data_position` (epoch, ``start_batch`` = batches the trainer
*consumed*, per-worker batches/samples consumed, and the settings it is valid
for); :meth:`ShardReader.restore_position` checks and applies it. Exact resume
needs the same shards, ``world_size``, DataLoader ``num_workers`` (0 and 1 are
the same), ``batch_size``, ``drop_last``, ``max_batches``, ``assignment`` and
``shuffle``/``seed``/``shuffle_buffer``, and the DataLoader's default
``in_order=True``.

Storage. Shards are opened through :func:`shards.storage.open_retrying`: a
transient error (connection reset, broken pipe, a body cut short, timeouts)
while opening or in the middle of a shard reopens the URL at the byte offset
reached, after exponential backoff (``io_attempts``, ``io_base_delay``,
``io_max_delay``), so the streaming tar parser never notices; each reopen is
logged and counted in :attr:`ShardReader.io_retries`. Retries used up raise
:class:`ShardError` naming the URL and the tar member reached; a missing shard
raises at once. S3 endpoint and credentials come from the standard AWS
environment or fsspec configuration only (see :mod:`shards.storage`).

Known WebDataset traps and how this reader handles them:

* *Fewer shards than ranks x workers* (``split_by_node`` / ``split_by_worker``
  hand out whole shards, so some readers get nothing and the epoch is uneven or
  hangs): the sample-level split above (``num_shards < R``, and the tail of
  ``assignment="balanced"``) gives every reader its share of every shard.
* *Uneven batch counts across ranks under DDP* (a rank that runs out first
  leaves the others blocked in the next all-reduce): :func:`plan_batches`
  knows every rank's count from the manifest, and
  ``max_batches=steps_per_epoch(...)`` makes all ranks yield exactly the same
  number of batches (the per-worker caps keep it a prefix of the epoch).
* *``resampled=True`` needs ``with_epoch``* (infinite streams with an arbitrary
  epoch length, samples seen 0..n times): not used. Epochs are explicit
  (:meth:`ShardReader.set_epoch`), every sample is read exactly once per
  epoch, and the shuffle (shard order among equal-sized shards + a buffer
  seeded by ``(seed, epoch, g)``) is deterministic per epoch, which is also
  what makes exact resume possible.
* *Broken pipes / truncated responses from S3 under load* (webdataset's
  ``gopen`` pipes die with the connection): retry with backoff and reopen at
  the byte offset (above); to read the shards with plain webdataset, see
  :mod:`shards.wds`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import tarfile
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .schema import (
    FORMAT,
    MANIFEST_NAME,
    SPLITS,
    ShardError,
    decode_sample,
    manifest_min_history_len,
    manifest_protocol,
)
from .storage import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BASE_DELAY,
    DEFAULT_MAX_DELAY,
    RetriesExhausted,
    open_retrying,
)
from .tarstream import TarStream

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^((?:.*/)?[^/.]+)\.([^/]+)$")
_STAT_SLOTS = 64  # per-worker counter slots in shared memory
_BAD_SAMPLES, _BAD_SHARDS, _SAMPLES, _BATCHES, _IO_RETRIES = range(5)
POSITION_FORMAT = "recsys-dist/reader-position-v1"


# --------------------------------------------------------------------------- manifest


def resolve_manifest_url(url_or_dir: str) -> Tuple[str, str]:
    """Return ``(manifest_url, base_url)`` for a manifest file URL or its directory."""
    u = str(url_or_dir)
    if u.endswith(".json"):
        base = u.rsplit("/", 1)[0] if "/" in u else "."
        return u, base
    base = u.rstrip("/") or "/"
    return shard_url(base, MANIFEST_NAME), base


def shard_url(base_url: str, name: str) -> str:
    """URL of shard ``name`` next to the manifest at ``base_url``."""
    return base_url.rstrip("/") + "/" + name


def load_manifest(url_or_dir: str) -> Dict[str, Any]:
    """Read and check ``manifest.json`` (given the file URL or its directory).

    Manifests written before the ``protocol`` / ``min_history_len`` keys existed
    are leave-one-out: the returned dict gets ``"protocol": "leave_one_out"`` and
    ``"min_history_len": 1`` when they are absent.

    Raises:
        ShardError: missing/unreadable manifest, wrong ``format``, missing keys, or
            an unknown ``protocol`` / ``min_history_len``.
    """
    murl, _ = resolve_manifest_url(url_or_dir)
    try:
        with open_retrying(murl) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ShardError(f"{murl}: manifest not found (build it with `python -m shards build`)", url=murl) from None
    except OSError as e:
        raise ShardError(f"{murl}: cannot read manifest: {e}", url=murl) from e
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{murl}: manifest is not valid JSON: {e}", url=murl) from e
    if not isinstance(m, dict) or "format" not in m:
        raise ShardError(f"{murl}: manifest has no 'format' key (expected {FORMAT!r})", url=murl)
    if m["format"] != FORMAT:
        raise ShardError(f"{murl}: manifest format is {m['format']!r}, this reader supports {FORMAT!r}", url=murl)
    for k in ("num_items", "max_len", "splits"):
        if k not in m:
            raise ShardError(f"{murl}: manifest lacks required key {k!r}", url=murl)
    try:
        m["protocol"] = manifest_protocol(m)
        m["min_history_len"] = manifest_min_history_len(m)
    except (TypeError, ValueError) as e:
        raise ShardError(f"{murl}: {e}", url=murl) from None
    return m


def _split_shards(manifest: Dict[str, Any], split: str) -> List[Dict[str, Any]]:
    try:
        return list(manifest["splits"][split]["shards"])
    except KeyError:
        raise ShardError(f"manifest has no split {split!r} (has {sorted(manifest.get('splits', {}))})") from None


def verify_shards(
    manifest_dir: str,
    splits: Optional[Sequence[str]] = None,
    raise_on_error: bool = True,
) -> Dict[str, Any]:
    """Check byte size and sha256 of every shard against the manifest.

    Args:
        manifest_dir: manifest URL or its directory.
        splits: splits to check (default all in the manifest).
        raise_on_error: raise :class:`ShardError` listing every problem found.

    Returns:
        ``{"checked": number of shards, "bytes": total bytes, "problems": [str, ...]}``.
    """
    m = load_manifest(manifest_dir)
    _, base = resolve_manifest_url(manifest_dir)
    problems: List[str] = []
    checked = total = 0
    for split in splits or list(m["splits"]):
        for sh in _split_shards(m, split):
            url = shard_url(base, sh["name"])
            h = hashlib.sha256()
            n = 0
            try:
                with open_retrying(url) as f:
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                        n += len(chunk)
            except FileNotFoundError:
                problems.append(f"{url}: shard file not found")
                continue
            except OSError as e:
                problems.append(f"{url}: cannot read: {e}")
                continue
            checked += 1
            total += n
            if n != sh["bytes"]:
                problems.append(f"{url}: {n} bytes, manifest says {sh['bytes']}")
            elif h.hexdigest() != sh["sha256"]:
                problems.append(f"{url}: sha256 {h.hexdigest()} != manifest {sh['sha256']}")
    if problems and raise_on_error:
        raise ShardError("shard verification failed:\n  " + "\n  ".join(problems))
    return {"checked": checked, "bytes": total, "problems": problems}


# --------------------------------------------------------------------------- planning


def shard_order(shard_sizes: Sequence[int], shuffle: bool, seed: int, epoch: int) -> List[int]:
    """Shard indices in the order they are dealt out in ``epoch``.

    With ``shuffle`` shards are permuted only among shards of equal size
    (RNG ``numpy.random.default_rng([seed, epoch])``), so position ``p`` always
    holds a shard of the same size as shard ``p``.
    """
    order = list(range(len(shard_sizes)))
    if not shuffle or len(order) < 2:
        return order
    rng = np.random.default_rng([int(seed), int(epoch)])
    groups: Dict[int, List[int]] = {}
    for i, n in enumerate(shard_sizes):
        groups.setdefault(int(n), []).append(i)
    for size in sorted(groups):
        pos = groups[size]
        for p, s in zip(pos, rng.permutation(pos).tolist()):
            order[p] = s
    return order


ASSIGNMENTS = ("round_robin", "balanced")


def reader_shard_plan(
    sizes: Sequence[int], order: Sequence[int], g: int, r_total: int, assignment: str = "round_robin"
) -> List[Tuple[int, int, int, int]]:
    """What reader ``g`` of ``r_total`` reads: a list of ``(shard, first, stride, offset)``.

    The reader streams ``shard`` and keeps its local sample ``k`` iff
    ``(first + k) % stride == offset`` (``stride == 1``: keeps all).

    * ``"round_robin"`` (default): with ``len(order) >= r_total`` reader ``g`` gets the
      shards at positions ``g, g + r_total, ...``; otherwise every reader streams every
      shard and keeps global sample ``i`` iff ``i % r_total == g``.
    * ``"balanced"``: round-robin over the first ``(S // r_total) * r_total`` positions,
      and the ``S % r_total`` remaining shards are split sample-wise like the few-shards
      case, so reader sample counts differ by at most one sample plus one shard's size
      difference (instead of up to a whole shard).
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    n_shards = len(order)
    if assignment == "round_robin":
        head = n_shards if n_shards >= r_total else 0
    else:
        head = (n_shards // r_total) * r_total
    plan = [(order[p], 0, 1, 0) for p in range(g, head, r_total)]
    start = 0
    for p in range(head, n_shards):
        plan.append((order[p], start, r_total, g))
        start += int(sizes[order[p]])
    return plan


def _kept(first: int, n: int, stride: int, offset: int) -> int:
    """How many i in [first, first + n) satisfy i % stride == offset."""
    upto = lambda x: max(0, (x - offset + stride - 1) // stride)  # noqa: E731
    return upto(first + n) - upto(first)


def plan_reader_samples(
    manifest: Dict[str, Any], split: str, world_size: int, num_workers: int, assignment: str = "round_robin"
) -> List[List[int]]:
    """Samples each reader gets per epoch: ``result[rank][worker_id]`` (from manifest counts only).

    Epoch- and shuffle-independent because :func:`shard_order` only swaps equal-sized shards.
    """
    if world_size < 1 or num_workers < 1:
        raise ValueError("world_size and num_workers must be >= 1")
    sizes = [int(sh["num_samples"]) for sh in _split_shards(manifest, split)]
    r_total = world_size * num_workers
    order = list(range(len(sizes)))
    per = [
        sum(_kept(first, sizes[s], stride, off) for s, first, stride, off in reader_shard_plan(sizes, order, g, r_total, assignment))
        for g in range(r_total)
    ]
    return [per[r * num_workers:(r + 1) * num_workers] for r in range(world_size)]


def _nbatches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def plan_batches(
    manifest: Dict[str, Any],
    split: str,
    batch_size: int,
    world_size: int,
    num_workers: int,
    drop_last: bool,
    assignment: str = "round_robin",
) -> List[int]:
    """Exact number of batches each rank yields per epoch (no ``max_batches`` cap).

    ``num_workers`` is the DataLoader's (use 1 for ``num_workers=0``). The
    result, ``list[int]`` of length ``world_size``, is the same for every epoch
    and for ``shuffle`` on or off.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        sum(_nbatches(n, batch_size, drop_last) for n in workers)
        for workers in plan_reader_samples(manifest, split, world_size, num_workers, assignment)
    ]


def steps_per_epoch(
    manifest: Dict[str, Any],
    split: str,
    batch_size: int,
    world_size: int,
    num_workers: int,
    drop_last: bool = True,
    assignment: str = "round_robin",
) -> int:
    """``min(plan_batches(...))``: the batch count every rank can reach (pass it as ``max_batches``)."""
    return min(plan_batches(manifest, split, batch_size, world_size, num_workers, drop_last, assignment))


def worker_batch_caps(worker_batches: Sequence[int], max_batches: Optional[int]) -> List[int]:
    """Split a rank's ``max_batches`` over its workers like the DataLoader's round-robin would.

    ``worker_batches[w]`` is worker ``w``'s uncapped batch count. Returns caps
    with ``sum(caps) == min(max_batches, sum(worker_batches))``.
    """
    wb = [int(b) for b in worker_batches]
    if max_batches is None or max_batches >= sum(wb):
        return wb
    if max_batches <= 0:
        return [0] * len(wb)
    lo, hi = 0, max(wb)  # largest full round count t with sum(min(b, t)) <= max_batches
    while lo < hi:
        t = (lo + hi + 1) // 2
        if sum(min(b, t) for b in wb) <= max_batches:
            lo = t
        else:
            hi = t - 1
    caps = [min(b, lo) for b in wb]
    rest = max_batches - sum(caps)
    for w, b in enumerate(wb):
        if rest == 0:
            break
        if b > lo:
            caps[w] += 1
            rest -= 1
    return caps


def worker_resume(caps: Sequence[int], start_batch: int) -> Tuple[List[int], int]:
    """How a rank whose workers yield ``caps[w]`` batches resumes at its batch ``start_batch``.

    The DataLoader (``batch_size=None``, in order) takes batches from its
    workers round-robin starting at worker 0 and skips exhausted workers, so the
    rank's batch sequence is round ``r = 0, 1, ...`` of ``[w for w in range(W) if caps[w] > r]``.
    Its first ``k`` batches hold ``skip[w] = worker_batch_caps(caps, k)[w]``
    batches of worker ``w``. A fresh DataLoader starts its round-robin at worker
    0 again, so when batch ``k - 1`` came from worker ``last`` the roles are
    rotated: DataLoader worker ``i`` plays role ``(i + shift) % W`` with
    ``shift = (last + 1) % W``; the resumed round-robin then visits the roles
    ``shift, ..., W-1, 0, ..., shift-1`` in every round, which is exactly the
    rest of the original sequence (the roles after ``last`` still owe their
    batch of the current round; the others continue with the next round).

    Returns:
        ``(skip, shift)``: batches each role (original worker id) already
        produced, and the rotation. ``start_batch`` is clamped to ``[0, sum(caps)]``.
    """
    caps = [int(c) for c in caps]
    k = max(0, min(int(start_batch), sum(caps)))
    skip = worker_batch_caps(caps, k)
    if k == 0 or not caps:
        return skip, 0
    prev = worker_batch_caps(caps, k - 1)
    last = next(w for w in range(len(caps)) if skip[w] != prev[w])
    return skip, (last + 1) % len(caps)


class _ShuffleBuffer:
    """The sample shuffle buffer; also run on stream *indices* to fast-forward a resumed stream
    (the RNG draws depend only on how many items went in, never on their content)."""

    EMPTY = object()

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.buf: List[Any] = []

    def push(self, x: Any) -> Any:
        """Add ``x``; return the item pushed out, or :attr:`EMPTY` while the buffer fills."""
        if len(self.buf) < self.size:
            self.buf.append(x)
            return self.EMPTY
        i = int(self.rng.integers(len(self.buf)))
        self.buf[i], x = x, self.buf[i]
        return x

    def drain(self) -> List[Any]:
        """The remaining items in random order (end of the stream)."""
        buf, self.buf = self.buf, []
        return [buf[i] for i in self.rng.permutation(len(buf)).tolist()]


# --------------------------------------------------------------------------- reader


class ShardReader(IterableDataset):
    """Iterable dataset over one split of a shard directory, yielding padded batches.

    Args:
        manifest_url_or_dir: manifest URL or its directory (any fsspec URL).
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: samples per batch (B).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        max_len: width of ``history`` (default: manifest ``max_len``); longer
            histories keep their most recent ``max_len`` items.
        num_items: valid item ids are ``1..num_items`` (default: manifest).
        shuffle: shuffle shard order per epoch and samples in a buffer.
        seed: base seed of all shuffling.
        epoch: initial epoch (see :meth:`set_epoch`).
        drop_last: drop each worker's final partial batch.
        max_batches: stop this rank after this many batches (e.g. :func:`steps_per_epoch`).
        shuffle_buffer: size of the sample shuffle buffer.
        on_error: ``"raise"`` (default) raises :class:`ShardError`; ``"skip"`` logs a
            warning, skips the bad sample (or the rest of a bad shard) and counts it
            in :attr:`bad_samples` / :attr:`bad_shards`.
        assignment: ``"round_robin"`` (default) or ``"balanced"``; see :func:`reader_shard_plan`.
        start_batch: exact mid-epoch resume: in epoch ``epoch`` this rank's stream begins
            at its batch ``start_batch`` (the batches a fresh reader would have yielded
            from that index on, same tensors, same order, for any ``num_workers`` and with
            ``shuffle`` and ``max_batches``); later epochs start at 0. Get the value from
            :meth:`data_position` saved in the checkpoint (see :meth:`restore_position`).
            Requires the DataLoader's default ``in_order=True``.
        io_attempts: tries per failure streak when opening / reading a shard hits a
            transient storage error (connection reset, truncated body, timeout); each retry
            reopens the URL at the byte offset reached (see :mod:`shards.storage`).
            ``1`` disables retries. A missing shard is never retried.
        io_base_delay, io_max_delay: exponential backoff (seconds) between those tries.

    Counters (:attr:`bad_samples`, :attr:`bad_shards`, :attr:`samples_yielded`,
    :attr:`batches_yielded`, :attr:`io_retries`), the epoch and the resume position
    live in shared memory, so they are seen across DataLoader worker processes
    (fork or spawn) and persistent workers.
    """

    def __init__(
        self,
        manifest_url_or_dir: str,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_len: Optional[int] = None,
        num_items: Optional[int] = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        max_batches: Optional[int] = None,
        shuffle_buffer: int = 2000,
        on_error: str = "raise",
        assignment: str = "round_robin",
        start_batch: int = 0,
        io_attempts: int = DEFAULT_ATTEMPTS,
        io_base_delay: float = DEFAULT_BASE_DELAY,
        io_max_delay: float = DEFAULT_MAX_DELAY,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if io_attempts < 1:
            raise ValueError(f"io_attempts must be >= 1, got {io_attempts}")
        self.io_attempts = int(io_attempts)
        self.io_base_delay = float(io_base_delay)
        self.io_max_delay = float(io_max_delay)
        self.manifest = load_manifest(manifest_url_or_dir)
        _, self.base_url = resolve_manifest_url(manifest_url_or_dir)
        self.split = split
        self.shards = _split_shards(self.manifest, split)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.manifest_max_len = int(self.manifest["max_len"])
        self.min_history_len = int(self.manifest["min_history_len"])
        self.max_len = int(max_len) if max_len is not None else self.manifest_max_len
        self.num_items = int(num_items) if num_items is not None else int(self.manifest["num_items"])
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.on_error = on_error
        self.assignment = assignment
        self._epoch = torch.tensor([int(epoch)], dtype=torch.int64).share_memory_()
        self._resume = torch.tensor([int(epoch), int(start_batch)], dtype=torch.int64).share_memory_()
        self._stats = torch.zeros(_STAT_SLOTS, 5, dtype=torch.int64).share_memory_()

    # ---------------------------------------------------------------- epoch / stats

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used for shuffling (visible to already-started workers).

        Does not touch the resume position: the epoch given with ``start_batch``
        still starts there, every other epoch at batch 0."""
        self._epoch[0] = int(epoch)

    @property
    def start_batch(self) -> int:
        """Batch index at which this rank's stream of the *current* epoch begins."""
        return int(self._resume[1]) if int(self._resume[0]) == self.epoch else 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration start epoch ``epoch`` at this rank's batch ``start_batch``
        (visible to already-started persistent workers)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._resume[0] = int(epoch)
        self._resume[1] = int(start_batch)
        self._epoch[0] = int(epoch)

    def _stat(self, col: int) -> int:
        return int(self._stats[:, col].sum())

    @property
    def bad_samples(self) -> int:
        """Samples skipped as invalid (``on_error="skip"``), over all workers."""
        return self._stat(_BAD_SAMPLES)

    @property
    def bad_shards(self) -> int:
        """Shards that could not be (fully) read (``on_error="skip"``), summed over workers.

        A shard streamed by several readers (few-shards / balanced tail) is counted
        once by each of them."""
        return self._stat(_BAD_SHARDS)

    @property
    def samples_yielded(self) -> int:
        return self._stat(_SAMPLES)

    @property
    def batches_yielded(self) -> int:
        """Batches produced by the workers (includes batches prefetched but not yet consumed)."""
        return self._stat(_BATCHES)

    @property
    def io_retries(self) -> int:
        """Reopens after transient storage errors, over all workers (each also logs a warning)."""
        return self._stat(_IO_RETRIES)

    def reset_stats(self) -> None:
        """Zero all counters."""
        self._stats.zero_()

    # ---------------------------------------------------------------- planning

    plan_batches = staticmethod(plan_batches)
    steps_per_epoch = staticmethod(steps_per_epoch)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def epoch_plan(self, num_workers: int = 1) -> Dict[str, int]:
        """This rank's per-epoch plan for a DataLoader with ``num_workers`` (0 counts as 1).

        Returns ``{"samples", "batches" (uncapped), "max_batches" (after the cap),
        "leftover_batches" (planned but cut by ``max_batches``), "leftover_samples"
        (samples of this rank not seen this epoch: cut batches plus ``drop_last`` remainders)}``.
        """
        nw = max(1, int(num_workers))
        per_worker = plan_reader_samples(self.manifest, self.split, self.world_size, nw, self.assignment)[self.rank]
        wb = [_nbatches(n, self.batch_size, self.drop_last) for n in per_worker]
        caps = worker_batch_caps(wb, self.max_batches)
        used = sum(min(n, c * self.batch_size) for n, c in zip(per_worker, caps))
        return {
            "samples": sum(per_worker),
            "batches": sum(wb),
            "max_batches": sum(caps),
            "leftover_batches": sum(wb) - sum(caps),
            "leftover_samples": sum(per_worker) - used,
        }

    def leftover_batches(self, num_workers: int = 1) -> int:
        """Batches this rank could have yielded but drops because of ``max_batches``."""
        return self.epoch_plan(num_workers)["leftover_batches"]

    # ---------------------------------------------------------------- resume position

    def _layout(self, num_workers: int) -> Tuple[List[int], List[int], List[int]]:
        """``(samples, uncapped batches, capped batches)`` per worker role of this rank."""
        nw = max(1, int(num_workers))
        per_worker = plan_reader_samples(self.manifest, self.split, self.world_size, nw, self.assignment)[self.rank]
        wb = [_nbatches(n, self.batch_size, self.drop_last) for n in per_worker]
        return per_worker, wb, worker_batch_caps(wb, self.max_batches)

    def _identity(self, num_workers: int) -> Dict[str, Any]:
        shards = [(sh["name"], sh.get("sha256"), int(sh["num_samples"])) for sh in self.shards]
        digest = hashlib.sha256(json.dumps(shards).encode("utf-8")).hexdigest()[:16]
        return {
            "format": POSITION_FORMAT,
            "split": self.split,
            "shards_digest": digest,
            "rank": self.rank,
            "world_size": self.world_size,
            "readers_per_rank": max(1, int(num_workers)),
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "max_batches": self.max_batches,
            "assignment": self.assignment,
            "shuffle": self.shuffle,
            "seed": self.seed if self.shuffle else None,
            "shuffle_buffer": self.shuffle_buffer if self.shuffle else None,
        }

    def data_position(self, batch_in_epoch: int, num_workers: int = 0, epoch: Optional[int] = None) -> Dict[str, Any]:
        """The "data position" to store in a checkpoint (a JSON-able dict).

        Args:
            batch_in_epoch: batches of this rank's current epoch the trainer has
                *consumed* (taken from the DataLoader and trained on), counted from
                the start of the epoch: a resumed run adds its ``start_batch``. Not
                :attr:`batches_yielded`, which includes prefetched batches.
            num_workers: the DataLoader's ``num_workers`` (0 and 1 are the same layout).
            epoch: default :attr:`epoch`.

        Returns:
            ``{"epoch", "start_batch" (= batch_in_epoch, clamped to the epoch's batches),
            "epoch_batches", "epoch_done", "workers": [{"worker", "batches", "samples"}, ...]
            (what each worker role has consumed), plus the configuration the position
            is only valid for (split, shard-list digest, rank, world_size,
            readers_per_rank, batch_size, drop_last, max_batches, assignment, shuffle,
            seed, shuffle_buffer)}``. Resume with :meth:`restore_position`.
        """
        per_worker, _, caps = self._layout(num_workers)
        total = sum(caps)
        k = max(0, min(int(batch_in_epoch), total))
        skip, _ = worker_resume(caps, k)
        pos = self._identity(num_workers)
        pos.update(
            epoch=int(self.epoch if epoch is None else epoch),
            start_batch=k,
            epoch_batches=total,
            epoch_done=k >= total,
            workers=[{"worker": w, "batches": skip[w], "samples": min(per_worker[w], skip[w] * self.batch_size)}
                     for w in range(len(caps))],
        )
        return pos

    def check_position(self, position: Dict[str, Any], num_workers: int = 0) -> None:
        """Raise ``ValueError`` naming every setting in which ``position`` (from
        :meth:`data_position`) differs from this reader with ``num_workers``: an exact
        resume needs the same shards, ranks, workers, batch size, caps and shuffle."""
        mine = self._identity(num_workers)
        bad = [f"{k}: saved {position.get(k)!r}, now {v!r}" for k, v in mine.items() if position.get(k) != v]
        if bad:
            raise ValueError("data position does not match this reader (exact resume impossible):\n  "
                             + "\n  ".join(bad))

    def restore_position(self, position: Dict[str, Any], num_workers: int = 0) -> None:
        """:meth:`check_position`, then :meth:`set_position` to the saved epoch and batch.
        A finished epoch (``epoch_done``) resumes at the start of the next epoch."""
        self.check_position(position, num_workers)
        if position.get("epoch_done"):
            self.set_position(int(position["epoch"]) + 1, 0)
        else:
            self.set_position(int(position["epoch"]), int(position["start_batch"]))

    # ---------------------------------------------------------------- reading

    def _fail(self, err: ShardError, slot: int, col: int) -> None:
        if self.on_error == "raise":
            raise err
        self._stats[slot, col] += 1
        log.warning("skipping bad %s: %s", "sample" if col == _BAD_SAMPLES else "shard", err)

    def _iter_tar(self, url: str, expected: int, first_index: int, stride: int, offset: int,
                  slot: int = 0) -> Iterator[Tuple[str, Dict[str, bytes]]]:
        """Yield ``(key, members)`` of the samples ``i`` (``first_index`` + local index) with
        ``i % stride == offset``; member data of other samples is skipped unread."""

        def retried(_url: str, _offset: int, _err: BaseException) -> None:
            self._stats[slot, _IO_RETRIES] += 1

        try:
            fobj = open_retrying(url, attempts=self.io_attempts, base_delay=self.io_base_delay,
                                 max_delay=self.io_max_delay, on_retry=retried)
        except FileNotFoundError:
            raise ShardError(f"{url}: shard file not found", url=url) from None
        except OSError as e:
            raise ShardError(f"{url}: cannot open shard: {e}", url=url) from e
        count = 0
        key: Optional[str] = None
        members: Dict[str, bytes] = {}
        keep = False
        last = "<start of archive>"
        try:
            try:
                ts = TarStream(fobj)
                for ti in ts:
                    last = ti.name
                    if not ti.isfile:
                        raise ShardError(f"{url}: unexpected non-file tar entry {ti.name!r}", url=url, member=ti.name)
                    mt = _KEY_RE.match(ti.name)
                    if mt is None:
                        raise ShardError(f"{url}: tar member {ti.name!r} has no '<key>.<ext>' name", url=url, member=ti.name)
                    k, ext = mt.group(1), mt.group(2)
                    if k != key:
                        if key is not None and keep:
                            yield key, members
                        key, members = k, {}
                        keep = (first_index + count) % stride == offset
                        count += 1
                    if ext in members:
                        raise ShardError(f"{url}: sample {k!r} has member {ti.name!r} twice", url=url, key=k, member=ext)
                    if keep:
                        members[ext] = ts.read(ti)
                    else:
                        members[ext] = b""
            except RetriesExhausted as e:
                raise ShardError(
                    f"{url}: storage read failed after {count} sample(s), at member {last!r}: {e}",
                    url=url, key=key, member=last,
                ) from e
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise ShardError(
                    f"{url}: corrupt or truncated tar after {count} sample(s), at member {last!r}: "
                    f"{type(e).__name__}: {e}",
                    url=url, key=key, member=last,
                ) from e
            if count != expected:
                raise ShardError(
                    f"{url}: holds {count} sample(s) but the manifest says {expected} "
                    f"(truncated or stale shard; last member {last!r})",
                    url=url, key=key, member=last,
                )
            if key is not None and keep:
                yield key, members
        finally:
            fobj.close()

    def _samples(self, g: int, r_total: int, slot: int, epoch: int, start: int = 0,
                 extra: Sequence[int] = ()) -> Iterator[Tuple[int, Tuple[np.ndarray, int, int]]]:
        """Reader ``g``'s samples in stream order as ``(index, sample)``; ``index`` counts the
        samples the reader keeps (bad ones included). Only indices ``>= start`` and those in
        ``extra`` are decoded and yielded; a shard holding none of them is not even opened."""
        sizes = [int(sh["num_samples"]) for sh in self.shards]
        order = shard_order(sizes, self.shuffle, self.seed, epoch)
        plan = reader_shard_plan(sizes, order, g, r_total, self.assignment)
        wanted = sorted(set(int(i) for i in extra if i < start))
        wanted_set = set(wanted)
        lo = 0
        for s, first, stride, off in plan:
            hi = lo + _kept(first, sizes[s], stride, off)
            j = bisect.bisect_left(wanted, lo)
            if hi <= start and (j == len(wanted) or wanted[j] >= hi):
                lo = hi
                continue
            sh = self.shards[s]
            url = shard_url(self.base_url, sh["name"])
            i = lo
            try:
                for key, members in self._iter_tar(url, sizes[s], first, stride, off, slot):
                    idx, i = i, i + 1
                    if idx < start and idx not in wanted_set:
                        continue
                    try:
                        yield idx, decode_sample(key, members, url, self.num_items, self.manifest_max_len,
                                                 self.min_history_len, with_seen=self.split != "train")
                    except ShardError as e:
                        self._fail(e, slot, _BAD_SAMPLES)
            except ShardError as e:
                self._fail(e, slot, _BAD_SHARDS)
            lo = hi

    def _shuffled(self, it: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        sb = _ShuffleBuffer(self.shuffle_buffer, rng)
        for x in it:
            y = sb.push(x)
            if y is not sb.EMPTY:
                yield y
        yield from sb.drain()

    def _stream(self, g: int, r_total: int, slot: int, epoch: int, skip: int, n: int) -> Iterator[Any]:
        """Reader ``g``'s samples in the order they are batched, without the first ``skip``.

        ``skip > 0`` (resume): with ``on_error="raise"`` the position is found by running
        the shuffle buffer on stream indices ``0..n-1`` (no I/O); then only the samples
        still in the buffer and those after the position are read and decoded, and shards
        holding none of them are not opened. With ``on_error="skip"`` (bad samples change
        the stream) the skipped samples are read, shuffled and dropped uncollated.
        """
        rng = np.random.default_rng([self.seed, epoch, g]) if self.shuffle else None
        if skip <= 0 or self.on_error != "raise":
            it: Iterator[Any] = (x for _, x in self._samples(g, r_total, slot, epoch))
            if rng is not None:
                it = self._shuffled(it, rng)
            for i, x in enumerate(it):
                if i >= skip:
                    yield x
            return
        if rng is None:
            for _, x in self._samples(g, r_total, slot, epoch, start=skip):
                yield x
            return
        sb = _ShuffleBuffer(self.shuffle_buffer, rng)
        pos = emitted = 0
        while emitted < skip and pos < n:
            if sb.push(pos) is not sb.EMPTY:
                emitted += 1
            pos += 1
        if emitted < skip:  # the resume point lies in the final drain
            order = sb.drain()[skip - emitted:]
            got = dict(self._samples(g, r_total, slot, epoch, start=n, extra=order))
            for i in order:
                yield got.pop(i)
            return
        held: Dict[int, Any] = {}
        filled = False
        for i, x in self._samples(g, r_total, slot, epoch, start=pos, extra=sb.buf):
            if i < pos:
                held[i] = x
                continue
            if not filled:
                sb.buf = [held.pop(j) for j in sb.buf]
                filled = True
            y = sb.push(x)
            if y is not sb.EMPTY:
                yield y
        if not filled:
            sb.buf = [held.pop(j) for j in sb.buf]
        yield from sb.drain()

    def collate(self, samples: Sequence[Tuple[Any, ...]]) -> Dict[str, torch.Tensor]:
        """Stack decoded samples into a batch (history left-padded with 0 to ``max_len``;
        an empty history gives an all-padding row). Val/test batches also get ``"seen"``
        (B, S): each user's whole seen set, right-padded with 0 (S = the batch's largest)."""
        hist = np.zeros((len(samples), self.max_len), dtype=np.int64)
        for b, s in enumerate(samples):
            h = s[0]
            if h.size:
                h = h[-self.max_len:]
                hist[b, self.max_len - h.size:] = h
        out = {
            "history": torch.from_numpy(hist),
            "target": torch.tensor([s[1] for s in samples], dtype=torch.int64),
            "user": torch.tensor([s[2] for s in samples], dtype=torch.int64),
        }
        if self.split != "train":
            width = max((int(s[3].size) for s in samples), default=0)
            seen = np.zeros((len(samples), width), dtype=np.int64)
            for b, s in enumerate(samples):
                seen[b, : s[3].size] = s[3]
            out["seen"] = torch.from_numpy(seen)
        return out

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch = self.epoch
        start = int(self._resume[1]) if int(self._resume[0]) == epoch else 0
        per_worker, _, caps = self._layout(nw)
        skip, shift = worker_resume(caps, start)
        role = (wid + shift) % nw  # the original worker whose batches this worker continues
        r_total = self.world_size * nw
        g = self.rank * nw + role
        slot = wid % _STAT_SLOTS
        cap, done = caps[role], skip[role]
        if done >= cap:
            return
        it = self._stream(g, r_total, slot, epoch, done * self.batch_size, per_worker[role])
        batch: List[Tuple[np.ndarray, int, int]] = []
        try:
            for s in it:
                batch.append(s)
                if len(batch) == self.batch_size:
                    yield self._emit(batch, slot)
                    batch = []
                    done += 1
                    if done >= cap:
                        return
            if batch and not self.drop_last:
                yield self._emit(batch, slot)
        finally:
            if hasattr(it, "close"):
                it.close()

    def _emit(self, batch: List[Tuple[np.ndarray, int, int]], slot: int) -> Dict[str, torch.Tensor]:
        self._stats[slot, _SAMPLES] += len(batch)
        self._stats[slot, _BATCHES] += 1
        return self.collate(batch)


def reader_position(reader: ShardReader, batch_in_epoch: int, num_workers: int = 0) -> Dict[str, Any]:
    """``reader.data_position(batch_in_epoch, num_workers)``: what a checkpoint stores per rank."""
    return reader.data_position(batch_in_epoch, num_workers)
