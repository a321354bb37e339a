"""The training job: shards -> item table + DeepSpeed dense -> validate -> test once.

:class:`Trainer` owns the engine, the table, the catalog loss, the loaders' glue and the
checkpoint manager; :meth:`Trainer.fit` reads top to bottom as the job. State selection uses
the validation split only; the test split is evaluated exactly once, for the selected state
(once per eval-noise seed for models whose inference draws noise).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from recsys_dist.config import JobConfig, stream_seed
from recsys_dist.distributed import (any_rank, barrier, gather_objects, init_distributed, pick_device,
                                     seed_everything)
from recsys_dist.models import build_model
from recsys_dist.sparse import ShardedItemTable, check_sparse_config
from recsys_dist.train.catalog_loss import build_catalog_loss
from recsys_dist.train.checkpoint import CheckpointManager, TrainState
from recsys_dist.train.data import (ensure_shards, eval_subset, load_item_counts, make_loader,
                                    train_steps_per_epoch)
from recsys_dist.train.engine import build_engine
from recsys_dist.train.negatives import NegativeSampler
from recsys_dist.train.report import RunReport, peak_rss_gib_per_rank, setup_logging
from recsys_dist.train.step import check_objective, train_step
from recsys_dist.train.validate import check_mask_scope, evaluate_model, evaluate_popularity

log = logging.getLogger("recsys_dist.train")

TIE_MEANING = {
    "expected": "HR/NDCG averaged exactly over a uniformly random order of the items tied with the target",
    "optimistic": "the target wins every tie (items scoring strictly higher count against it)",
    "pessimistic": "the target loses every tie (items scoring higher or equal count against it)",
}


def fit(cfg: JobConfig) -> dict[str, Any]:
    """Train and evaluate one job; returns (on every rank) the metrics written to metrics.json.

    With checkpoints on (the default) the job resumes from the newest complete checkpoint
    under ``cfg.checkpoint_url()`` and continues exactly where it stopped (see checkpoint.py).
    """
    return Trainer(cfg).fit()


def run_length(cfg: JobConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, validate every N steps; 0 = only at the end). Epoch-based runs
    (``train.max_epochs > 0``) ignore ``train.max_steps``; ``train.eval_every_epochs > 0``
    overrides ``train.eval_every``."""
    total = cfg.train.max_epochs * steps_per_epoch if cfg.train.max_epochs > 0 else cfg.train.max_steps
    every = cfg.train.eval_every_epochs * steps_per_epoch if cfg.train.eval_every_epochs > 0 else cfg.train.eval_every
    return total, every


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


