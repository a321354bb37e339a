"""WebDataset shards of leave-one-out sequential-recommendation samples.

Build (:func:`build_shards`, CLI ``python -m shards build``) and read
(:class:`ShardReader`) the ``recsys-dist/seq-v1`` format described in
:mod:`shards.schema` and :mod:`shards.build`.
"""

from .build import build_shards, split_samples, summarize, train_item_counts
from .reader import (
    ShardReader,
    load_manifest,
    plan_batches,
    plan_reader_samples,
    reader_shard_plan,
    resolve_manifest_url,
    shard_order,
    shard_url,
    steps_per_epoch,
    verify_shards,
    worker_batch_caps,
)
from .schema import FORMAT, MEMBERS, PAD_ID, SPLITS, ShardError, decode_sample, encode_sample, make_key, shard_name
from .sources import DATASETS, SequenceData, dataset_path, default_data_dir, load_sequences

__all__ = [
    "DATASETS",
    "FORMAT",
    "MEMBERS",
    "PAD_ID",
    "SPLITS",
    "SequenceData",
    "ShardError",
    "ShardReader",
    "build_shards",
    "dataset_path",
    "decode_sample",
    "default_data_dir",
    "encode_sample",
    "load_manifest",
    "load_sequences",
    "make_key",
    "plan_batches",
    "plan_reader_samples",
    "reader_shard_plan",
    "resolve_manifest_url",
    "shard_name",
    "shard_order",
    "shard_url",
    "split_samples",
    "steps_per_epoch",
    "summarize",
    "train_item_counts",
    "verify_shards",
    "worker_batch_caps",
]
