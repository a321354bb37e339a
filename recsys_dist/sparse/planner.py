"""Capacity planning for the item table: TorchRec's ``EmbeddingShardingPlanner`` on the
trainer's own table description, on the meta device -- nothing is allocated.

Contract: ``plan_capacity`` builds the table with ``table.item_collection`` (``items + 1`` rows,
row 0 padding, the fused optimizer attached) and plans it with ``table.sharding_planner``
(the configured sharding type and kernel) against a simulated topology (W GPUs of a given
HBM, G per node). Sharding and optimizer are checked by ``spec.check_sparse_config``: what
the trainer refuses, the planner refuses with the same error. It plans sharded tables
(``spec.SHARDED``); a replicated (data_parallel) table is the whole table on every rank.

It returns a ``CapacityPlan``: the shards, per-rank memory as TorchRec's storage estimator
counts it (weights, optimizer state, the rest = lookup input/output buffers) against the HBM
cap, the per-batch cost estimate per rank (lookup compute, all-to-alls), and the ideal even
split ``N * d * bytes / W``; ``format_plan`` renders it. A table that does not fit raises
``PlanDoesNotFit`` with the needed and available bytes per rank and a rough minimum GPU
count, useful even when the planner's own message is cryptic.

Memory follows TorchRec (``torchrec.distributed.planner.shard_estimators``): optimizer state
is 0 for SGD and one weight-dtype value per row for row-wise Adagrad (fbgemm keeps it in
fp32, so fp16/bf16 weights really hold ``rows * 2`` bytes more -- under 2% at d >= 64).
``reserve`` (default 15%, TorchRec's) of every GPU's HBM is held back for everything that is
not the table: dense model, activations, CUDA context. torchrec is imported only when planning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from recsys_dist.config import SparseConfig
from recsys_dist.sparse.spec import REPLICATED, SHARDED, check_sparse_config

GIB = 1 << 30
DEFAULT = SparseConfig()  # the trainer's default sharding and optimizer
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # the weight dtypes planned (the trainer's: fp32)

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


class PlanError(Exception):
    """The planner could not produce a plan (bad inputs or constraints it cannot meet)."""


class PlanDoesNotFit(PlanError):
    """The table does not fit in the given GPUs; ``str()`` says what is needed and available."""

    def __init__(self, message: str, need_per_rank: int, available_per_rank: int,
                 min_gpus: int | None) -> None:
        super().__init__(message)
        self.need_per_rank = need_per_rank
        self.available_per_rank = available_per_rank
        self.min_gpus = min_gpus


# ---- sizes -----------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """Bytes from a size with a unit: ``80GiB``, ``80GB`` (10^9), ``81920MiB``, ``1.5TiB``.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, SI units (KB, MB, GB, TB) powers of
    1000; ``B`` is bytes. Case-insensitive; underscores allowed. A bare number is rejected,
    since ``--gpu-mem 80`` is ambiguous.
    """
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"'{text}' is not a size: use e.g. 80GiB, 80GB, 81920MiB")
    return int(float(m.group(1).replace("_", "")) * _UNITS[m.group(2).lower()])


def parse_count(text: str) -> int:
    """A positive integer: ``1_000_000_000``, ``1000000000`` or ``1e9``."""
    s = str(text).strip()
    try:
        value = int(s)
    except ValueError:
        f = float(s.replace("_", ""))
        if not f.is_integer():
            raise ValueError(f"'{text}' is not a whole number") from None
        value = int(f)
    if value <= 0:
        raise ValueError(f"'{text}' must be positive")
    return value


def gib(num_bytes: float) -> float:
    return num_bytes / GIB



# ---- results ---------------------------------------------------------------------------
@dataclass
class ShardPlacement:
    """One shard of the table: rows [row_offset, row_offset + rows), columns likewise."""

    rank: int
    row_offset: int
    col_offset: int
    rows: int
    cols: int


@dataclass
class RankUsage:
    """What one rank holds and what the planner estimates it costs per batch."""

    rank: int
    rows: int  # rows of its shards, summed (its row range under row-wise sharding)
    cols: int  # the widest of its shards (the full dim unless column-wise)
    weights_bytes: int  # sum of rows * cols * dtype bytes over its shards
    optimizer_bytes: int  # optimizer state, as TorchRec's estimator counts it
    other_bytes: int  # the rest of the planner's estimate: lookup input/output buffers
    hbm_bytes: int  # the planner's HBM estimate for this rank (weights + optimizer + other)
    ddr_bytes: int  # the planner's host-memory estimate (0 with the fused all-HBM kernel)
    hbm_fraction: float  # hbm_bytes / the GPU's HBM
    fwd_compute_ms: float  # embedding lookup, forward
    fwd_comms_ms: float  # all-to-all of the looked-up embeddings
    bwd_compute_ms: float  # backward + fused optimizer update
    bwd_comms_ms: float  # all-to-all of the gradients
    input_dist_ms: float  # all-to-all of the ids
    total_ms: float


@dataclass
class CapacityPlan:
    """A plan that fits, and the numbers behind it (JSON-serialisable via ``asdict``)."""

    items: int
    dim: int
    gpus: int
    gpus_per_node: int
    gpu_mem_bytes: int
    host_mem_bytes: int | None
    batch_size: int  # per rank
    ids_per_sample: float
    dtype: str
    optimizer: str
    sharding: str
    reserve: float
    num_rows: int  # items + 1 (row 0 is padding)
    table_weights_bytes: int
    table_optimizer_bytes: int
    usable_hbm_per_rank: int  # HBM left for the table after the planner's reservation
    ideal_weights_per_rank: int  # N * d * bytes / W
    ideal_total_per_rank: int  # (weights + optimizer) / W
    ranks: list[RankUsage] = field(default_factory=list)
    shards: list[ShardPlacement] = field(default_factory=list)
    compute_kernel: str = "fused"
    step_ms: float = 0.0  # the slowest rank's total: TorchRec's rating of the plan
    plan_text: str = ""  # TorchRec's own rendering of the ShardingPlan

    @property
    def max_hbm_bytes(self) -> int:
        return max((r.hbm_bytes for r in self.ranks), default=0)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = True
        d["max_hbm_bytes"] = self.max_hbm_bytes
        return d


# ---- estimates made here -----------------------------------------------------------------
def ways(sharding: str, gpus: int, gpus_per_node: int, dim: int) -> int:
    """Over how many ranks the table spreads, ideally, for a sharding type."""
    if sharding == "row_wise":
        return gpus
    if sharding == "column_wise":  # shards of >= 128 columns (TorchRec's MIN_CW_DIM)
        return max(1, min(gpus, dim // 128))
    return 1  # table_wise


def rough_need(num_rows: int, dim: int, elem: int, optimizer_mult: float) -> int:
    """Bytes of the whole table: weights + optimizer state (no buffers)."""
    weights = num_rows * dim * elem
    return weights + math.ceil(weights * optimizer_mult)


def _refusal(items: int, dim: int, gpus: int, gpus_per_node: int, gpu_mem: int, dtype: str,
             optimizer: str, optimizer_mult: float, sharding: str, reserve: float, usable: int,
             planner_msg: str, planner_need: int | None) -> PlanDoesNotFit:
    total = rough_need(items + 1, dim, DTYPE_BYTES[dtype], optimizer_mult)
    w = ways(sharding, gpus, gpus_per_node, dim)
    need = max(-(-total // w), planner_need or 0)
    what = f"{items:,} x {dim} {dtype} + {optimizer}"
    msg = (f"does not fit: {what} needs {gib(need):.1f} GiB per rank with {sharding} sharding "
           f"over {w} of {gpus} rank(s) ({gib(total):.1f} GiB in all); each rank has "
           f"{gib(gpu_mem):.1f} GiB HBM, {gib(usable):.1f} GiB of it for the table after the "
           f"{reserve:.0%} reservation.")
    min_gpus = None
    if sharding == "row_wise":
        min_gpus = -(-total // max(1, usable))
        nodes = f" ({-(-min_gpus // gpus_per_node) * gpus_per_node} as whole nodes of " \
            f"{gpus_per_node})" if min_gpus > gpus_per_node and min_gpus % gpus_per_node else ""
        msg += (f" Need >= {min_gpus} GPUs of this size{nodes} for the table alone (buffers add a"
                f" little), or a smaller dim/dtype, or more HBM per GPU.")
    else:
        msg += (f" With {sharding} sharding each shard (every row of its columns) sits on one "
                f"GPU, so more GPUs do not help past {w}; use row_wise sharding.")
    if planner_msg:
        msg += f"\nTorchRec planner: {planner_msg}"
    return PlanDoesNotFit(msg, need, usable, min_gpus)


def _planner_summary(err: Exception) -> str:
    """The informative part of a PlannerError: its first line and the storage totals."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = lines[:1] + [ln.rstrip(")") + ")" if ln.endswith("))") else ln for ln in lines
                        if ln.startswith(("Global storage available", "Global storage requirement"))
                        or "does not fit on any rank" in ln]
    return " ".join(keep)[:1000]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the planner's warnings/log lines about dry runs while planning."""
    logger = logging.getLogger("torchrec")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# ---- planning --------------------------------------------------------------------------