class Trainer:
    """One job on this rank. Construction joins the process group, builds (or finds) the
    shards, the model, the item table, the engine and the catalog loss, and resumes from the
    newest checkpoint; :meth:`fit` trains, selects on validation and tests once."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.rank, self.world = init_distributed(self.device, cfg.train.collective_timeout_s)
        setup_logging(self.rank, cfg.run_dir())
        seed_everything(cfg.train.seed)
        log.info("job %s: %s on %s, %d rank(s), device %s", cfg.name, cfg.model.name, cfg.data.dataset,
                 self.world, self.device)
        check_objective(build_model(cfg.model, cfg.data.max_len), cfg.train.objective)  # before any shard build
        check_sparse_config(cfg.sparse)  # e.g. adamw needs data_parallel
        check_mask_scope(cfg.eval.mask_scope)
        self.manifest = ensure_shards(cfg, self.rank)
        self.num_rows = int(self.manifest["num_items"]) + 1
        model = build_model(cfg.model, cfg.data.max_len)
        self.table = ShardedItemTable.create(self.num_rows, cfg.model.dim, cfg.sparse, self.device,
                                             cfg.train.batch_size, cfg.train.seed)
        self.engine = build_engine(model, cfg.train, self.device)
        # Dense init above is identical on every rank; dropout masks from here on are drawn per
        # (seed, rank), so data-parallel ranks do not share masks (a resume restores this state).
        torch.manual_seed(stream_seed(cfg.train.seed, "dropout", self.rank))
        self.catalog_loss = self._catalog_loss(model)
        self.report = RunReport(cfg.run_dir(), self.rank)
        self.steps_per_epoch = train_steps_per_epoch(cfg, self.manifest, self.world)
        self.total_steps, self.eval_every = run_length(cfg, self.steps_per_epoch)
        self.state = TrainState()
        self.ckpt: CheckpointManager | None = None
        self._saved_step: int | None = None
        self.stop_early = False  # set by validate(), or by _resume() for a run that had stopped
        self._resume()
        self.best: Snapshot | None = None  # in memory; with checkpoints also on storage (save_best)
        # the best state is the current one until training moves on: it is copied only then
        # (a run validated at its end alone never holds a second copy of the table)
        self._best_is_current = False
        self.last_val: dict[str, float] = dict(self.state.val[-1][1]) if self.state.val else {}
        # wall time spent training (not validating), carried across restarts through the val records
        self._wall_before = float(self.last_val.get("train_seconds", 0.0))
        self._t_run, self._t_val = time.perf_counter(), 0.0
        self._t_train, self._timed_steps, self._local_steps = 0.0, 0, 0
        self.reader = None  # the current epoch's reader (its position goes into checkpoints)
        self.bar = None  # the progress bar (rank 0), made by the first train_epoch

    # ---- set-up ------------------------------------------------------------------------
    def _catalog_loss(self, model):
        cfg = self.cfg.train
        sampler = None
        if cfg.loss == "sampled_softmax":
            needs_counts = cfg.negative_sampler == "popularity" or cfg.in_batch_negatives
            counts = load_item_counts(self.cfg, self.manifest, "train_target_counts_file") if needs_counts else None
            sampler = NegativeSampler(self.num_rows, counts, cfg.negative_sampler, cfg.sampler_alpha)
        return build_catalog_loss(cfg.loss, self.table, model, seed=cfg.seed, num_negatives=cfg.num_negatives,
                                  sampler=sampler, in_batch_negatives=cfg.in_batch_negatives)

    def _resume(self) -> None:
        """Load the newest complete checkpoint (when enabled); a mid-epoch resume continues the
        epoch's stream exactly when the saved data position is valid here, else the epoch
        restarts at batch 0 (other world size, other worker count), with a warning."""
        cfg = self.cfg
        if not cfg.checkpoint.enabled:
            return
        self.ckpt = CheckpointManager(cfg.checkpoint_url(), cfg, self.num_rows, cfg.checkpoint.keep,
                                      cfg.checkpoint.verify)
        latest = self.ckpt.latest() if cfg.checkpoint.resume else None
        if latest is None:
            return
        state = self.state = self.ckpt.load(latest, self.engine, self.table)
        self._saved_step = state.step
        self.report.losses, self.report.val = list(state.losses), list(state.val)
        since_best = self._validations_since_best()
        if cfg.train.patience > 0 and since_best >= cfg.train.patience:
            # the run had stopped early (or would have, under this patience): continuing would
            # train past its stop; a larger train.patience on resume lets it train on
            self.stop_early = True
            log.info("resumed at step %d after an early stop (%d validations without a better %s, "
                     "train.patience %d): no more training; selecting and testing", state.step, since_best,
                     cfg.eval.select_metric, cfg.train.patience)
        if not state.batch_in_epoch:
            return
        probe, _ = self._train_loader()
        try:
            if state.data_position is None:
                raise ValueError("the checkpoint holds no data position for this rank (other world size?)")
            probe.dataset.check_position(state.data_position)
        except ValueError as exc:
            log.warning("%s: epoch %d restarts at batch 0 instead of %d (its first batches are seen twice)",
                        exc, state.epoch, state.batch_in_epoch)
            state.batch_in_epoch = 0

    def _train_loader(self):
        return make_loader(self.cfg, self.manifest, "train", self.rank, self.world, True, self.cfg.train.batch_size,
                           self.state.epoch, self.state.batch_in_epoch)

    def eval_batches(self, split: str, max_users: int | None):
        loader, _ = make_loader(self.cfg, self.manifest, split, self.rank, self.world, False, self.cfg.eval.batch_size)
        return eval_subset(loader, max_users, self.manifest, split, self.cfg.eval.seed)

    # ---- the job -----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.max_epochs`` / ``train.max_steps`` or early stop, validate at the
        end unless just done, checkpoint, then select and test once."""
        cfg, state = self.cfg, self.state
        log.info("%d steps per epoch (batch %d x %d ranks); run: %d steps (%s), validate every %s",
                 self.steps_per_epoch, cfg.train.batch_size, self.world, self.total_steps,
                 f"{cfg.train.max_epochs} epochs" if cfg.train.max_epochs > 0 else "train.max_steps",
                 f"{self.eval_every} steps" if self.eval_every else "run end")
        while state.step < self.total_steps and not self.stop_early:
            self.train_epoch()
        if self.bar is not None:
            self.bar.close()
        if not any(s == state.step for s, _ in self.report.val):  # not already validated at this step
            self.validate()
        self.save_checkpoint()
        return self.select_and_test()

    def train_epoch(self) -> None:
        """The rest of the current epoch (from ``state.batch_in_epoch``), validating and
        checkpointing on their schedules; stops early at the run's end or an early stop."""
        cfg, state = self.cfg, self.state
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=state.step, desc=f"train {cfg.name}",
                            disable=self.rank != 0, dynamic_ncols=True)
        loader, _ = self._train_loader()
        self.reader = loader.dataset
        for batch in loader:
            if self._best_is_current:  # training is about to move the selected state
                self._best_is_current = False
                if self._copy_best_in_memory():
                    self.best = Snapshot.take(state.step, self.engine, self.table)
            t0 = time.perf_counter()
            loss = train_step(self.engine, self.table, batch["history"].to(self.device),
                              batch["target"].to(self.device), state.step, cfg.train.seed, self.catalog_loss,
                              objective=cfg.train.objective)
            state.step += 1
            state.batch_in_epoch += 1
            self._local_steps += 1
            if self._local_steps > 2:  # the first steps of a process pay for lazy initialisation
                self._t_train += time.perf_counter() - t0
                self._timed_steps += 1
            if state.step % cfg.train.log_every == 0 or state.step == 1:
                self.report.loss(state.step, loss.item())
                self.bar.set_postfix(loss=f"{loss.item():.3f}", epoch=state.epoch)
            self.bar.update(1)
            more = state.step < self.total_steps
            if self.eval_every and state.step % self.eval_every == 0 and more:
                self.validate()
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and more:
                self.save_checkpoint()
            if not more or self.stop_early:
                return
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current state (the seeded ``eval.val_max_users`` subset);
        keeps the best state by ``eval.select_metric`` and decides an early stop."""
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        metrics = evaluate_model(self.engine.module, self.table, self.eval_batches("val", cfg.eval.val_max_users),
                                 cfg.eval, cfg.data.max_len)
        metrics["seconds"] = time.perf_counter() - t0
        self._t_val += metrics["seconds"]
        metrics["epoch"] = state.step / self.steps_per_epoch
        metrics["train_seconds"] = self._wall_before + time.perf_counter() - self._t_run - self._t_val
        self.report.validation(state.step, metrics)
        self.last_val = metrics
        value = metrics[cfg.eval.select_metric]
        log.info("step %d val %s", state.step, _fmt(metrics))
        if value != value:
            raise RuntimeError(f"validation {cfg.eval.select_metric} is NaN at step {state.step} "
                               f"({metrics.get('num_users')} users): nothing to select")
        if value > state.best_value:
            state.best_value, state.best_step = value, state.step
            self.best, self._best_is_current = None, True  # copied before the next step (train_epoch)
            if self.ckpt is not None:
                self.ckpt.save_best(self.engine, self.table, state.step, value)
        since_best = self._validations_since_best()
        if cfg.train.patience > 0 and since_best >= cfg.train.patience:
            self.stop_early = True
            if state.step < self.total_steps:  # at the planned end there is nothing left to stop
                log.info("early stop at step %d: %d validations without a better %s (best %.4f at step %s)",
                         state.step, since_best, cfg.eval.select_metric, state.best_value, state.best_step)
        return metrics

    def _validations_since_best(self) -> int:
        """Validations recorded after the selected one (all of them when none is selected yet)."""
        best = self.state.best_step
        return sum(1 for s, _ in self.report.val if best is not None and s > best)

    def _copy_best_in_memory(self) -> bool:
        """Whether the selected state is also copied in memory: always without checkpoints;
        with them (the best is on storage, ``save_best``) only while every rank's table rows
        are at most ``checkpoint.best_in_memory_max_gib``, so a large table is never held twice."""
        limit = self.cfg.checkpoint.best_in_memory_max_gib * (1 << 30)
        return self.ckpt is None or not any_rank(self.table.local_row_bytes() > limit)

    def save_checkpoint(self) -> None:
        """A checkpoint of this step (unless one was just written), with the reader's position."""
        state = self.state
        if self.ckpt is None or self._saved_step == state.step:
            return
        state.losses, state.val = self.report.losses, self.report.val
        if self.reader is not None:
            state.data_position = self.reader.data_position(state.batch_in_epoch, num_workers=self.cfg.data.num_workers,
                                                            epoch=state.epoch)
        self.ckpt.save(self.engine, self.table, state)
        self._saved_step = state.step

    def select_and_test(self) -> dict[str, Any]:
        """Restore the validation-selected state, test it once per eval-noise seed, evaluate
        the popularity ranker, write ``metrics.json``; returns its payload on every rank."""
        cfg, state = self.cfg, self.state
        if self._best_is_current and state.best_step == state.step:
            pass  # the selected state is the current one
        elif self.best is not None and self.best.step == state.best_step:
            self.best.restore(self.engine, self.table)
        elif self.ckpt is not None and state.best_step is not None:
            self.ckpt.load_best(self.engine, self.table, state.best_step)  # selected before a restart
        else:
            raise RuntimeError("no validation result to select a state from")
        seeds = test_seeds(self.engine.module, cfg)
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            metrics = evaluate_model(self.engine.module, self.table,
                                     self.eval_batches("test", cfg.eval.test_max_users), cfg.eval,
                                     cfg.data.max_len, seed=seed)
            metrics["seconds"] = time.perf_counter() - t0
            per_seed.append(metrics)
        test, test_std = mean_and_std(per_seed)
        log.info("test (state of step %d, selected on val %s; %d eval seed(s)): %s", state.best_step,
                 cfg.eval.select_metric, len(seeds), _fmt(test))
        popularity = evaluate_popularity(load_item_counts(cfg, self.manifest), self.num_rows,
                                         self.eval_batches("test", cfg.eval.test_max_users), cfg.eval,
                                         self.rank, self.world)
        payload = self._payload(test, test_std, seeds, per_seed, popularity)
        payload["peak_rss_gib_per_rank"] = peak_rss_gib_per_rank()  # training and evaluation included
        rows = self.table.local_row_bytes()
        payload["item_table"] = {"rows": self.num_rows, "dim": self.table.dim, "sharding": self.cfg.sparse.sharding,
                                 "row_bytes_per_rank": [int(b) for b in gather_objects(rows)]}
        self.report.save(payload)
        self.report.close()
        barrier()
        return payload

    def _payload(self, test, test_std, seeds, per_seed, popularity) -> dict[str, Any]:
        cfg, state, report = self.cfg, self.state, self.report
        return {
            "name": cfg.name, "model": cfg.model.name, "dataset": cfg.data.dataset, "world_size": self.world,
            "device": str(self.device), "steps": state.step, "epochs_started": state.epoch,
            "steps_per_epoch": self.steps_per_epoch, "epochs": state.step / self.steps_per_epoch,
            # before the planned end only: patience running out at the last validation stops nothing
            "stopped_early": self.stop_early and state.step < self.total_steps,
            "train_seconds": float(report.val[-1][1].get("train_seconds", 0.0)) if report.val else 0.0,
            "selected_step": state.best_step, "select_metric": cfg.eval.select_metric, "best_val": state.best_value,
            "test": test, "test_std": test_std, "test_seeds": seeds, "test_per_seed": per_seed,
            "popularity_test": popularity, "last_val": self.last_val,
            "seconds_per_step": self._t_train / max(self._timed_steps, 1),
            "samples_per_second": cfg.train.batch_size * self.world * self._timed_steps / max(self._t_train, 1e-9),
            "protocol": {"mask_history": cfg.eval.mask_history, "mask_scope": cfg.eval.mask_scope,
                         "masked": ("nothing" if not cfg.eval.mask_history else
                                    "the user's whole seen set before the target (never the target)"
                                    if cfg.eval.mask_scope == "seen" else
                                    f"the items of the model's input window (the last {cfg.data.max_len}; never the target)"),
                         "full_catalog": True, "ties": cfg.eval.ties, "ties_meaning": TIE_MEANING[cfg.eval.ties],
                         "eval_noise_seed": cfg.eval.seed, "test_eval_seeds": seeds,
                         "val_users": cfg.eval.val_max_users or "all", "val_subset": "seeded random",
                         "selection": "validation", "test_evaluated_once": True},
            "config": cfg.to_dict(),
            "loss_curve": report.losses, "validation": report.val,
        }


def test_seeds(model, cfg: JobConfig) -> list[int]:
    """Eval-noise seeds of the test: ``eval.test_seeds`` of them for a model whose inference
    draws noise (diffusion models), one for a deterministic model."""
    stochastic = bool(model.draw_eval_noise(1, cfg.data.max_len, torch.Generator().manual_seed(0)))
    n = max(1, cfg.eval.test_seeds) if stochastic else 1
    return [cfg.eval.seed + i for i in range(n)]


def mean_and_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and sample standard deviation (0 for one run) over eval runs."""
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


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
