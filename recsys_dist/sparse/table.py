"""The item table: one TorchRec ``EmbeddingCollection`` sharded by the planner, wrapped in
``DistributedModelParallel`` with a fused (in-backward) optimizer.

Ids are global item ids 0..num_rows-1 with row 0 the padding row: it is never looked up (the
caller sends only real ids, as jagged values), so it stays exactly zero and is never trained.

Gradients: every rank's loss is a mean over its own samples, so the table gradients that
arrive through the sharded backward sum to ``world_size`` times the gradient of the
global-batch mean. TorchRec's all-to-all backward divides them by the world size (its
``comm_ops`` gradient division, on by default; ``create`` turns it on explicitly), and
DeepSpeed averages the dense gradients over ranks, so tables and dense weights both follow
the gradient of the global mean -- the same update as one rank holding the whole batch
(``tests/test_sharded_training.py`` checks this under plain SGD, which is scale-sensitive).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm_ops import set_gradient_division
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recsys_dist.config import SparseConfig, stream_seed

log = logging.getLogger("recsys_dist.sparse")

TABLE = "item"
FEATURE = "item"
SHARDING_TYPES = {
    "row_wise": ShardingType.ROW_WISE.value,
    "table_wise": ShardingType.TABLE_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
}


def row_block(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) rows a rank scores: contiguous blocks of ceil(num_rows / W), as TorchRec's
    row-wise sharding places them."""
    block = -(-num_rows // world_size)
    lo = min(rank * block, num_rows)
    return lo, min(lo + block, num_rows)


def _optimizer(cfg: SparseConfig) -> tuple[type, dict]:
    if cfg.optimizer == "rowwise_adagrad":
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
        return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr}
    raise ValueError(f"unknown sparse optimizer '{cfg.optimizer}' (rowwise_adagrad | sgd)")


def plan_table(module: nn.Module, cfg: SparseConfig, world_size: int, device: torch.device,
               batch_size: int, group: dist.ProcessGroup | None = None) -> ShardingPlan:
    """Ask TorchRec's planner for a plan restricted to the configured sharding type and the
    fused kernel (the only one the CPU path supports for sharded tables)."""
    if cfg.sharding not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding '{cfg.sharding}' (known: {sorted(SHARDING_TYPES)})")
    constraints = {TABLE: ParameterConstraints(sharding_types=[SHARDING_TYPES[cfg.sharding]],
                                               compute_kernels=["fused"])}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        constraints=constraints, batch_size=batch_size)
    sharder = EmbeddingCollectionSharder()
    if group is not None or (dist.is_initialized() and world_size > 1):
        return planner.collective_plan(module, [sharder], group or dist.GroupMember.WORLD)
    return planner.plan(module, [sharder])


@dataclass
class ShardedItemTable:
    """The sharded item table and the ways the trainer and evaluator touch it."""

    dmp: DistributedModelParallel
    num_rows: int
    dim: int
    rank: int
    world_size: int

    @classmethod
    def create(cls, num_rows: int, dim: int, cfg: SparseConfig, device: torch.device,
               batch_size: int, seed: int) -> "ShardedItemTable":
        """Build on the meta device, plan, shard, then fill every row from one seeded stream."""
        set_gradient_division(True)  # average, not sum, the table gradients over ranks (see above)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim, num_embeddings=num_rows,
                                    feature_names=[FEATURE])],
            device=torch.device("meta"))
        opt_cls, opt_kwargs = _optimizer(cfg)
        apply_optimizer_in_backward(opt_cls, ec.parameters(), opt_kwargs)
        plan = plan_table(ec, cfg, world, device, batch_size)
        dmp = DistributedModelParallel(ec, device=device, plan=plan,
                                       sharders=[EmbeddingCollectionSharder()])
        table = cls(dmp, num_rows, dim, rank, world)
        table.init_rows(seed, cfg.init_std, cfg.init_block_rows)
        if rank == 0:
            log.info("item table %d x %d sharded %s:\n%s", num_rows, dim, cfg.sharding, plan)
        return table

    # ---- placement -------------------------------------------------------------------
    def local_shards(self) -> list[tuple[int, int, torch.Tensor]]:
        """(row_offset, col_offset, tensor) of every shard this rank holds (views of the weights)."""
        weight = self.dmp.state_dict()[f"embeddings.{TABLE}.weight"]
        return [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]), s.tensor)
                for s in weight.local_shards()]

    @torch.no_grad()
    def init_rows(self, seed: int, std: float, block_rows: int) -> None:
        """Rows ~ N(0, std^2) from one stream keyed by (seed, row block), independent of the
        world size and sharding; row 0 (padding) is zero."""
        for row_off, col_off, shard in self.local_shards():
            n, width = shard.shape
            first, last = row_off // block_rows, (row_off + n - 1) // block_rows
            for b in range(first, last + 1):
                gen = torch.Generator().manual_seed(stream_seed(seed, "table-init", b))
                b_lo = b * block_rows
                rows = min(block_rows, self.num_rows - b_lo)
                values = torch.randn(rows, self.dim, generator=gen) * std
                if b_lo == 0:
                    values[0] = 0.0
                lo, hi = max(row_off, b_lo), min(row_off + n, b_lo + rows)
                shard[lo - row_off:hi - row_off].copy_(
                    values[lo - b_lo:hi - b_lo, col_off:col_off + width].to(shard.dtype))

    def score_block(self) -> tuple[int, int]:
        """[lo, hi) rows this rank scores (its own rows under row-wise sharding)."""
        return row_block(self.num_rows, self.world_size, self.rank)

    # ---- lookups ---------------------------------------------------------------------
    def lookup(self, id_groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """One collective lookup for several id groups: ids (n_i,) long -> embeddings (n_i, d).

        All groups go through one forward, so their gradients meet in one fused update.
        Every rank must call this the same number of times (it is a collective).
        """
        device = self.dmp.device
        lengths = torch.tensor([len(g) for g in id_groups], dtype=torch.int64)
        values = torch.cat([g.reshape(-1).to(torch.int64).cpu() for g in id_groups]) if id_groups \
            else torch.empty(0, dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=values.to(device),
                                                  lengths=lengths.to(device))
        out = self.dmp(kjt)[FEATURE].values()
        return list(torch.split(out, lengths.tolist()))

    @torch.no_grad()
    def rows(self, lo: int, hi: int, chunk: int = 1 << 20) -> torch.Tensor:
        """Rows [lo, hi) as a dense (hi - lo, d) tensor, read through the sharded lookup.

        Collective: every rank calls it, each with its own range; the number of lookups is the
        maximum over ranks, so ranks with shorter ranges keep in step (with empty lookups).
        Row 0 reads as zeros.
        """
        calls = torch.tensor([max(1, -(-(hi - lo) // chunk))])
        if self.world_size > 1:
            dist.all_reduce(calls, op=dist.ReduceOp.MAX)
        parts = []
        for i in range(int(calls.item())):
            start = lo + i * chunk
            ids = torch.arange(start, max(start, min(hi, start + chunk)))
            parts.append(self.lookup([ids])[0].detach())
        return torch.cat(parts)

    @torch.no_grad()
    def full_table(self) -> torch.Tensor:
        """Every row on every rank (small tables only: tests and debugging)."""
        return self.rows(0, self.num_rows)

    def fused_optimizer_state(self) -> dict:
        return self.dmp.fused_optimizer.state_dict()