def plan_capacity(items: int, dim: int, gpus: int, gpu_mem: int, *, gpus_per_node: int = 8,
                  host_mem: int | None = None, batch_size: int = 512,
                  ids_per_sample: float = 50.0, dtype: str = "fp32",
                  optimizer: str = DEFAULT.optimizer, sharding: str = DEFAULT.sharding,
                  reserve: float = 0.15, intra_host_bw: float | None = None,
                  inter_host_bw: float | None = None) -> CapacityPlan:
    """Plan the item table on ``gpus`` simulated GPUs of ``gpu_mem`` bytes HBM each.

    Everything is built on the meta device: no table memory is allocated, so 1e9-row
    tables plan in about a second. ``optimizer`` and ``sharding`` are ``sparse.optimizer`` /
    ``sparse.sharding`` (checked as the trainer checks them). ``host_mem`` is host DRAM per
    node (split evenly over its GPUs); ``batch_size`` is per rank and ``ids_per_sample`` the
    item ids each sample looks up (the history length); bandwidths are in GiB/s (defaults:
    TorchRec's 600 intra-node, 12.5 inter-node). Raises ``PlanDoesNotFit`` when the table does
    not fit, ``PlanError`` for other planner failures and ``ValueError`` for bad inputs.
    """
    check_sparse_config(SparseConfig(sharding=sharding, optimizer=optimizer))
    if sharding == REPLICATED:
        raise ValueError(f"sparse.sharding={REPLICATED} replicates the whole table on every rank: "
                         f"nothing to plan; the planner plans {' | '.join(SHARDED)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype '{dtype}' ({' | '.join(DTYPE_BYTES)})")
    for name, value in (("items", items), ("dim", dim), ("gpus", gpus), ("gpu_mem", gpu_mem),
                        ("gpus_per_node", gpus_per_node), ("batch_size", batch_size),
                        ("ids_per_sample", ids_per_sample)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not 0.0 <= reserve < 1.0:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    local = min(gpus, gpus_per_node)
    if gpus % local:
        raise ValueError(f"{gpus} GPUs is not a whole number of nodes of {gpus_per_node}")

    from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation)
    from torchrec.distributed.planner.types import (
        HardwareConfig, KernelConfig, PlannerError, PlannerErrorType, TopologyFactory,
        TrainerConfig)
    from torchrec.modules.embedding_configs import DataType

    from recsys_dist.sparse.table import item_collection, sharders, sharding_planner

    num_rows = items + 1
    elem = DTYPE_BYTES[dtype]
    cfg = SparseConfig(sharding=sharding, optimizer=optimizer)
    to_bytes_per_ms = lambda gib_s: None if gib_s is None else gib_s * GIB / 1000  # noqa: E731

    with _quiet():
        ec = item_collection(num_rows, dim, cfg, data_type=DataType[dtype.upper()])
        # optimizer state per byte of weights, as the planner's storage estimator counts it
        # (from the optimizer class it reads off the parameter)
        weight = next(ec.parameters())
        mult = float(_get_optimizer_multipler(getattr(weight, "_optimizer_classes", [None])[0],
                                              weight.shape))
        topology = TopologyFactory.create_topology(
            trainer_config=TrainerConfig(world_size=gpus, local_world_size=local),
            hardware_config=HardwareConfig(
                hbm_cap_bytes=gpu_mem,
                ddr_cap_bytes=None if host_mem is None else host_mem // local,
                intra_host_bw=to_bytes_per_ms(intra_host_bw),
                inter_host_bw=to_bytes_per_ms(inter_host_bw)),
            kernel_config=KernelConfig(compute_device="cuda"))
        reservation = FixedPercentageStorageReservation(percentage=reserve)
        planner = sharding_planner(cfg, topology, batch_size, pooling_factor=ids_per_sample,
                                   storage_reservation=reservation, debug=False)
        usable = int(gpu_mem * (1.0 - reserve))
        try:
            plan = planner.plan(ec, sharders())
        except PlannerError as err:
            # the smallest possible largest shard among the options the planner could pick
            planner_need = min((max(s.storage.hbm + s.storage.ddr for s in so.shards)
                                for so in planner.get_search_space() or []
                                if so.shards and all(s.storage for s in so.shards)), default=None)
            if err.error_type == PlannerErrorType.INSUFFICIENT_STORAGE or \
                    (planner_need is not None and planner_need > usable):
                raise _refusal(items, dim, gpus, gpus_per_node, gpu_mem, dtype, optimizer, mult,
                               sharding, reserve, usable, _planner_summary(err),
                               planner_need) from err
            raise PlanError(f"TorchRec's planner found no plan: {_planner_summary(err)}") from err
        except RuntimeError as err:  # e.g. the enumerator found no allowed sharding option
            raise PlanError(f"TorchRec's planner found no plan: {err}") from err
        options = planner.get_selected_options()
        reserved = reservation.last_reserved_topology
        if reserved is not None:
            usable = int(reserved.devices[0].storage.hbm)

    zero = dict(rows=0, cols=0, weights_bytes=0, optimizer_bytes=0, other_bytes=0, hbm_bytes=0,
                ddr_bytes=0, fwd_compute_ms=0.0, fwd_comms_ms=0.0, bwd_compute_ms=0.0,
                bwd_comms_ms=0.0, input_dist_ms=0.0)
    per_rank = {r: dict(zero) for r in range(gpus)}
    shards: list[ShardPlacement] = []
    kernel = "fused"
    for so in options:
        kernel = so.compute_kernel
        for s in so.shards:
            rank = int(s.rank)
            rows, cols = int(s.size[0]), int(s.size[1])
            shards.append(ShardPlacement(rank, int(s.offset[0]), int(s.offset[1]), rows, cols))
            acc = per_rank[rank]
            weights = rows * cols * elem
            acc["rows"] += rows
            acc["cols"] = max(acc["cols"], cols)
            acc["weights_bytes"] += weights
            acc["optimizer_bytes"] += math.ceil(weights * mult)
            acc["hbm_bytes"] += int(s.storage.hbm)
            acc["ddr_bytes"] += int(s.storage.ddr)
            p = s.perf
            acc["fwd_compute_ms"] += p.fwd_compute
            acc["fwd_comms_ms"] += p.fwd_comms
            acc["bwd_compute_ms"] += p.bwd_compute
            acc["bwd_comms_ms"] += p.bwd_comms
            acc["input_dist_ms"] += p.input_dist_comms
    ranks = []
    for r in range(gpus):
        acc = per_rank[r]
        acc["other_bytes"] = acc["hbm_bytes"] + acc["ddr_bytes"] - acc["weights_bytes"] \
            - acc["optimizer_bytes"]
        total = (acc["fwd_compute_ms"] + acc["fwd_comms_ms"] + acc["bwd_compute_ms"]
                 + acc["bwd_comms_ms"] + acc["input_dist_ms"])
        ranks.append(RankUsage(rank=r, hbm_fraction=acc["hbm_bytes"] / gpu_mem, total_ms=total,
                               **acc))
    shards.sort(key=lambda s: (s.rank, s.row_offset, s.col_offset))
    table_weights = num_rows * dim * elem
    table_opt = math.ceil(table_weights * mult)
    w = ways(sharding, gpus, gpus_per_node, dim)
    return CapacityPlan(
        items=items, dim=dim, gpus=gpus, gpus_per_node=gpus_per_node, gpu_mem_bytes=gpu_mem,
        host_mem_bytes=host_mem, batch_size=batch_size, ids_per_sample=float(ids_per_sample),
        dtype=dtype, optimizer=optimizer, sharding=sharding, reserve=reserve,
        num_rows=num_rows, table_weights_bytes=table_weights, table_optimizer_bytes=table_opt,
        usable_hbm_per_rank=usable, ideal_weights_per_rank=table_weights // w,
        ideal_total_per_rank=(table_weights + table_opt) // w, ranks=ranks, shards=shards,
        compute_kernel=kernel, step_ms=max(r.total_ms for r in ranks), plan_text=str(plan))


