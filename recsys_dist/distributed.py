"""Every collective helper of the job, in one place: process-group set-up, (rank, world),
the row partition of the item table, all-gathers, and the lockstep rules that keep ranks with
unequal amounts of data in the same collectives.

Every function that takes ``group`` also works without an initialised process group, in which
case the "group" is the current process alone (rank 0 of a world of size 1).

Row convention: item ids are ``0 .. num_rows - 1`` (row 0 is padding); rank ``r`` owns the
contiguous half-open range of :func:`row_partition`, blocks of ``ceil(num_rows / world)`` rows,
which is how TorchRec's row-wise sharding splits a table (the last blocks may be short or empty).

The one device rule for collectives: on CPU the group is gloo; on GPU it is
``cpu:gloo,cuda:nccl`` (:func:`process_group_backend`), so CUDA tensors (table lookups, dense
gradients, eval scores) go through NCCL and small CPU bookkeeping tensors (batch flags, error
flags, counters) through gloo. An NCCL-only group would reject the latter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> cuda:<LOCAL_RANK> when CUDA is present, else cpu."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(requested)


def process_group_backend(device: torch.device) -> str:
    """The backend string for a job on ``device``: ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` on
    CUDA (every collective accepts CPU and CUDA tensors alike)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def backend_device_types(backend: str) -> set[str]:
    """Device types a backend string serves: ``"gloo"`` -> {cpu}, ``"nccl"`` -> {cuda},
    ``"cpu:gloo,cuda:nccl"`` -> {cpu, cuda}."""
    if ":" not in backend:
        return {"gloo": {"cpu"}, "nccl": {"cuda"}}.get(backend.lower(), set())
    return {part.split(":", 1)[0].strip() for part in backend.split(",")}


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _elastic_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store keyed by the restart attempt.

    torchrun keeps one store across elastic restarts; the gloo process group of a restarted
    worker would read the addresses of the previous attempt's (dead) workers from it and fail
    to connect. A per-attempt prefix gives every attempt a clean namespace."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"recsys-dist/attempt-{attempt}", store)


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that torchrun / the deepspeed launcher describe in the
    environment; a plain ``python`` run becomes a 1-rank group on a free local port.

    Returns (rank, world_size). A collective that waits longer than ``timeout_s`` raises
    instead of hanging, so a dead or stuck rank is reported.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = process_group_backend(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _elastic_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Destroy every process group at the end of a rank's job (no-op without one).

    Goes through DeepSpeed's ``destroy_process_group`` when DeepSpeed set up its communication
    backend, which also clears DeepSpeed's module-level group references (its clone of the world
    group among them); otherwise ``torch.distributed.destroy_process_group``. No collective may
    follow. Even so, the job's two gloo backends keep their worker threads after this, so a rank
    should then leave with :func:`exit_without_finalization` (docs/faults.md, "A finished rank
    exits cleanly").
    """
    if not dist_active():
        return
    try:
        import deepspeed.comm as ds_comm
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        ds_comm = None
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def exit_without_finalization(code: int) -> None:
    """Flush what this process wrote and leave at once with ``code``, skipping interpreter
    finalization (call after :func:`shutdown`, with every output of the job closed).

    Flushes the logging handlers, Python's stdout / stderr and C stdio (``fflush(NULL)``: native
    libraries' prints), then ``os._exit``. Why: the gloo worker threads that outlive
    ``destroy_process_group`` in this job once aborted a rank that had finished its work
    (SIGABRT in teardown, "terminate called without an active exception"), failing a finished
    job; leaving here removes that window (docs/faults.md).
    """
    import ctypes
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C library to flush
        pass
    os._exit(code)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (dense init is the same on every rank and world size)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# rank, world, device
# --------------------------------------------------------------------------------------------


def dist_active() -> bool:
    """True when ``torch.distributed`` is usable and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process inside ``group`` (default group when ``None``);
    ``(0, 1)`` without a process group."""
    if not dist_active():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def multi_rank(group: dist.ProcessGroup | None = None) -> bool:
    """True when ``group`` has more than one rank (so a collective is needed at all)."""
    return rank_and_world(group)[1] > 1


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Device that small bookkeeping tensors must live on for collectives over ``group``.

    NCCL-only groups need CUDA tensors (the current CUDA device); everything else (gloo, mixed
    ``cpu:gloo,cuda:nccl`` backends, no process group) uses the CPU.
    """
    if not dist_active():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist_active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself on one rank)."""
    if not multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one rank)."""
    _, world = rank_and_world(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a detached tensor over ranks (for logging)."""
    x = x.detach().clone()
    if multi_rank():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# --------------------------------------------------------------------------------------------
# lockstep: ranks with unequal data stay in the same collectives
# --------------------------------------------------------------------------------------------


def max_over_ranks(n: int, group: dist.ProcessGroup | None = None) -> int:
    """Largest value of ``n`` over the ranks of ``group`` (collective: every rank calls it).

    Loops that know their local count up front agree on a common number of collective calls
    this way; a rank past its own data joins with empty batches."""
    if not multi_rank(group):
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.long, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is true on any rank (collective). Used to raise one
    rank's error on all of them instead of letting the others time out."""
    return max_over_ranks(int(bool(flag)), group) > 0


def in_lockstep(batches: Iterable, group: dist.ProcessGroup | None = None) -> Iterator:
    """Yield this rank's batches, then ``None`` until every rank is out of batches: the loop
    over a stream whose length a rank does not know up front (one flag all-reduce a batch)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not any_rank(batch is not None, group):
            return
        yield batch


# --------------------------------------------------------------------------------------------
# the row partition of the item table
# --------------------------------------------------------------------------------------------


def block_size(num_rows: int, world_size: int) -> int:
    """Rows per rank under row-wise sharding: ``ceil(num_rows / world_size)`` (a row count)."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return -(-num_rows // world_size)


def row_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Half-open range ``[lo, hi)`` of global row ids that ``rank`` owns (may be empty,
    ``lo == hi == num_rows``, for trailing ranks of a small table)."""
    size = block_size(num_rows, world_size)
    lo = min(rank * size, num_rows)
    return lo, min(lo + size, num_rows)


def row_partition(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """:func:`row_range` of every rank, in rank order: contiguous, disjoint, covering
    ``[0, num_rows)``; e.g. ``row_partition(4, 3) == [(0, 2), (2, 4), (4, 4)]``."""
    return [row_range(num_rows, world_size, r) for r in range(world_size)]


def owner_of(ids: torch.Tensor, num_rows: int, world_size: int) -> torch.Tensor:
    """Rank that owns each global row id: ``torch.long`` tensor of ``ids``'s shape."""
    size = max(block_size(num_rows, world_size), 1)
    return torch.div(ids.long(), size, rounding_mode="floor")


# --------------------------------------------------------------------------------------------
# gathers and sums (differentiable; under no_grad or on integer tensors they are plain ones)
# --------------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """Concatenate equal-size (b, ...) tensors from all ranks; backward returns this rank's
    slice of the summed gradient (all-reduce then slice: works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.b = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * ctx.b:(r + 1) * ctx.b], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather of (b_r, ...) rows from every rank, concatenated in rank order
    (``sum(sizes)`` rows). ``sizes`` are every rank's b_r (default: all equal to this rank's);
    unequal sizes are padded to the largest for the collective and trimmed after.
    Differentiable: the gradient of a rank's rows is the sum of every rank's gradient of them.
    Without a process group (or world 1) it returns ``x``."""
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = list(sizes) if sizes is not None else [x.shape[0]] * world
    rank = rank_and_world(group)[0]
    if len(sizes) != world or x.shape[0] != sizes[rank]:
        raise ValueError(f"gather_rows: rank {rank} holds {x.shape[0]} rows but sizes say {sizes} "
                         f"for {world} ranks")
    most = max(sizes)
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
    full = _AllGather.apply(x, group)
    if all(n == most for n in sizes):
        return full
    index = torch.cat([torch.arange(r * most, r * most + n) for r, n in enumerate(sizes)]).to(full.device)
    return full.index_select(0, index)


def stack_over_ranks(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(world, *x.shape): the same-shape tensor ``x`` of every rank, stacked in rank order."""
    return gather_rows(x.unsqueeze(0), group=group)


def sum_over_ranks(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all-reduce SUM; ``x`` itself without a process group (or world 1)."""
    if not multi_rank(group):
        return x
    return _AllReduceSum.apply(x, group)
