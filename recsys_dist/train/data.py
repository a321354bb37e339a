"""The job's data glue: shards built (or found) once, per-rank loaders over a split, the
seeded evaluation subset, and the manifest's per-item count files.

Every rank gets the same number of train batches an epoch (the manifest's batch plan), so no
rank waits in a collective for a batch that never comes; evaluation loaders are unequal and
the evaluator keeps ranks in lockstep (``recsys_dist.distributed.in_lockstep``).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from recsys_dist.config import JobConfig, default_data_dir, stream_seed
from recsys_dist.distributed import any_rank

log = logging.getLogger("recsys_dist.train")


def build_job_shards(cfg: JobConfig) -> dict[str, Any]:
    """Build (or find, when already built with the same parameters) the job's shards."""
    from shards.build import build_shards

    if cfg.data.dataset == "synthetic":
        from shards.synthetic import synth_shards
        return synth_shards(cfg.data.resolved_shards_url(), num_items=cfg.data.synth_items,
                            num_users=cfg.data.synth_users, seed=cfg.train.seed,
                            train_prefixes_per_user=cfg.data.train_prefixes_per_user,
                            records_per_block=cfg.data.records_per_block, blocks_per_shard=cfg.data.blocks_per_shard,
                            compress=cfg.data.compress)
    from recsys_dist.config import DataConfig

    if cfg.data.source == DataConfig().source and cfg.data.dataset != DataConfig().dataset:
        raise ValueError(f"data.dataset={cfg.data.dataset!r} but data.source is the default dataset's "
                         f"({DataConfig().dataset}): name its source (e.g. base: [datasets/<name>.yaml], "
                         "or data.source.path=... data.source.user=...)")
    return build_shards(cfg.data.source, cfg.data.resolved_shards_url(), dataset=cfg.data.dataset,
                        data_dir=cfg.data.data_dir or default_data_dir(),
                        train_prefixes_per_user=cfg.data.train_prefixes_per_user,
                        records_per_block=cfg.data.records_per_block, blocks_per_shard=cfg.data.blocks_per_shard,
                        compress=cfg.data.compress)


def ensure_shards(cfg: JobConfig, rank: int) -> dict[str, Any]:
    """Rank 0 builds the shards unless a complete manifest of the same build is there (which is
    also used when the raw data is absent), others wait; returns the manifest."""
    from shards.format import load_manifest

    error: Exception | None = None
    if rank == 0 and cfg.data.build_if_missing:
        try:
            build_job_shards(cfg)
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
    failed = any_rank(error is not None)  # the others learn of it instead of timing out
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank 0 failed to build the shards at {cfg.data.resolved_shards_url()} (see its log)")
    manifest = load_manifest(cfg.data.resolved_shards_url())
    if cfg.data.train_prefixes_per_user != manifest["train_prefixes_per_user"]:
        raise ValueError(f"data.train_prefixes_per_user={cfg.data.train_prefixes_per_user} but the shards at "
                         f"{cfg.data.resolved_shards_url()} were built with {manifest['train_prefixes_per_user']}: "
                         "rebuild them (python -m launcher prepare) or set data.shards_url")
    return manifest


def make_loader(cfg: JobConfig, manifest: dict, split: str, rank: int, world: int, train: bool,
                batch_size: int, epoch: int = 0, start_batch: int = 0):
    """DataLoader over one split for this rank, and (train) the equal per-rank batch count.

    ``start_batch``: resume mid-epoch -- the stream starts at this rank's batch ``start_batch``
    of ``epoch``, exactly as the uninterrupted stream continues from there."""
    from shards.dataset import SequenceDataset
    from shards.plan import steps_per_epoch

    max_batches = None
    if train:
        max_batches = steps_per_epoch(manifest, batch_size, world)
        if max_batches == 0:
            raise ValueError(f"split '{split}' has too few samples for batch {batch_size} x {world} ranks")
    reader = SequenceDataset(cfg.data.resolved_shards_url(), split, batch_size, rank, world, max_len=cfg.data.max_len,
                             shuffle=train, seed=cfg.train.seed, epoch=epoch, drop_last=train,
                             max_batches=max_batches, start_batch=start_batch, window_blocks=cfg.data.window_blocks,
                             manifest=manifest)
    # its own generator: creating an iterator must not draw from the global torch RNG (dropout
    # masks), or a resumed run (a fresh iterator mid-epoch) would drift from an uninterrupted one
    loader = DataLoader(reader, batch_size=None, num_workers=cfg.data.num_workers, persistent_workers=False,
                        generator=torch.Generator().manual_seed(stream_seed(cfg.train.seed, "loader", epoch)))
    return loader, max_batches


def train_steps_per_epoch(cfg: JobConfig, manifest: dict, world: int) -> int:
    """Optimizer steps in one epoch of the train split: the equal per-rank batch count."""
    from shards.plan import steps_per_epoch

    n = steps_per_epoch(manifest, cfg.train.batch_size, world)
    if n == 0:
        raise ValueError(f"split 'train' has too few samples for batch {cfg.train.batch_size} x {world} ranks")
    return n


def user_subset_rank(num_ids: int, seed: int) -> torch.Tensor:
    """(num_ids,) long: each user id's position in a seeded random order of ``0..num_ids-1``.

    ``rank[u] < n`` selects a fixed random subset of ``n`` users: the same for any world size,
    batching or worker count, and not biased to the first ids (which sort by raw id)."""
    perm = torch.randperm(num_ids, generator=torch.Generator().manual_seed(stream_seed(seed, "eval-subset")))
    out = torch.empty(num_ids, dtype=torch.long)
    out[perm] = torch.arange(num_ids)
    return out


def eval_subset(batches, max_users: int | None, manifest: dict | None = None, split: str = "val",
            seed: int = 0) -> Iterator[dict]:
    """Keep a fixed, seeded random subset of ``max_users`` users (all users when None)."""
    order = None
    if max_users is not None:
        ids = int(manifest["num_records"]) if manifest else 0
        order = user_subset_rank(ids, seed) if ids else None
    for b in batches:
        if max_users is not None:
            if order is None or (b["user"].numel() and int(b["user"].max()) >= order.numel()):
                keep = b["user"] < max_users  # ids beyond the manifest's count: first ids (old callers)
            else:
                keep = order[b["user"]] < max_users
            b = {k: v[keep] for k, v in b.items()}
        yield b


def load_item_counts(cfg: JobConfig, manifest: dict, key: str = "train_item_counts_file") -> torch.Tensor:
    """(num_items + 1,) int64 per-item counts (row 0 = padding = 0): ``train_item_counts_file``,
    every train-split occurrence (the popularity ranker's scores), or ``train_target_counts_file``,
    how often each item is a train *target* (the arrival distribution of in-batch negatives;
    manifests without it, e.g. synthetic shards, fall back to the occurrence counts)."""
    import io

    import fsspec
    import numpy as np
    from shards.format import resolve_manifest_url, shard_url

    if key not in manifest:
        log.warning("manifest has no %s; using train_item_counts_file (occurrences, not targets)", key)
        key = "train_item_counts_file"
    _, base = resolve_manifest_url(cfg.data.resolved_shards_url())
    with fsspec.open(shard_url(base, manifest[key]), "rb") as f:
        return torch.as_tensor(np.load(io.BytesIO(f.read()), allow_pickle=False))
