"""Reading ``recsys-dist/seq-v1`` shards with plain ``webdataset`` (for tools outside the trainer).

The shards are ordinary WebDataset tars (``<key>.history.i32``, ``<key>.target.i32``,
``<key>.user.i32``), so ``webdataset`` reads them once it can open the URLs.
webdataset 1.0.2 opens URLs through ``webdataset.gopen.gopen_schemes``, which
has no ``s3://`` (only ``pipe``, ``http(s)`` via curl, ``gs`` via gsutil, ...).
:func:`register_fsspec_gopen` adds an fsspec-backed opener (with the retries of
:func:`shards.storage.open_retrying`) for ``s3`` and every other fsspec scheme
webdataset does not handle itself::

    import webdataset as wds
    from shards.reader import load_manifest, resolve_manifest_url, shard_url
    from shards.schema import decode_sample
    from shards.wds import register_fsspec_gopen, ensure_fsspec_gopen

    register_fsspec_gopen()                      # this process (fork-started workers inherit it)
    m = load_manifest("s3://bucket/ml-1m")
    _, base = resolve_manifest_url("s3://bucket/ml-1m")
    urls = [shard_url(base, sh["name"]) for sh in m["splits"]["train"]["shards"]]
    ds = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,                     # whole shards per DataLoader worker
        ensure_fsspec_gopen,                     # registers the opener inside spawn-started workers too
        wds.tarfile_to_samples(),                # {"__key__", "__url__", "history.i32": bytes, ...}
        wds.map(lambda s: decode_sample(s["__key__"], s, s["__url__"], m["num_items"], m["max_len"],
                                        m["min_history_len"])),
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)

:func:`webdataset_pipeline` builds exactly this (with a picklable decoder).

What plain webdataset does *not* give you, and :class:`shards.reader.ShardReader`
does (see its module docstring): a sample-level split when there are fewer
shards than ``ranks x workers`` (``split_by_worker`` / ``split_by_node`` hand out
whole shards, so some readers get nothing), equal batch counts on every rank
(``plan_batches`` + ``max_batches``; with webdataset a rank that runs out first
hangs the others in the next collective), a deterministic per-epoch shuffle
without ``resampled=True`` + ``with_epoch``, exact mid-epoch resume, and
manifest-checked sample counts.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import fsspec

from .schema import decode_sample
from .storage import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BASE_DELAY,
    DEFAULT_MAX_DELAY,
    open_retrying,
    open_url,
)

# webdataset's own schemes, and local paths (handled before the table is consulted)
_NATIVE = {"", "file", "pipe", "http", "https", "ais", "sftp", "ftps", "scp", "gs", "htgs", "hf"}
_SETTINGS = {"attempts": DEFAULT_ATTEMPTS, "base_delay": DEFAULT_BASE_DELAY, "max_delay": DEFAULT_MAX_DELAY}


def _gopen_module() -> Any:
    import webdataset  # noqa: F401 - loads webdataset.gopen

    return sys.modules["webdataset.gopen"]  # ``webdataset.gopen`` the attribute is the function


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """A ``gopen_schemes`` handler: read through :func:`shards.storage.open_retrying`
    (reopen + seek on transient errors), write through plain fsspec."""
    if mode.startswith("r"):
        return open_retrying(url, attempts=_SETTINGS["attempts"], base_delay=_SETTINGS["base_delay"],
                             max_delay=_SETTINGS["max_delay"])
    if mode.startswith("w"):
        return open_url(url, "wb")
    raise ValueError(f"{mode}: unknown mode")


def register_fsspec_gopen(
    schemes: Optional[Sequence[str]] = None,
    override: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    base_delay: float = DEFAULT_BASE_DELAY,
    max_delay: float = DEFAULT_MAX_DELAY,
) -> List[str]:
    """Register :func:`gopen_fsspec` in ``webdataset.gopen.gopen_schemes`` (idempotent).

    Args:
        schemes: URL schemes to register; default every fsspec protocol that
            webdataset does not handle natively (``s3``, ``s3a``, ``gcs``, ``az``,
            ``abfs``, ``memory``, ``hdfs``, ...).
        override: also replace schemes webdataset handles itself (e.g. ``https``
            via curl, ``gs`` via gsutil); never ``file`` or plain paths, which
            webdataset opens before consulting the table.
        attempts, base_delay, max_delay: retry settings of reads (see
            :func:`shards.storage.open_retrying`); per process (spawn-started workers
            that register through :func:`ensure_fsspec_gopen` use the defaults).

    Returns:
        The schemes now served by fsspec.
    """
    _SETTINGS.update(attempts=int(attempts), base_delay=float(base_delay), max_delay=float(max_delay))
    table = _gopen_module().gopen_schemes
    wanted = list(schemes) if schemes is not None else [p for p in fsspec.available_protocols() if p not in _NATIVE]
    for s in wanted:
        if s in ("", "file") or (s in table and table[s] is not gopen_fsspec and not override):
            continue
        table[s] = gopen_fsspec
    return sorted(s for s, h in table.items() if h is gopen_fsspec)


def ensure_fsspec_gopen(src: Iterable[Any]) -> Iterator[Any]:
    """Pipeline stage (put it before ``tarfile_to_samples``): registers the fsspec opener in
    the process that iterates (a spawn-started DataLoader worker does not inherit the
    registration) and passes its input through."""
    if _gopen_module().gopen_schemes.get("s3") is not gopen_fsspec:
        register_fsspec_gopen()
    yield from src


class DecodeSample:
    """Picklable ``wds.map`` function: a webdataset sample dict -> ``{"__key__", "history"
    (int32 array, unpadded), "target", "user"}``, validated like :class:`ShardReader` does."""

    def __init__(self, num_items: int, max_len: int, min_history_len: int = 1) -> None:
        self.num_items, self.max_len, self.min_history_len = int(num_items), int(max_len), int(min_history_len)

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        key = sample["__key__"]
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        h, t, u = decode_sample(key, members, sample.get("__url__", "?"), self.num_items, self.max_len,
                                self.min_history_len)
        return {"__key__": key, "history": h, "target": t, "user": u}


def shard_urls(manifest_url_or_dir: str, split: str) -> List[str]:
    """URLs of ``split``'s shards, in manifest order."""
    from .reader import _split_shards, load_manifest, resolve_manifest_url, shard_url

    m = load_manifest(manifest_url_or_dir)
    _, base = resolve_manifest_url(manifest_url_or_dir)
    return [shard_url(base, sh["name"]) for sh in _split_shards(m, split)]


def webdataset_pipeline(manifest_url_or_dir: str, split: str, decode: bool = True,
                        split_by_node: bool = False) -> Any:
    """A plain ``webdataset.DataPipeline`` over ``split``'s shards (see the module docstring).

    Whole shards are split over DataLoader workers (``wds.split_by_worker``) and, with
    ``split_by_node``, over ranks (``wds.split_by_node``: torch.distributed or
    ``RANK``/``WORLD_SIZE``); no shuffling. Yields :class:`DecodeSample` dicts, or the raw
    webdataset samples with ``decode=False``. Use with
    ``DataLoader(pipeline, batch_size=None, num_workers=W)``; fork- and spawn-started
    workers both work (the pipeline registers the fsspec opener where it runs).
    """
    import webdataset as wds

    from .reader import load_manifest

    m = load_manifest(manifest_url_or_dir)
    register_fsspec_gopen()
    stages: List[Any] = [wds.SimpleShardList(shard_urls(manifest_url_or_dir, split))]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, ensure_fsspec_gopen, wds.tarfile_to_samples()]
    if decode:
        stages.append(wds.map(DecodeSample(m["num_items"], m["max_len"], m["min_history_len"])))
    return wds.DataPipeline(*stages)
