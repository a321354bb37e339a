"""Run outputs on rank 0: a readable log, TensorBoard scalars, metrics JSON, a loss PNG and a
learning-curve PNG (validation metric against epoch and training wall time)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("recsys_dist")


def peak_rss_gib_per_rank() -> list[float]:
    """Every rank's peak resident set size so far, GiB, in rank order (collective; Linux
    ``ru_maxrss`` is in KiB)."""
    import resource

    from recsys_dist.distributed import gather_objects
    return gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def setup_logging(rank: int, run_dir: Path | None = None) -> None:
    """Rank-prefixed log lines on stderr (rank 0 at INFO, others at WARNING) and a file."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.WARNING)  # third-party INFO chatter (TBE, DeepSpeed) stays out
    logging.getLogger("recsys_dist").setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("torchrec", "torch.distributed", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_known_noise()


#: (logger, message start) of third-party warnings known to be harmless here, each with why
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    # we build the planner's Topology from world size and device type on purpose (no hardware probe)
    ("torchrec.distributed.planner.types", "The topology was constructed directly"),
    # the planner runs on meta tensors; its dense-size estimate only sizes its own report
    ("torchrec.distributed.planner.storage_reservations", "There is a known issue with TorchRec's dense tensor"),
    # the replicated (data_parallel) table has no sharding spec and no cache: by design
    ("root", "Sharding spec not found for"),
    ("torchrec.distributed.utils", "Sharding Type is data_parallel, caching params will be ignored"),
    # TorchRec's lookups are traced once by torch.fx; the message concerns torch.export users
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
)


#: starts of lines third-party code prints (stdout, not a logger) that are known to be harmless
KNOWN_PRINTS: tuple[str, ...] = (
    # DeepSpeed's CPU comm backend JIT-loads its shared-memory op, once per process, and says so
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
)


class _DropKnownPrints:
    """A stdout wrapper that drops whole lines starting with :data:`KNOWN_PRINTS`."""

    def __init__(self, stream) -> None:
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(KNOWN_PRINTS):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith(KNOWN_PRINTS):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()


@contextlib.contextmanager
def known_prints_dropped():
    """Run a block with the known-harmless prints of :data:`KNOWN_PRINTS` dropped from stdout
    (every other line passes through unchanged)."""
    wrapper = _DropKnownPrints(sys.stdout)
    with contextlib.redirect_stdout(wrapper):
        try:
            yield
        finally:
            wrapper.flush()


class _KnownNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Drop the known-harmless third-party warnings above (by logger and message, not by level,
    so any other warning of those libraries still shows), and the known-harmless Python warnings
    by category and module. Idempotent."""
    import warnings

    by_logger: dict[str, list[str]] = {}
    for name, prefix in KNOWN_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(tuple(prefixes)))
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # the planner's default storage reservation; it sizes the plan only (we run no dry run)
    warnings.filterwarnings("ignore", message=r"HeuristicalStorageReservation is known", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_fx_tracing.*")
    # the replicated table's DDP wrapper (TorchRec passes the deprecated name; nothing to change)
    warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
    # fbgemm's CPU dense lookup (the replicated table) backprops through a kernel registered
    # without an Autograd key; its gradients are checked exact against nn.Embedding / the dense
    # model (tests/test_replicated_table.py, tests/test_diffrec_sharded.py)
    warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel",
                            category=UserWarning)


class RunReport:
    """Collects the loss curve and metrics; writes files on rank 0 only."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.losses: list[tuple[int, float]] = []
        self.val: list[tuple[int, dict[str, float]]] = []
        self.writer = None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard not installed: no event files")

    def loss(self, step: int, value: float) -> None:
        self.losses.append((step, value))
        if self.writer is not None:
            self.writer.add_scalar("train/loss", value, step)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        self.val.append((step, metrics))
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "num_users":
                    self.writer.add_scalar(f"val/{k}", v, step)

    def save(self, payload: dict[str, Any]) -> None:
        """Write metrics.json (atomically), loss.png and curve.png."""
        if self.rank != 0:
            return
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, self.run_dir / "metrics.json")
        self._plot()
        plot_learning_curves([(self.run_dir.name, None, self.val)], self.run_dir / "curve.png",
                             payload.get("select_metric", "NDCG@10"))
        if self.writer is not None:
            self.writer.flush()

    def _plot(self) -> None:
        if not self.losses:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, values = zip(*self.losses)
        ax.plot(steps, values, label="train CE")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.run_dir.name)
        if self.val:
            ax2 = ax.twinx()
            names = list(self.val[-1][1])
            key = "NDCG@10" if "NDCG@10" in names else next(k for k in names if k.startswith("NDCG"))
            ax2.plot([s for s, _ in self.val], [m[key] for _, m in self.val], "o-", color="tab:orange", label=f"val {key}")
            ax2.set_ylabel(f"val {key}")
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_learning_curves(runs: list[tuple[str, int | None, list]], path: Path, metric: str = "NDCG@10") -> None:
    """One PNG, two panels: validation ``metric`` (%) against epoch and against training wall
    time (minutes, validation excluded), one line per ``(row, seed, [(step, metrics), ...])`` run
    (``seed`` None: a single run). Runs of one row share its colour, one line style per seed, and
    the legend names each row once. Runs whose records lack ``epoch`` / ``train_seconds`` (older
    runs) are drawn against step."""
    runs = [(row, seed, val) for row, seed, val in runs if val]
    if not runs:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(row for row, _, _ in runs))
    seeds = sorted({seed for _, seed, _ in runs if seed is not None})
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    styles, seen = ["-", "--", ":", "-."], {r: 0 for r in rows}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 3.6), sharey=True)
    for row, seed, val in runs:
        style = styles[(seeds.index(seed) if seed is not None else 0) % len(styles)]  # one style per seed number
        color = palette(rows.index(row) % palette.N)
        legend = row if seen[row] == 0 else None
        seen[row] += 1
        y = [100 * m.get(metric, float("nan")) for _, m in val]
        x_epoch = [m.get("epoch", s) for s, m in val]
        x_min = [m.get("train_seconds", float("nan")) / 60 for _, m in val]
        a1.plot(x_epoch, y, marker="o", ls=style, ms=3, color=color, label=legend)
        a2.plot(x_min, y, marker="o", ls=style, ms=3, color=color)
    a1.set_xlabel("epoch")
    a2.set_xlabel("training wall time (min)")
    a1.set_ylabel(f"validation {metric} (%)")
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    if len(seeds) > 1:  # a key for the line styles, in grey
        for i, seed in enumerate(seeds):
            a2.plot([], [], ls=styles[i % len(styles)], color="grey", label=f"seed {seed}")
    fig.legend(loc="center right", fontsize=8)
    fig.suptitle(path.stem)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
