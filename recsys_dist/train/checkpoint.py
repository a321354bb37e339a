"""Checkpoints that continue a job exactly, written atomically to any fsspec URL.

Layout under ``checkpoint.url`` (default ``<output_dir>/<name>/checkpoints``)::

    step-00000040/
      table/             DCP (torch.distributed.checkpoint): the sharded item table and its
                         fused optimizer state, as ShardedTensors -- loads on any world size;
                         a replicated (data_parallel) table: its weights and its AdamW /
                         RowWiseAdagrad state as plain tensors, written once (DCP dedups them)
      dense/dense/       DeepSpeed engine checkpoint (module, ZeRO-partitioned optimizer, step)
      rank-00000.pt      per rank: torch RNG states (tensors only)
      checkpoint.json    written LAST, by rank 0, after every rank has finished writing: step,
                         data position, best-so-far, world size, config, and every file of the
                         checkpoint with its size and sha256
    best/step-00000030/  the validation-selected weights (table + dense module, DCP) + best.json

Atomicity: a directory without ``checkpoint.json`` is not a checkpoint (a crash mid-write leaves
one; it is ignored and removed by the next save). ``keep`` complete checkpoints are kept.

Loading refuses, before any state is touched, a checkpoint whose files are missing or differ in
size / sha256 from ``checkpoint.json``, or whose config differs in a field that shapes the
state (model, item count, optimizers, ZeRO stage). Nothing is unpickled beyond tensors and
plain containers: DCP for the table, ``torch.load(weights_only=True)`` for everything else,
DeepSpeed's loaders included (its three checkpoint classes are allow-listed).

World size may change between save and load: the table re-shards through DCP; the dense
ZeRO state goes through DeepSpeed's universal checkpoint (``ds_to_universal`` then
``load_universal``); RNG states cannot map across world sizes and are re-seeded from
``(seed, "resume-rng", step, rank)`` instead (logged).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import torch
import torch.distributed.checkpoint as dcp

from recsys_dist.config import JobConfig, stored_config_as_now, stream_seed
from recsys_dist.distributed import any_rank, barrier, broadcast_object, gather_objects, rank_and_world

log = logging.getLogger("recsys_dist.train")

MARKER = "checkpoint.json"
BEST_MARKER = "best.json"
DENSE_TAG = "dense"
FORMAT = "recsys-dist/ckpt-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the checkpoint and the reason."""


# --------------------------------------------------------------------------- safe loading

def _deepspeed_safe_globals() -> list:
    """The only non-container classes inside DeepSpeed's ZeRO checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every ``torch.load`` (DeepSpeed's included, which passes
    ``weights_only=False``) runs with ``weights_only=True`` and DeepSpeed's classes allowed."""
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = original


# --------------------------------------------------------------------------- storage helpers

