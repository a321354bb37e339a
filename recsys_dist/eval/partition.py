"""Which rank owns which catalog rows, and small process-group helpers.

Catalog convention used throughout :mod:`recsys_dist.eval`:

* item ids are ``0 .. num_rows - 1``; row ``0`` is the padding item and is never a candidate;
* rank ``r`` of a group of ``world_size`` ranks owns the contiguous, half-open row range
  ``[lo_r, hi_r)`` given by :func:`row_partition`. The block size is
  ``ceil(num_rows / world_size)``, which is how TorchRec's row-wise sharding splits a table,
  so the last block may be shorter than the others or even empty.

Nothing here imports TorchRec: callers hand the evaluator a dense ``(hi_r - lo_r, d)`` tensor
holding their own rows (for a TorchRec shard that is the local shard's weight).

Every function that takes ``group`` also works without an initialised process group, in which
case the "group" is the current process alone (rank 0 of a world of size 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "row_partition",
    "block_size",
    "owner_of",
    "dist_active",
    "group_rank_and_size",
    "collective_device",
    "max_over_ranks",
]


def block_size(num_rows: int, world_size: int) -> int:
    """Rows per rank under row-wise sharding: ``ceil(num_rows / world_size)`` (a row count)."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return -(-num_rows // world_size)


def row_partition(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """Half-open row range ``(lo, hi)`` owned by each rank, for ranks ``0 .. world_size - 1``.

    Args:
        num_rows: catalog size in rows, padding row 0 included.
        world_size: number of ranks the table is sharded over.

    Returns:
        ``world_size`` pairs of global row ids. Rank ``r`` owns rows ``lo <= id < hi``; the
        blocks are contiguous, disjoint, in rank order and cover ``[0, num_rows)``. Every block
        has ``ceil(num_rows / world_size)`` rows except possibly the trailing ones, which may be
        shorter or empty (``lo == hi == num_rows``), e.g. ``row_partition(4, 3) ==
        [(0, 2), (2, 4), (4, 4)]``.
    """
    size = block_size(num_rows, world_size)
    bounds: list[tuple[int, int]] = []
    for r in range(world_size):
        lo = min(r * size, num_rows)
        hi = min(lo + size, num_rows)
        bounds.append((lo, hi))
    return bounds


def owner_of(ids: torch.Tensor, num_rows: int, world_size: int) -> torch.Tensor:
    """Rank that owns each global row id.

    Args:
        ids: integer tensor of any shape with values in ``[0, num_rows)``.
        num_rows: catalog size in rows.
        world_size: number of ranks.

    Returns:
        ``torch.long`` tensor of ``ids``'s shape holding rank indices in ``[0, world_size)``.
    """
    size = max(block_size(num_rows, world_size), 1)
    return torch.div(ids.long(), size, rounding_mode="floor")


def dist_active() -> bool:
    """True when ``torch.distributed`` is usable and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def group_rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process inside ``group`` (default group when ``None``).

    Without an initialised process group this is ``(0, 1)``.
    """
    if not dist_active():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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


def max_over_ranks(n: int, group: dist.ProcessGroup | None = None) -> int:
    """Largest value of ``n`` over the ranks of ``group`` (collective: every rank must call it).

    Evaluation loops use it to agree on a common number of collective calls when ranks hold
    different numbers of batches::

        n_batches = max_over_ranks(len(my_batches), group)
        for i in range(n_batches):
            if i < len(my_batches):
                q, t, h = my_batches[i]
            else:  # this rank ran out of data but must still take part
                q, t, h = q.new_zeros(0, d), t.new_zeros(0), h.new_zeros(0, h.shape[1])
            acc.update(rank_targets(q, t, block, lo, num_rows, h, group=group))

    Args:
        n: a non-negative count (e.g. number of local eval batches).
        group: process group; ``None`` means the default group (or no group at all).

    Returns:
        ``max`` of ``n`` over all ranks, identical on every rank.
    """
    _, world = group_rank_and_size(group)
    if world == 1:
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.long, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())
