"""The training job: shards -> sharded table + DeepSpeed dense -> validate -> test once.

Read top to bottom: ``fit`` is the whole job. Checkpoint selection uses the validation split
only; the test split is evaluated exactly once, for the selected state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from recsys_dist.config import JobConfig, default_data_dir, stream_seed
from recsys_dist.distributed import collective_device
from recsys_dist.models import build_model
from recsys_dist.sparse import ShardedItemTable, check_sparse_config
from recsys_dist.distributed import barrier, init_distributed, pick_device, seed_everything
from recsys_dist.train.checkpoint import CheckpointManager, TrainState
from recsys_dist.train.engine import build_engine
from recsys_dist.train.negatives import NegativeSampler
from recsys_dist.train.report import RunReport, setup_logging
from recsys_dist.train.step import check_objective, train_step
from recsys_dist.train.validate import evaluate_model, evaluate_popularity

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
    failed = torch.tensor([0 if error is None else 1], device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # the others learn of it instead of timing out
    if error is not None:
        raise error
    if failed.item():
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


def run_length(cfg: JobConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, validate every N steps; 0 = only at the end). Epoch-based runs
    (``train.max_epochs > 0``) ignore ``train.max_steps``; ``train.eval_every_epochs > 0``
    overrides ``train.eval_every``."""
    total = cfg.train.max_epochs * steps_per_epoch if cfg.train.max_epochs > 0 else cfg.train.max_steps
    every = cfg.train.eval_every_epochs * steps_per_epoch if cfg.train.eval_every_epochs > 0 else cfg.train.eval_every
    return total, every


def user_subset_rank(num_ids: int, seed: int) -> torch.Tensor:
    """(num_ids,) long: each user id's position in a seeded random order of ``0..num_ids-1``.

    ``rank[u] < n`` selects a fixed random subset of ``n`` users: the same for any world size,
    batching or worker count, and not biased to the first ids (which sort by raw id)."""
    perm = torch.randperm(num_ids, generator=torch.Generator().manual_seed(stream_seed(seed, "eval-subset")))
    out = torch.empty(num_ids, dtype=torch.long)
    out[perm] = torch.arange(num_ids)
    return out


