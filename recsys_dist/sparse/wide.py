"""DiffRec's two catalog-wide layers held in the item table, row-wise sharded across ranks.

DiffRec's denoiser reads an N-wide vector x_t and writes an N-wide x0_hat. At N = 10M items its
first layer (N -> h_in) and last layer (h_out -> N, with bias) are each a 10M x h table, so
they live where the sequence models keep their item embeddings: in the TorchRec item table,
side by side in one row per item (one table, one planner decision, one fused optimizer)::

    row 1 + j  =  [ W_in[j] (h_in) | W_out[j] (h_out) | b_out[j] (1) | 0 pad to a multiple of 4 ]

(row 0 is the padding row, never looked up, as for every table here). Each rank owns the rows
of its block (:meth:`ShardedItemTable.score_block`) and computes only their columns of x:

* first layer: ``pre = sum_r x[:, block_r] @ W_in[block_r]`` - each rank multiplies the
  *global* batch's columns of its block by its rows, a differentiable all-reduce sums the
  partial products, each rank keeps its own users' rows (for the dense layers, DeepSpeed);
* last layer: the dense layers' outputs h are all-gathered (differentiable), each rank forms
  ``out[:, block_r] = h_all @ W_out[block_r]^T + b_out[block_r]`` for the global batch;
* the MSE over all N outputs is the sum of per-block sums of squares, summed across ranks
  (differentiable all-reduce): exact, not an estimate.

The columns of x_t mix the user's items (sparse) and Gaussian noise (dense): every rank draws
the noise of its own columns only, from streams keyed by (seed, purpose, step, column chunk)
(:func:`column_noise`), so every world size and sharding sees the same noise as one process
drawing all N columns. The same holds for the input dropout's keep mask.

Gradients follow the convention of the rest of the trainer (``recsys_dist.sparse.table``):
each rank's loss is the mean over its own users; the table rows receive the summed gradient of
all ranks' losses through the all-reduce, TorchRec divides it by the world size, DeepSpeed
averages the dense gradients: both follow the gradient of the global-batch mean.

Cost per step and rank: the global batch times the rank's N / W columns, twice (in and out),
plus an all-reduce of (B, h_in) and an all-gather of (B, h_out): the catalog dimension is
split, the batch is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recsys_dist.config import stream_seed
from recsys_dist.sparse.table import ShardedItemTable
from recsys_dist.distributed import gather_rows, rank_and_world, stack_over_ranks, sum_over_ranks

NOISE_CHUNK = 4096  # columns per noise stream: the unit of world-size independence


@dataclass(frozen=True)
class WideLayout:
    """Column layout of a row: ``[W_in (in_width) | W_out (out_width) | b_out (1) | zero pad]``."""

    in_width: int
    out_width: int

    @property
    def used(self) -> int:
        return self.in_width + self.out_width + 1

    @property
    def dim(self) -> int:
        """Row width: the used columns rounded up to a multiple of 4 (fbgemm's kernels need it);
        the pad columns are zero, never read, so they get no gradient and stay zero."""
        return -(-self.used // 4) * 4

    def column_std(self, std_in: float, std_out: float, std_bias: float) -> torch.Tensor:
        """(dim,) init standard deviations per column (``ShardedItemTable.create(column_std=)``)."""
        return torch.cat([torch.full((self.in_width,), std_in), torch.full((self.out_width,), std_out),
                          torch.full((1,), std_bias), torch.zeros(self.dim - self.used)])

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, dim) rows -> W_in (n, in_width), W_out (n, out_width), b_out (n,)."""
        a, b = self.in_width, self.in_width + self.out_width
        return rows[:, :a], rows[:, a:b], rows[:, b]


def column_noise(seed: int, purpose: str, step: int, batch: int, lo: int, hi: int, kind: str = "normal",
                 chunk: int | None = None) -> torch.Tensor:
    """(batch, hi - lo) float32 noise for columns [lo, hi) of a (batch, N) matrix.

    Column chunk c (columns c*chunk .. (c+1)*chunk - 1) comes from its own generator keyed by
    (seed, purpose, step, c): the value at (i, j) does not depend on [lo, hi), so ranks drawing
    their own column blocks together draw exactly what one process drawing [0, N) draws.
    ``kind``: ``normal`` (standard Gaussian) or ``uniform`` ([0, 1)).
    """
    if kind not in ("normal", "uniform"):
        raise ValueError(f"kind must be normal or uniform, got {kind!r}")
    chunk = chunk or NOISE_CHUNK
    out = torch.empty(batch, max(hi - lo, 0))
    if hi <= lo:
        return out
    for c in range(lo // chunk, (hi - 1) // chunk + 1):
        gen = torch.Generator().manual_seed(stream_seed(seed, f"{purpose}/{step}", c))
        full = (torch.randn if kind == "normal" else torch.rand)(batch, chunk, generator=gen)
        c_lo, c_hi = max(lo, c * chunk), min(hi, (c + 1) * chunk)
        out[:, c_lo - lo:c_hi - lo] = full[:, c_lo - c * chunk:c_hi - c * chunk]
    return out


class WideLayers:
    """The first and last DiffRec layers over this rank's block of the item table.

    ``items`` are 0-based item indices j (table row j + 1). This rank's item range is
    ``[item_lo, item_hi)`` (its table rows minus the padding row).
    """

    def __init__(self, table: ShardedItemTable, layout: WideLayout,
                 group: dist.ProcessGroup | None = None) -> None:
        if table.dim != layout.dim:
            raise ValueError(f"item table has dim {table.dim}, the layout needs {layout.dim}")
        self.table, self.layout, self.group = table, layout, group
        lo, hi = table.score_block()
        self.row_lo, self.row_hi = lo, hi
        self.item_lo = max(lo, 1) - 1
        self.item_hi = max(hi - 1, self.item_lo)
        self.num_items = table.num_rows - 1

    @property
    def block_width(self) -> int:
        return self.item_hi - self.item_lo

    # ---- the rows ------------------------------------------------------------------------
    def block_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows through the table's lookup (collective; gradients reach the table's
        optimizer): W_in (n, h_in), W_out (n, h_out), b_out (n,)."""
        ids = torch.arange(self.item_lo + 1, self.item_hi + 1)
        (rows,) = self.table.lookup([ids])
        return self.layout.split(rows)

    # ---- the batch's columns -----------------------------------------------------------
    def gather_users(self, offsets: torch.Tensor, items: torch.Tensor, values: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Every rank's users' items (collective): ``offsets`` (b + 1,), ``items`` (n,) 0-based
        item indices, ``values`` (n,) x_0 values (None: 1). Returns ids (B, L) (-1 = pad),
        values (B, L) and the per-rank user counts, users in rank order."""
        rank, world = rank_and_world(self.group)
        b = offsets.numel() - 1
        lens = offsets[1:] - offsets[:-1]
        if values is None:
            values = torch.ones(items.numel())
        width = int(lens.max()) if b else 0
        header = torch.tensor([b, width], dtype=torch.long)
        heads = stack_over_ranks(header, self.group)
        sizes = [int(h[0]) for h in heads]
        width = max(int(h[1]) for h in heads)
        ids = jagged_to_padded(offsets, items.long(), width, fill=-1)
        vals = jagged_to_padded(offsets, values.float(), width, fill=0.0)
        return gather_rows(ids, sizes, self.group), gather_rows(vals, sizes, self.group), sizes

    def dense_block(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, block_width) x_0 columns of this rank's block from padded ids / values; a
        repeated item adds up (as scipy's csr_matrix of the official loader)."""
        x = torch.zeros(ids.shape[0], self.block_width)
        keep = (ids >= self.item_lo) & (ids < self.item_hi)
        r, c = keep.nonzero(as_tuple=True)
        x.index_put_((r, ids[r, c] - self.item_lo), values[r, c], accumulate=True)
        return x

    def row_norms(self, x_block: torch.Tensor) -> torch.Tensor:
        """(B,) L2 norms of the full N-wide rows (collective; no gradient needed: x is data)."""
        sq = (x_block.detach() ** 2).sum(dim=1)  # on the block's device (CPU: gloo; CUDA: NCCL)
        _, world = rank_and_world(self.group)
        if world > 1:
            dist.all_reduce(sq, group=self.group)
        return sq.sqrt()

    # ---- the layers --------------------------------------------------------------------
    def first(self, x_block: torch.Tensor, w_in: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, block) x -> (b_own, h_in) pre-activations of this rank's users (no bias)."""
        return self.reduce_own(x_block.to(w_in.dtype) @ w_in, sizes)

    def reduce_own(self, partial: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, h) per-rank partial products of every rank's users -> their sum over ranks, this
        rank's users' rows (differentiable)."""
        rank, world = rank_and_world(self.group)
        total = sum_over_ranks(partial, self.group) if world > 1 else partial
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]]

    def last(self, h_own: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(b_own, h_out) -> (B, block) outputs of this rank's columns for every rank's users."""
        _, world = rank_and_world(self.group)
        h_all = gather_rows(h_own, sizes, self.group) if world > 1 else h_own
        return h_all @ w_out.t().to(h_all.dtype) + b_out.to(h_all.dtype)

    def sum_columns(self, per_user_block_sum: torch.Tensor) -> torch.Tensor:
        """(B,) per-user sums over this rank's columns -> sums over all N columns (differentiable)."""
        return sum_over_ranks(per_user_block_sum, self.group)


def jagged_to_padded(offsets: torch.Tensor, values: torch.Tensor, width: int | None = None,
                     fill: float | int = 0) -> torch.Tensor:
    """Jagged rows (``offsets`` (b + 1,), ``values`` (n,)) -> (b, width) right-padded with ``fill``
    (``width`` default: the longest row)."""
    b = offsets.numel() - 1
    lens = offsets[1:] - offsets[:-1]
    width = (int(lens.max()) if b else 0) if width is None else width
    out = torch.full((b, width), fill, dtype=values.dtype)
    if values.numel():
        row = torch.repeat_interleave(torch.arange(b), lens)
        col = torch.arange(values.numel()) - torch.repeat_interleave(offsets[:-1], lens)
        out[row, col] = values
    return out
