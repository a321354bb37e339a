"""Streaming, rank/worker-sharded reader of ``recsys-dist/seq-v1`` shards.

Use with ``torch.utils.data.DataLoader(reader, batch_size=None, num_workers=W)``:
the reader yields whole batches::

    {"history": LongTensor (B, max_len)  # left-padded with 0, most recent item last
     "target":  LongTensor (B,),
     "user":    LongTensor (B,)}

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tarfile
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import fsspec
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

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^((?:.*/)?[^/.]+)\.([^/]+)$")
_STAT_SLOTS = 64  # per-worker counter slots in shared memory
_BAD_SAMPLES, _BAD_SHARDS, _SAMPLES, _BATCHES = range(4)


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
        with fsspec.open(murl, "rb") as f:
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
                with fsspec.open(url, "rb") as f:
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

    Counters (:attr:`bad_samples`, :attr:`bad_shards`, :attr:`samples_yielded`,
    :attr:`batches_yielded`) and the epoch live in shared memory, so they are
    seen across DataLoader worker processes (fork or spawn) and persistent workers.
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
        self._stats = torch.zeros(_STAT_SLOTS, 4, dtype=torch.int64).share_memory_()

    # ---------------------------------------------------------------- epoch / stats

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used for shuffling (visible to already-started workers)."""
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
        return self._stat(_BATCHES)

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

    # ---------------------------------------------------------------- reading

    def _fail(self, err: ShardError, slot: int, col: int) -> None:
        if self.on_error == "raise":
            raise err
        self._stats[slot, col] += 1
        log.warning("skipping bad %s: %s", "sample" if col == _BAD_SAMPLES else "shard", err)

    def _iter_tar(self, url: str, expected: int, first_index: int, stride: int, offset: int) -> Iterator[Tuple[str, Dict[str, bytes]]]:
        """Yield ``(key, members)`` of the samples ``i`` (``first_index`` + local index) with
        ``i % stride == offset``; member data of other samples is skipped unread."""
        try:
            fobj = fsspec.open(url, "rb").open()
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
                tf = tarfile.open(fileobj=fobj, mode="r|*")
                for ti in tf:
                    last = ti.name
                    if not ti.isfile():
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
                        fx = tf.extractfile(ti)
                        members[ext] = fx.read() if fx is not None else b""
                    else:
                        members[ext] = b""
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

    def _samples(self, g: int, r_total: int, slot: int, epoch: int) -> Iterator[Tuple[np.ndarray, int, int]]:
        sizes = [int(sh["num_samples"]) for sh in self.shards]
        order = shard_order(sizes, self.shuffle, self.seed, epoch)
        plan = reader_shard_plan(sizes, order, g, r_total, self.assignment)
        for s, first, stride, off in plan:
            sh = self.shards[s]
            url = shard_url(self.base_url, sh["name"])
            try:
                for key, members in self._iter_tar(url, sizes[s], first, stride, off):
                    try:
                        yield decode_sample(key, members, url, self.num_items, self.manifest_max_len,
                                            self.min_history_len)
                    except ShardError as e:
                        self._fail(e, slot, _BAD_SAMPLES)
            except ShardError as e:
                self._fail(e, slot, _BAD_SHARDS)

    def _shuffled(self, it: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        buf: List[Any] = []
        for x in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(x)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], x = x, buf[i]
            yield x
        for i in rng.permutation(len(buf)).tolist():
            yield buf[i]

    def collate(self, samples: Sequence[Tuple[np.ndarray, int, int]]) -> Dict[str, torch.Tensor]:
        """Stack decoded samples into a batch (history left-padded with 0 to ``max_len``;
        an empty history gives an all-padding row)."""
        hist = np.zeros((len(samples), self.max_len), dtype=np.int64)
        for b, (h, _, _) in enumerate(samples):
            if h.size:
                h = h[-self.max_len:]
                hist[b, self.max_len - h.size:] = h
        return {
            "history": torch.from_numpy(hist),
            "target": torch.tensor([t for _, t, _ in samples], dtype=torch.int64),
            "user": torch.tensor([u for _, _, u in samples], dtype=torch.int64),
        }

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        r_total = self.world_size * nw
        g = self.rank * nw + wid
        slot = wid % _STAT_SLOTS
        per_worker = plan_reader_samples(self.manifest, self.split, self.world_size, nw, self.assignment)[self.rank]
        wb = [_nbatches(n, self.batch_size, self.drop_last) for n in per_worker]
        cap = worker_batch_caps(wb, self.max_batches)[wid]
        if cap == 0:
            return
        epoch = self.epoch
        it: Iterator[Any] = self._samples(g, r_total, slot, epoch)
        if self.shuffle:
            it = self._shuffled(it, np.random.default_rng([self.seed, epoch, g]))
        batch: List[Tuple[np.ndarray, int, int]] = []
        done = 0
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