def _fs(url: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _sha256(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def complete_steps(url: str) -> list[int]:
    """Steps of the complete checkpoints under ``url`` (those with a ``checkpoint.json``),
    ascending; [] when there is none. Any process may call it (no collective)."""
    fs, root = _fs(url)
    if not fs.exists(root):
        return []
    steps = []
    for entry in fs.ls(root, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith("step-") and fs.exists(posixpath.join(entry, MARKER)):
            steps.append(int(name[5:]))
    return sorted(steps)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _agree(error: str | None) -> None:
    """Raise on every rank if any rank failed (so nobody waits in the next collective)."""
    failed = any_rank(error is not None)
    if error is not None:
        raise CheckpointError(error)
    if failed:
        raise CheckpointError("another rank failed while handling the checkpoint (see its log)")


# Config fields a resumed job may change (longer training, other evaluation, other storage or
# world size; the per-rank batch may change only with the world size, keeping the global batch,
# checked separately). Any other difference -- model, data, optimizers, seeds -- is refused: resuming
# would silently mix two experiments.
MAY_CHANGE = ("name", "output_dir", "train.batch_size", "train.max_steps", "train.eval_every", "train.log_every",
              "train.max_epochs", "train.eval_every_epochs", "train.patience",
              "train.device", "train.collective_timeout_s", "data.num_workers", "data.shards_url",
              "data.data_dir", "data.build_if_missing", "eval.", "checkpoint.",
              "model.guidance_w", "model.sample_steps", "model.eta", "model.rank_by")  # sampling only


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def config_mismatch(saved: dict, current: dict, may_change: tuple[str, ...] = MAY_CHANGE,
                    labels: tuple[str, str] = ("checkpoint", "job")) -> list[str]:
    """Differences outside ``may_change`` (keys, or prefixes ending in ".") between two
    ``JobConfig.to_dict()`` (empty: compatible); ``labels`` name the two sides in the messages.

    A field the checkpoint lacks because it was added to ``JobConfig`` after the checkpoint was
    written counts as its default (``stored_config_as_now``), so a checkpoint from an older
    version resumes unless the job sets such a field otherwise. A field since removed or
    retyped is compared as stored, and so reported.
    """
    a, b = _leaves(stored_config_as_now(saved) or saved), _leaves(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in may_change):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {labels[0]} {a.get(key, '<absent>')!r} != {labels[1]} {b.get(key, '<absent>')!r}")
    return diffs


# --------------------------------------------------------------------------- state

@dataclass
class TrainState:
    """What the loop needs besides the weights to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` this rank (every rank) has consumed
    best_step: int | None = None
    best_value: float = float("-inf")
    losses: list = field(default_factory=list)
    val: list = field(default_factory=list)
    data_position: dict | None = None  # this rank's reader position (ShardReader.data_position)


class CheckpointManager:
    """Saves and restores a job's full state under one URL (see the module docstring)."""

    def __init__(self, url: str, cfg: JobConfig, num_rows: int, keep: int = 2,
                 verify: str = "sha256") -> None:
        self.url = url.rstrip("/")
        self.cfg = cfg
        self.num_rows = num_rows
        self.keep = max(1, keep)
        self.verify_mode = verify
        self.rank, self.world = rank_and_world()
        self.fs, self.root = _fs(self.url)

    # ---- discovery -----------------------------------------------------------------
    def _complete_steps(self) -> list[int]:
        return complete_steps(self.url)

    def latest(self) -> str | None:
        """URL of the newest complete checkpoint (rank 0 looks, every rank gets the answer)."""
        steps = broadcast_object(self._complete_steps() if self.rank == 0 else None)
        return _join(self.url, step_name(steps[-1])) if steps else None

    # ---- verification (no state touched) -------------------------------------------
    def read_meta(self, ckpt_url: str) -> dict:
        """checkpoint.json of ``ckpt_url``, after checking every file it lists and the config."""
        fs, root = _fs(ckpt_url)
        marker = posixpath.join(root, MARKER)
        if not fs.exists(marker):
            raise CheckpointError(f"{ckpt_url}: no {MARKER}: not a complete checkpoint "
                                  "(a save interrupted mid-write?)")
        try:
            with fs.open(marker, "rb") as f:
                meta = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{ckpt_url}/{MARKER}: unreadable: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{ckpt_url}: format {meta.get('format')!r}, expected {FORMAT!r}")
        problems = []
        if meta.get("num_rows") != self.num_rows:
            problems.append(f"item table rows: checkpoint {meta.get('num_rows')} != job {self.num_rows}")
        problems += config_mismatch(meta["config"], self.cfg.to_dict())
        saved_global = meta["config"]["train"]["batch_size"] * meta["world_size"]
        if saved_global != self.cfg.train.batch_size * self.world:
            problems.append(f"global batch: checkpoint {saved_global} ({meta['world_size']} rank(s)) != job "
                            f"{self.cfg.train.batch_size * self.world} ({self.world} rank(s))")
        if problems:
            raise CheckpointError(f"{ckpt_url}: written by a different job; refusing to load it "
                                  "(use a new checkpoint.url / name, or checkpoint.resume=false):\n  "
                                  + "\n  ".join(problems))
        for rel, info in sorted(meta["files"].items()):
            path = posixpath.join(root, rel)
            if not fs.exists(path):
                raise CheckpointError(f"{ckpt_url}: file {rel} is missing (listed in {MARKER})")
            size = fs.size(path)
            if size != info["bytes"]:
                raise CheckpointError(f"{ckpt_url}: file {rel} has {size} bytes, {MARKER} says "
                                      f"{info['bytes']} (truncated or replaced)")
            if self.verify_mode == "sha256" and _sha256(fs, path) != info["sha256"]:
                raise CheckpointError(f"{ckpt_url}: file {rel} fails its sha256 check (corrupt)")
        return meta

    # ---- save ----------------------------------------------------------------------
    def save(self, engine, table, state: TrainState) -> str:
        """Write a complete checkpoint of the current step (collective) and prune old ones."""
        t0 = time.perf_counter()
        ckpt = _join(self.url, step_name(state.step))
        fs, root = _fs(ckpt)
        if self.rank == 0 and fs.exists(root):  # a leftover of a crash at this step: start clean
            fs.rm(root, recursive=True)
        barrier()
        error = None
        try:
            dcp.save({"table": table.dmp.state_dict(), "table_optim": table.optimizer_state_dict()},
                     checkpoint_id=_join(ckpt, "table"))
            self._save_dense(engine, ckpt)
            self._save_rng(ckpt)
        except Exception as exc:  # noqa: BLE001 - reported on every rank by _agree
            error = f"rank {self.rank}: writing {ckpt} failed: {type(exc).__name__}: {exc}"
            log.error(error)
        _agree(error)
        positions = gather_objects(state.data_position)
        barrier()
        if self.rank == 0:
            files = {}
            for path in sorted(fs.find(root)):
                rel = posixpath.relpath(path, root)
                files[rel] = {"bytes": fs.size(path), "sha256": _sha256(fs, path)}
            meta = {"format": FORMAT, "step": state.step, "epoch": state.epoch,
                    "batch_in_epoch": state.batch_in_epoch, "world_size": self.world,
                    "data_position": positions,  # per rank: epoch, start batch, per-worker batches/samples
                    "num_rows": self.num_rows, "best_step": state.best_step,
                    "best_value": state.best_value if state.best_step is not None else None,
                    "losses": state.losses, "val": state.val, "config": self.cfg.to_dict(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
            with fs.open(posixpath.join(root, MARKER + ".tmp"), "wb") as f:
                f.write(json.dumps(meta, indent=1).encode())
            fs.mv(posixpath.join(root, MARKER + ".tmp"), posixpath.join(root, MARKER))
            self._prune(state.step)
            log.info("checkpoint %s written in %.1fs", ckpt, time.perf_counter() - t0)
        barrier()
        return ckpt

    def _prune(self, newest: int) -> None:
        """Keep the last ``keep`` complete checkpoints; drop incomplete ones older than ``newest``."""
        complete = self._complete_steps()
        drop = set(complete[:-self.keep])
        for entry in self.fs.ls(self.root, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if not name.startswith("step-"):
                continue
            step = int(name[5:])
            if step in drop or (step < newest and step not in complete):
                self.fs.rm(entry, recursive=True)

    def _save_dense(self, engine, ckpt: str) -> None:
        """DeepSpeed writes local files: straight into a local checkpoint, else staged + uploaded."""
        if _is_local(ckpt):
            engine.save_checkpoint(_local_path(_join(ckpt, "dense")), tag=DENSE_TAG, save_latest=False)
            return
        with tempfile.TemporaryDirectory(prefix="recsys-dist-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DENSE_TAG, save_latest=False)
            fs, root = _fs(_join(ckpt, "dense"))
            for dirpath, _, names in os.walk(tmp):
                for n in names:
                    local = os.path.join(dirpath, n)
                    fs.put_file(local, posixpath.join(root, os.path.relpath(local, tmp)))

    def _save_rng(self, ckpt: str) -> None:
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        fs, root = _fs(_join(ckpt, f"rank-{self.rank:05d}.pt"))
        with fs.open(root, "wb") as f:
            torch.save(states, f)

    # ---- load ----------------------------------------------------------------------
    def load(self, ckpt_url: str, engine, table) -> TrainState:
        """Verify (every rank, before touching state), then restore everything (collective)."""
        error, meta = None, None
        try:
            meta = self.read_meta(ckpt_url)
        except CheckpointError as exc:
            error = str(exc)
        _agree(error)
        t0 = time.perf_counter()
        sd = {"table": table.dmp.state_dict(), "table_optim": table.optimizer_state_dict()}
        dcp.load(sd, checkpoint_id=_join(ckpt_url, "table"))  # in place into the weights and optimizer state
        table.load_optimizer_state_dict(sd["table_optim"])
        self._load_dense(engine, ckpt_url, meta["world_size"])
        self._load_rng(ckpt_url, meta)
        log.info("resumed from %s (step %d, written by %d rank(s)) in %.1fs", ckpt_url, meta["step"],
                 meta["world_size"], time.perf_counter() - t0)
        positions = meta.get("data_position")
        mine = positions[self.rank] if isinstance(positions, list) and len(positions) == meta["world_size"] \
            and self.rank < len(positions) else None
        return TrainState(step=meta["step"], epoch=meta["epoch"], batch_in_epoch=meta["batch_in_epoch"],
                          data_position=mine,
                          best_step=meta["best_step"],
                          best_value=meta["best_value"] if meta["best_value"] is not None else float("-inf"),
                          losses=[tuple(x) for x in meta["losses"]], val=[tuple(x) for x in meta["val"]])

    @contextlib.contextmanager
    def _local_copy(self, url: str) -> Iterator[str]:
        if _is_local(url):
            yield _local_path(url)
            return
        with tempfile.TemporaryDirectory(prefix="recsys-dist-ckpt-") as tmp:
            fs, root = _fs(url)
            fs.get(root + "/", tmp + "/", recursive=True)
            yield tmp

    def _load_dense(self, engine, ckpt_url: str, saved_world: int) -> None:
        with self._local_copy(_join(ckpt_url, "dense")) as local, weights_only_torch_load():
            if saved_world == self.world or engine.zero_optimization_stage() == 0:
                path, _ = engine.load_checkpoint(local, tag=DENSE_TAG, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
                if path is None:
                    raise CheckpointError(f"{ckpt_url}: DeepSpeed found no dense state under {local}")
                return
            self._load_universal(engine, local, ckpt_url)

    def _load_universal(self, engine, local: str, ckpt_url: str) -> None:
        """ZeRO state written by another world size: DeepSpeed's universal checkpoint."""
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = tempfile.mkdtemp(prefix="recsys-dist-universal-") if self.rank == 0 else None
        tmp = broadcast_object(tmp)  # one machine in tests; multi-node needs a shared tmp (see docs/faults.md)
        try:
            if self.rank == 0:
                args = _UniversalArgs(input_folder=os.path.join(local, DENSE_TAG),
                                      output_folder=os.path.join(tmp, DENSE_TAG + "_universal"))
                ds_to_universal(args)
            barrier()
            engine._config.load_universal_checkpoint = True
            try:
                path, _ = engine.load_checkpoint(tmp, tag=DENSE_TAG + "_universal", load_optimizer_states=True)
            finally:
                engine._config.load_universal_checkpoint = False
            if path is None:
                raise CheckpointError(f"{ckpt_url}: DeepSpeed could not load the universal dense state")
            log.info("dense ZeRO state converted with ds_to_universal and loaded on %d rank(s)", self.world)
        finally:
            barrier()
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)

    def _load_rng(self, ckpt_url: str, meta: dict) -> None:
        if meta["world_size"] != self.world:
            seed = stream_seed(self.cfg.train.seed, "resume-rng", meta["step"] * 100003 + self.rank)
            torch.manual_seed(seed)
            log.warning("world size changed (%d -> %d): RNG states re-seeded from (seed, step, rank); "
                        "dropout masks differ from an uninterrupted run", meta["world_size"], self.world)
            return
        fs, path = _fs(_join(ckpt_url, f"rank-{self.rank:05d}.pt"))
        with fs.open(path, "rb") as f:
            states = torch.load(f, weights_only=True)
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])

    # ---- best (validation-selected) weights ------------------------------------------
    def save_best(self, engine, table, step: int, value: float) -> None:
        """Persist the selected weights (table + dense module); replaces the previous best."""
        best_root = _join(self.url, "best")
        target = _join(best_root, step_name(step))
        fs, root = _fs(target)
        if self.rank == 0 and fs.exists(root):
            fs.rm(root, recursive=True)
        barrier()
        dcp.save({"table": table.dmp.state_dict(), "dense": engine.module.state_dict()}, checkpoint_id=target)
        barrier()
        if self.rank == 0:
            with fs.open(posixpath.join(root, BEST_MARKER), "wb") as f:
                f.write(json.dumps({"step": step, "value": value}).encode())
            bfs, broot = _fs(best_root)
            for entry in bfs.ls(broot, detail=False):
                if posixpath.basename(entry.rstrip("/")) != step_name(step):
                    bfs.rm(entry, recursive=True)
        barrier()

    def load_best(self, engine, table, step: int) -> None:
        target = _join(self.url, "best", step_name(step))
        fs, root = _fs(target)
        if not fs.exists(posixpath.join(root, BEST_MARKER)):
            raise CheckpointError(f"{target}: the selected (best validation) weights are missing")
        sd = {"table": table.dmp.state_dict(), "dense": engine.module.state_dict()}
        dcp.load(sd, checkpoint_id=target)
        engine.module.load_state_dict(sd["dense"])


@dataclass
class _UniversalArgs:
    """The argparse namespace ``ds_to_universal.main`` expects."""

    input_folder: str
    output_folder: str
    num_extract_workers: int = 1
    num_merge_workers: int = 1
    keep_temp_folder: bool = False
    strict: bool = True
    inject_missing_state: bool = True  # our checkpoints carry no Megatron-style universal info