def _subset(batches, max_users: int | None, manifest: dict | None = None, split: str = "val",
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


@dataclass
class Snapshot:
    """In-memory copy of the selected state: dense weights and this rank's table shards."""

    step: int
    dense: dict[str, torch.Tensor]
    shards: list[torch.Tensor]

    @classmethod
    def take(cls, step: int, engine, table: ShardedItemTable) -> "Snapshot":
        return cls(step, {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                   [t.detach().clone() for _, _, t in table.local_shards()])

    def restore(self, engine, table: ShardedItemTable) -> None:
        engine.module.load_state_dict(self.dense)
        with torch.no_grad():
            for (_, _, t), saved in zip(table.local_shards(), self.shards):
                t.copy_(saved)


def fit(cfg: JobConfig) -> dict[str, Any]:
    """Train and evaluate one job; returns (on every rank) the metrics written to metrics.json.

    With checkpoints on (the default) the job resumes from the newest complete checkpoint
    under ``cfg.checkpoint_url()`` and continues exactly where it stopped (see checkpoint.py).
    """
    device = pick_device(cfg.train.device)
    rank, world = init_distributed(device, cfg.train.collective_timeout_s)
    run_dir = cfg.run_dir()
    setup_logging(rank, run_dir)
    seed_everything(cfg.train.seed)
    log.info("job %s: %s on %s, %d rank(s), device %s", cfg.name, cfg.model.name, cfg.data.dataset, world, device)

    check_objective(build_model(cfg.model, cfg.data.max_len), cfg.train.objective)  # before any shard build
    check_sparse_config(cfg.sparse)  # e.g. adamw needs data_parallel
    manifest = ensure_shards(cfg, rank)
    num_rows = int(manifest["num_items"]) + 1
    model = build_model(cfg.model, cfg.data.max_len)
    table = ShardedItemTable.create(num_rows, cfg.model.dim, cfg.sparse, device, cfg.train.batch_size, cfg.train.seed)
    engine = build_engine(model, cfg.train, device)
    # Dense init above is identical on every rank; dropout masks from here on are drawn per
    # (seed, rank), so data-parallel ranks do not share masks (a resume restores this state).
    torch.manual_seed(stream_seed(cfg.train.seed, "dropout", rank))
    report = RunReport(run_dir, rank)

    ckpt: CheckpointManager | None = None
    state = TrainState()
    saved_step: int | None = None
    if cfg.checkpoint.enabled:
        ckpt = CheckpointManager(cfg.checkpoint_url(), cfg, num_rows, cfg.checkpoint.keep, cfg.checkpoint.verify)
        latest = ckpt.latest() if cfg.checkpoint.resume else None
        if latest is not None:
            state = ckpt.load(latest, engine, table)
            saved_step = state.step
            report.losses, report.val = list(state.losses), list(state.val)

    if state.batch_in_epoch:  # mid-epoch resume: exact only if the saved data position is valid here
        probe, _ = make_loader(cfg, manifest, "train", rank, world, True, cfg.train.batch_size, state.epoch,
                               state.batch_in_epoch)
        try:
            if state.data_position is None:
                raise ValueError("the checkpoint holds no data position for this rank (other world size?)")
            probe.dataset.check_position(state.data_position)
        except ValueError as exc:
            log.warning("%s: epoch %d restarts at batch 0 instead of %d (its first batches are seen twice)",
                        exc, state.epoch, state.batch_in_epoch)
            state.batch_in_epoch = 0
    steps_per_epoch = train_steps_per_epoch(cfg, manifest, world)
    total_steps, eval_every = run_length(cfg, steps_per_epoch)
    log.info("%d steps per epoch (batch %d x %d ranks); run: %d steps (%s), validate every %s", steps_per_epoch,
             cfg.train.batch_size, world, total_steps,
             f"{cfg.train.max_epochs} epochs" if cfg.train.max_epochs > 0 else "train.max_steps",
             f"{eval_every} steps" if eval_every else "run end",
             )
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=state.step, desc=f"train {cfg.name}", disable=rank != 0,
               dynamic_ncols=True)
    best: Snapshot | None = None  # in memory; with checkpoints also on storage (``ckpt.save_best``)
    last_val: dict[str, float] = dict(state.val[-1][1]) if state.val else {}
    t_train, t_steps, local_steps = 0.0, 0, 0
    # wall time spent training (not validating), carried across restarts through the val records
    wall_before = float(last_val.get("train_seconds", 0.0))
    t_run = time.perf_counter()
    t_val = 0.0
    stop_early = False

    def validate() -> None:
        nonlocal best, last_val, stop_early, t_val
        loader, _ = make_loader(cfg, manifest, "val", rank, world, False, cfg.eval.batch_size)
        t0 = time.perf_counter()
        metrics = evaluate_model(engine.module, table,
                                 _subset(loader, cfg.eval.val_max_users, manifest, "val", cfg.eval.seed),
                                 cfg.eval, cfg.data.max_len)
        metrics["seconds"] = time.perf_counter() - t0
        t_val += metrics["seconds"]
        metrics["epoch"] = state.step / steps_per_epoch
        metrics["train_seconds"] = wall_before + time.perf_counter() - t_run - t_val
        report.validation(state.step, metrics)
        last_val = metrics
        value = metrics[cfg.eval.select_metric]
        log.info("step %d val %s", state.step, _fmt(metrics))
        if value != value:
            raise RuntimeError(f"validation {cfg.eval.select_metric} is NaN at step {state.step} "
                               f"({metrics.get('num_users')} users): nothing to select")
        if value > state.best_value:
            state.best_value, state.best_step = value, state.step
            best = Snapshot.take(state.step, engine, table)
            if ckpt is not None:
                ckpt.save_best(engine, table, state.step, value)
        since_best = sum(1 for s, _ in report.val if state.best_step is not None and s > state.best_step)
        if cfg.train.patience > 0 and since_best >= cfg.train.patience:
            stop_early = True
            log.info("early stop at step %d: %d validations without a better %s (best %.4f at step %s)",
                     state.step, since_best, cfg.eval.select_metric, state.best_value, state.best_step)

    def save_checkpoint(reader=None) -> None:
        nonlocal saved_step
        if ckpt is not None and saved_step != state.step:
            state.losses, state.val = report.losses, report.val
            if reader is not None:
                state.data_position = reader.data_position(state.batch_in_epoch, num_workers=cfg.data.num_workers,
                                                           epoch=state.epoch)
            ckpt.save(engine, table, state)
            saved_step = state.step

    sampler = None
    if cfg.train.loss == "sampled_softmax":
        needs_counts = cfg.train.negative_sampler == "popularity" or cfg.train.in_batch_negatives
        counts = load_item_counts(cfg, manifest, "train_target_counts_file") if needs_counts else None
        sampler = NegativeSampler(num_rows, counts, cfg.train.negative_sampler, cfg.train.sampler_alpha)
    reader = None  # the current epoch's ShardReader (its position goes into checkpoints)
    while state.step < total_steps and not stop_early:
        loader, steps_per_epoch = make_loader(cfg, manifest, "train", rank, world, True, cfg.train.batch_size,
                                              state.epoch, state.batch_in_epoch)
        reader = loader.dataset
        for batch in loader:
            t0 = time.perf_counter()
            loss = train_step(engine, table, batch["history"].to(device), batch["target"].to(device), state.step,
                              cfg.train.seed, cfg.train.loss, cfg.train.num_negatives, sampler,
                              cfg.train.in_batch_negatives, objective=cfg.train.objective)
            state.step += 1
            state.batch_in_epoch += 1
            local_steps += 1
            if local_steps > 2:  # the first steps of a process pay for lazy initialisation
                t_train += time.perf_counter() - t0
                t_steps += 1
            if state.step % cfg.train.log_every == 0 or state.step == 1:
                report.loss(state.step, loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=state.epoch)
            bar.update(1)
            if eval_every and state.step % eval_every == 0 and state.step < total_steps:
                validate()
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < total_steps:
                save_checkpoint(reader)
            if state.step >= total_steps or stop_early:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    bar.close()
    if not any(s == state.step for s, _ in report.val):  # not already validated at this step
        validate()
    save_checkpoint(reader)

    if best is not None and best.step == state.best_step:
        best.restore(engine, table)
    elif ckpt is not None and state.best_step is not None:
        ckpt.load_best(engine, table, state.best_step)  # selected before a restart
    else:
        raise RuntimeError("no validation result to select a state from")
    seeds = test_seeds(engine.module, cfg)
    per_seed = []
    for seed in seeds:  # the selected state, tested once per eval-noise seed
        loader, _ = make_loader(cfg, manifest, "test", rank, world, False, cfg.eval.batch_size)
        t0 = time.perf_counter()
        metrics = evaluate_model(engine.module, table,
                                 _subset(loader, cfg.eval.test_max_users, manifest, "test", cfg.eval.seed),
                                 cfg.eval, cfg.data.max_len, seed=seed)
        metrics["seconds"] = time.perf_counter() - t0
        per_seed.append(metrics)
    test, test_std = mean_and_std(per_seed)
    log.info("test (state of step %d, selected on val %s; %d eval seed(s)): %s", state.best_step,
             cfg.eval.select_metric, len(seeds), _fmt(test))
    step, epoch, best_value = state.step, state.epoch, state.best_value

    popularity = popularity_metrics(cfg, manifest, rank, world)
    payload = {
        "name": cfg.name, "model": cfg.model.name, "dataset": cfg.data.dataset, "world_size": world,
        "device": str(device), "steps": step, "epochs_started": epoch, "steps_per_epoch": steps_per_epoch,
        "epochs": step / steps_per_epoch, "stopped_early": stop_early,
        "train_seconds": float(report.val[-1][1].get("train_seconds", 0.0)) if report.val else 0.0,
        "selected_step": state.best_step, "select_metric": cfg.eval.select_metric, "best_val": best_value,
        "test": test, "test_std": test_std, "test_seeds": seeds, "test_per_seed": per_seed,
        "popularity_test": popularity, "last_val": last_val,
        "seconds_per_step": t_train / max(t_steps, 1),
        "samples_per_second": cfg.train.batch_size * world * t_steps / max(t_train, 1e-9),
        "protocol": {"mask_history": cfg.eval.mask_history,
                     "masked": "the user's whole seen set before the target (never the target)"
                     if cfg.eval.mask_history else "nothing",
                     "full_catalog": True, "ties": cfg.eval.ties, "ties_meaning": TIE_MEANING[cfg.eval.ties],
                     "eval_noise_seed": cfg.eval.seed, "test_eval_seeds": seeds,
                     "val_users": cfg.eval.val_max_users or "all", "val_subset": "seeded random",
                     "selection": "validation", "test_evaluated_once": True},
        "config": cfg.to_dict(),
        "loss_curve": report.losses, "validation": report.val,
    }
    report.save(payload)
    report.close()
    barrier()
    return payload


TIE_MEANING = {
    "expected": "HR/NDCG averaged exactly over a uniformly random order of the items tied with the target",
    "optimistic": "the target wins every tie (items scoring strictly higher count against it)",
    "pessimistic": "the target loses every tie (items scoring higher or equal count against it)",
}


def test_seeds(model, cfg: JobConfig) -> list[int]:
    """Eval-noise seeds of the test: ``eval.test_seeds`` of them for a model whose inference
    draws noise (diffusion models), one for a deterministic model."""
    stochastic = bool(model.draw_eval_noise(1, cfg.data.max_len, torch.Generator().manual_seed(0)))
    n = max(1, cfg.eval.test_seeds) if stochastic else 1
    return [cfg.eval.seed + i for i in range(n)]


def mean_and_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and sample standard deviation (0 for one run) over eval runs."""
    import statistics

    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key, value in runs[0].items():
        if key == "num_users":
            mean[key] = value
            continue
        values = [float(r[key]) for r in runs]
        mean[key] = float(statistics.fmean(values))
        std[key] = float(statistics.stdev(values)) if len(values) > 1 else 0.0
    return mean, std


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


def popularity_metrics(cfg: JobConfig, manifest: dict, rank: int, world: int) -> dict[str, float]:
    """Test metrics of the popularity ranker (train-split counts) through the same evaluator."""
    counts = load_item_counts(cfg, manifest)
    loader, _ = make_loader(cfg, manifest, "test", rank, world, False, cfg.eval.batch_size)
    return evaluate_popularity(counts, int(manifest["num_items"]) + 1,
                               _subset(loader, cfg.eval.test_max_users, manifest, "test", cfg.eval.seed),
                               cfg.eval, rank, world)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
