"""WebDataset shards of sequential-recommendation samples.

Build (:func:`build_shards`, CLI ``python -m shards build``) and read
(:class:`ShardReader`) the ``recsys-dist/seq-v1`` format described in
:mod:`shards.schema` and :mod:`shards.build`: leave-one-out samples of the
DiffuRec datasets, or the DreamRec datasets' given session split
(manifest ``"protocol"``).
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
from .schema import (
    FORMAT,
    LEAVE_ONE_OUT,
    MEMBERS,
    PAD_ID,
    PROTOCOLS,
    SESSION_SPLIT,
    SPLITS,
    ShardError,
    decode_sample,
    encode_sample,
    make_key,
    manifest_protocol,
    shard_name,
)
from .sets import (
    SET_SPLITS,
    SETS_FORMAT,
    SetReader,
    build_sets_shards,
    load_sets_item_emb,
    load_sets_manifest,
)
from .sources import (
    DATASETS,
    SESSION_DATASETS,
    SequenceData,
    SessionData,
    SessionSplit,
    dataset_names,
    dataset_path,
    dataset_protocol,
    default_data_dir,
    load_sequences,
    load_session_splits,
    session_item_counts,
)

__all__ = [
    "DATASETS",
    "FORMAT",
    "LEAVE_ONE_OUT",
    "MEMBERS",
    "PAD_ID",
    "PROTOCOLS",
    "SESSION_DATASETS",
    "SESSION_SPLIT",
    "SETS_FORMAT",
    "SET_SPLITS",
    "SPLITS",
    "SequenceData",
    "SessionData",
    "SessionSplit",
    "SetReader",
    "ShardError",
    "ShardReader",
    "build_sets_shards",
    "build_shards",
    "dataset_names",
    "dataset_path",
    "dataset_protocol",
    "decode_sample",
    "default_data_dir",
    "encode_sample",
    "load_manifest",
    "load_sequences",
    "load_sets_item_emb",
    "load_sets_manifest",
    "load_session_splits",
    "manifest_protocol",
    "make_key",
    "plan_batches",
    "plan_reader_samples",
    "reader_shard_plan",
    "resolve_manifest_url",
    "session_item_counts",
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