# ---- output ----------------------------------------------------------------------------
def _rank_groups(ranks: list[RankUsage]) -> list[tuple[int, int, RankUsage]]:
    """Consecutive ranks with identical numbers, as (first, last, representative)."""
    groups: list[tuple[int, int, RankUsage]] = []
    for r in ranks:
        key = {k: v for k, v in asdict(r).items() if k != "rank"}
        if groups:
            first, last, rep = groups[-1]
            if {k: v for k, v in asdict(rep).items() if k != "rank"} == key:
                groups[-1] = (first, r.rank, rep)
                continue
        groups.append((r.rank, r.rank, r))
    return groups


def format_plan(plan: CapacityPlan, show_plan: bool = False) -> str:
    """A readable report: inputs, per-rank memory table, per-rank cost table, ideal line.

    Consecutive ranks with identical numbers share one line (``0-62``); ``--json`` has them
    all. ``show_plan`` appends TorchRec's own rendering of the sharding plan.
    """
    p = plan
    out = []
    node_count = -(-p.gpus // min(p.gpus, p.gpus_per_node))
    out.append(f"item table: {p.items:,} items + 1 padding row = {p.num_rows:,} rows x {p.dim} "
               f"{p.dtype}, optimizer {p.optimizer}")
    out.append(f"  weights {gib(p.table_weights_bytes):,.2f} GiB + optimizer "
               f"{gib(p.table_optimizer_bytes):,.2f} GiB in all")
    out.append(f"topology: {p.gpus} GPUs ({node_count} node(s) x {min(p.gpus, p.gpus_per_node)}),"
               f" {gib(p.gpu_mem_bytes):.1f} GiB HBM each, {gib(p.usable_hbm_per_rank):.1f} GiB "
               f"usable for the table ({p.reserve:.0%} reserved)"
               + ("" if p.host_mem_bytes is None else
                  f", host {gib(p.host_mem_bytes):.0f} GiB per node"))
    out.append(f"workload: batch {p.batch_size} per rank x {p.ids_per_sample:g} ids per sample")
    n_shards = len(p.shards)
    sizes: dict[tuple[int, int], int] = {}
    for s in p.shards:
        sizes[(s.rows, s.cols)] = sizes.get((s.rows, s.cols), 0) + 1
    size_txt = ", ".join(f"{n} x [{r:,}, {c}]" for (r, c), n in sizes.items())
    out.append(f"plan: {p.sharding}, kernel {p.compute_kernel}, {n_shards} shard(s): {size_txt}")
    out.append("")

    head = ["rank", "rows", "cols", "weights GiB", "optim GiB", "other GiB", "total GiB", "% HBM"]
    rows = []
    for first, last, r in _rank_groups(p.ranks):
        name = str(first) if first == last else f"{first}-{last}"
        rows.append([name, f"{r.rows:,}", str(r.cols), f"{gib(r.weights_bytes):.3f}",
                     f"{gib(r.optimizer_bytes):.3f}", f"{gib(r.other_bytes):.3f}",
                     f"{gib(r.hbm_bytes + r.ddr_bytes):.3f}", f"{100 * r.hbm_fraction:.1f}"])
    ideal_w = p.ideal_weights_per_rank
    rows.append(["ideal", f"{p.num_rows // ways(p.sharding, p.gpus, p.gpus_per_node, p.dim):,}",
                 str(p.dim), f"{gib(ideal_w):.3f}", f"{gib(p.ideal_total_per_rank - ideal_w):.3f}",
                 "-", f"{gib(p.ideal_total_per_rank):.3f}",
                 f"{100 * p.ideal_total_per_rank / p.gpu_mem_bytes:.1f}"])
    out.append("memory per rank (TorchRec storage estimate; other = lookup input/output buffers):")
    out.append(_table(head, rows))
    out.append(f"ideal = N*d*bytes/W = {p.num_rows:,} x {p.dim} x {DTYPE_BYTES[p.dtype]} / "
               f"{ways(p.sharding, p.gpus, p.gpus_per_node, p.dim)} = {gib(ideal_w):.3f} GiB weights"
               f" (+ optimizer); largest rank uses {gib(p.max_hbm_bytes):.3f} GiB = "
               f"{p.max_hbm_bytes / max(1, p.ideal_total_per_rank):.3f}x ideal")
    out.append("")

    head = ["rank", "fwd compute", "fwd a2a", "bwd compute", "bwd a2a", "ids a2a", "total"]
    rows = []
    for first, last, r in _rank_groups(p.ranks):
        name = str(first) if first == last else f"{first}-{last}"
        rows.append([name] + [f"{v:.4f}" for v in (r.fwd_compute_ms, r.fwd_comms_ms,
                                                   r.bwd_compute_ms, r.bwd_comms_ms,
                                                   r.input_dist_ms, r.total_ms)])
    out.append("estimated sparse cost per batch, ms (TorchRec perf model; a2a = all-to-all):")
    out.append(_table(head, rows))
    out.append(f"slowest rank: {p.step_ms:.4f} ms per batch for the table's lookup, all-to-alls "
               f"and fused update (the dense model is not included)")
    if show_plan:
        out.append("")
        out.append(p.plan_text)
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
