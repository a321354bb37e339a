"""The data layer: raw sources -> ``recsys-dist/seq-v2`` WebDataset shards -> batches.

* :mod:`shards.source`: any dataset by config (``data.source``): a table, DreamRec replay
  rows or DiffRec lists -> :class:`~shards.records.Records` (per-user or per-session
  sequences with train / valid / test segments);
* :mod:`shards.build`: records -> checksummed blocks in ordinary tar shards + manifest
  (:mod:`shards.format`); :mod:`shards.synthetic`: generated catalogs of any size;
* :mod:`shards.dataset`: ``SequenceDataset`` = the plan (:mod:`shards.plan`) + the
  verified stream (:mod:`shards.stream`, ``tarfile`` over :mod:`shards.storage`) + the
  samples (:mod:`shards.samples`); DiffRec's per-user sets are its ``split="records"``.
"""

from .build import build_shards, summarize, write_shards
from .format import FORMAT, PAD_ID, ShardError, load_manifest, resolve_manifest_url, shard_url
from .plan import plan_batches, rank_samples, steps_per_epoch
from .records import PROTOCOLS, Records
from .source import SourceConfig, load_records

__all__ = [
    "FORMAT",
    "PAD_ID",
    "PROTOCOLS",
    "Records",
    "ShardError",
    "SourceConfig",
    "build_shards",
    "load_manifest",
    "load_records",
    "plan_batches",
    "rank_samples",
    "resolve_manifest_url",
    "shard_url",
    "steps_per_epoch",
    "summarize",
    "write_shards",
]
