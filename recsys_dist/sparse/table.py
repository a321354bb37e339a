"""The item table: one TorchRec ``EmbeddingCollection`` sharded by the planner, wrapped in
``DistributedModelParallel`` with a fused (in-backward) optimizer -- the default, for large
catalogs -- or, for small ones, replicated on every rank and stepped by a torch optimizer
(``sparse.sharding: data_parallel``, below). ``item_collection`` (the table on the meta device,
its optimizer attached) and ``sharding_planner`` (TorchRec's planner restricted to the
configured sharding and kernel) are the one description of it: ``create`` and the capacity
planner (``planner.py``) both build on them; which configurations it accepts is ``spec.py``.

Ids are global item ids 0..num_rows-1 with row 0 the padding row: it is never looked up (the
caller sends only real ids, as jagged values), so it stays exactly zero and is never trained.

Gradients: every rank's loss is a mean over its own samples, so the table gradients that
arrive through the sharded backward sum to ``world_size`` times the gradient of the
global-batch mean. TorchRec's all-to-all backward divides them by the world size (its
``comm_ops`` gradient division, on by default; ``create`` turns it on explicitly), and
DeepSpeed averages the dense gradients over ranks, so tables and dense weights both follow
the gradient of the global mean -- the same update as one rank holding the whole batch
(``tests/test_sharded_training.py`` checks this under plain SGD, which is scale-sensitive).

Replicated table (``sparse.sharding: data_parallel``, for small catalogs): TorchRec's
``DATA_PARALLEL`` sharding with the dense compute kernel (``EmbeddingComputeKernel.DENSE``):
every rank holds the whole table, lookups are local, and the sharded module wraps the dense
lookup in DDP, which all-reduces the (dense, full-table) gradient in the backward and divides it
by the world size -- the same gradient-of-the-global-mean as above. No fused kernel: a normal
torch optimizer (``sparse.optimizer``: ``adamw`` as in the official DreamRec code, ``sgd``, or
TorchRec's dense ``RowWiseAdagrad``, the same algorithm as the fused one) in a TorchRec
``KeyedOptimizerWrapper`` steps the table once per batch in ``step_optimizer()``, called after
the backward. TorchRec's ``apply_optimizer_in_backward`` does nothing for the dense kernel
(the weights do not move; AdamW is not even castable to an fbgemm optimizer type), hence the
explicit step. Every row gets a gradient each step (zero for rows no sample touched), so AdamW
moves rows by their momentum as ``nn.Embedding`` + AdamW does; row 0 is never looked up, so its
gradient, moments and (with decoupled weight decay, which only scales it) its value stay zero.
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
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DataType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper

from recsys_dist.config import SparseConfig, stream_seed
from recsys_dist.distributed import any_rank, max_over_ranks, multi_rank, rank_and_world, row_range
from recsys_dist.sparse.spec import REPLICATED, SHARDINGS, check_sparse_config

log = logging.getLogger("recsys_dist.sparse")

TABLE = "item"
FEATURE = "item"
WEIGHT = f"embeddings.{TABLE}.weight"  # the table's FQN in the DMP state dict and named_parameters
SHARDING_TYPES = {name: ShardingType(name).value for name in SHARDINGS}  # sparse.sharding -> TorchRec's


def _optimizer(cfg: SparseConfig) -> tuple[type, dict]:
    """The optimizer class and arguments: the fused kernel's (sharded) or the torch one (replicated)."""
    check_sparse_config(cfg)
    if cfg.optimizer == "rowwise_adagrad":
        # a torch optimizer (dense gradients) and, for the fused kernel, the marker of fbgemm's
        # EXACT_ROWWISE_ADAGRAD: both add mean(g^2) of a row to its accumulator
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
        return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr}
    return torch.optim.AdamW, {"lr": cfg.lr, "betas": tuple(cfg.betas),
                               "eps": cfg.eps, "weight_decay": float(cfg.weight_decay)}


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's (lazy) state now, exactly as its first step would, so that the state dict
    has the same entries before and after the first step (a checkpoint loads in place into it).
    RowWiseAdagrad creates its state in its constructor; SGD without momentum has none."""
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam
        return
    from torch.optim.optimizer import _get_scalar_dtype

    for group in optimizer.param_groups:
        if group["capturable"] or group["fused"] or group["amsgrad"] or group["differentiable"]:
            raise NotImplementedError("eager AdamW state: capturable / fused / amsgrad / differentiable")
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")  # as Adam's lazy init
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def item_collection(num_rows: int, dim: int, cfg: SparseConfig,
                    data_type: DataType = DataType.FP32) -> EmbeddingCollection:
    """The item table as the trainer builds it, on the meta device (nothing allocated): one
    ``EmbeddingCollection``, table ``TABLE`` looked up by feature ``FEATURE``, ``num_rows`` x
    ``dim``; a sharded table carries its fused in-backward optimizer (the planner reads it off
    the parameter), a replicated one none (``create`` steps it with a torch optimizer).
    ``data_type``: the weights' dtype (the trainer's tables are fp32; the planner asks what-ifs)."""
    check_sparse_config(cfg)
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim, num_embeddings=num_rows,
                                feature_names=[FEATURE], data_type=data_type)],
        device=torch.device("meta"))
    if cfg.sharding != REPLICATED:
        opt_cls, opt_kwargs = _optimizer(cfg)
        apply_optimizer_in_backward(opt_cls, ec.parameters(), opt_kwargs)
    return ec


def sharders() -> list[EmbeddingCollectionSharder]:
    """How the table is sharded (an ``EmbeddingCollection``): for the planner and DMP alike."""
    return [EmbeddingCollectionSharder()]


def sharding_planner(cfg: SparseConfig, topology: Topology, batch_size: int,
                     pooling_factor: float | None = None, **kwargs) -> EmbeddingShardingPlanner:
    """TorchRec's planner restricted to the configured sharding type and its kernel: fused for
    sharded tables (the only one the CPU path supports for them), dense for the replicated
    (data-parallel) one. ``pooling_factor``: ids per sample (TorchRec's default otherwise);
    ``kwargs`` go to ``EmbeddingShardingPlanner`` (e.g. ``storage_reservation``)."""
    check_sparse_config(cfg)
    kernel = EmbeddingComputeKernel.DENSE if cfg.sharding == REPLICATED else EmbeddingComputeKernel.FUSED
    extra = {} if pooling_factor is None else {"pooling_factors": [float(pooling_factor)]}
    constraints = {TABLE: ParameterConstraints(sharding_types=[SHARDING_TYPES[cfg.sharding]],
                                               compute_kernels=[kernel.value], **extra)}
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints, batch_size=batch_size,
                                    **kwargs)


def plan_table(module: nn.Module, cfg: SparseConfig, world_size: int, device: torch.device,
               batch_size: int, group: dist.ProcessGroup | None = None) -> ShardingPlan:
    """The trainer's sharding plan for ``module`` (``item_collection``) on ``world_size`` ranks
    (a collective plan when several ranks run)."""
    planner = sharding_planner(cfg, Topology(world_size=world_size, compute_device=device.type),
                               batch_size)
    if group is not None or (multi_rank() and world_size > 1):
        return planner.collective_plan(module, sharders(), group or dist.GroupMember.WORLD)
    return planner.plan(module, sharders())


@dataclass
class ShardedItemTable:
    """The item table (sharded, or replicated under ``data_parallel``) and the ways the trainer
    and evaluator touch it."""

    dmp: DistributedModelParallel
    num_rows: int
    dim: int
    rank: int
    world_size: int
    # the replicated table's optimizer (TorchRec KeyedOptimizerWrapper, keyed by WEIGHT);
    # None for sharded tables, whose fused optimizer runs inside the backward
    dense_optimizer: KeyedOptimizerWrapper | None = None

    @classmethod
    def create(cls, num_rows: int, dim: int, cfg: SparseConfig, device: torch.device,
               batch_size: int, seed: int, column_std: torch.Tensor | None = None) -> "ShardedItemTable":
        """Build on the meta device, plan, shard, then fill every row from one seeded stream.
        ``column_std`` (dim,): a standard deviation per column instead of ``cfg.init_std``
        (tables that hold several layers' weights side by side, e.g. DiffRec's, sparse/wide.py)."""
        check_sparse_config(cfg)  # before anything is built
        set_gradient_division(True)  # average, not sum, the table gradients over ranks (see above)
        rank, world = rank_and_world()
        ec = item_collection(num_rows, dim, cfg)
        replicated = cfg.sharding == REPLICATED
        plan = plan_table(ec, cfg, world, device, batch_size)
        dmp = DistributedModelParallel(ec, device=device, plan=plan, sharders=sharders())
        optimizer = None
        if replicated:
            opt_cls, opt_kwargs = _optimizer(cfg)
            # TorchRec's recipe for parameters without an in-backward optimizer: a keyed torch
            # optimizer over DMP's named parameters (here: the one table replica)
            params = {WEIGHT: dict(dmp.named_parameters())[WEIGHT]}
            optimizer = KeyedOptimizerWrapper(params, lambda ps: opt_cls(ps, **opt_kwargs))
            _init_optimizer_state(optimizer._optimizer)
        table = cls(dmp, num_rows, dim, rank, world, optimizer)
        table.init_rows(seed, cfg.init_std if column_std is None else column_std, cfg.init_block_rows)
        if rank == 0:
            log.info("item table %d x %d %s, optimizer %s:\n%s", num_rows, dim,
                     "replicated (data_parallel, dense kernel)" if replicated else f"sharded {cfg.sharding}",
                     cfg.optimizer, plan)
        return table

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole table (data_parallel sharding, dense kernel)."""
        return self.dense_optimizer is not None

    def _pending_grad(self) -> bool:
        return dict(self.dmp.named_parameters())[WEIGHT].grad is not None

    def _replica(self) -> torch.Tensor:
        """The replicated table's (num_rows, dim) weights on this rank (a view)."""
        return dict(self.dmp.named_parameters())[WEIGHT].detach()

    # ---- placement -------------------------------------------------------------------
    def local_shards(self) -> list[tuple[int, int, torch.Tensor]]:
        """(row_offset, col_offset, tensor) of every shard this rank holds (views of the weights);
        the replicated table: one shard, the whole table."""
        if self.replicated:
            return [(0, 0, self._replica())]
        weight = self.dmp.state_dict()[WEIGHT]
        return [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]), s.tensor)
                for s in weight.local_shards()]

    @torch.no_grad()
    def init_rows(self, seed: int, std: float | torch.Tensor, block_rows: int) -> None:
        """Rows ~ N(0, std^2) from one stream keyed by (seed, row block), independent of the
        world size and sharding (a replica gets every row: the same on every rank); row 0
        (padding) is zero. ``std``: one value, or one per column ((dim,) tensor)."""
        std = std if isinstance(std, float) or isinstance(std, int) else torch.as_tensor(std, dtype=torch.float32)
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
        """[lo, hi) rows this rank scores (its own rows under row-wise sharding; the replicated
        table keeps the same blocks, each rank scoring its block from its own replica)."""
        return row_range(self.num_rows, self.world_size, self.rank)

    # ---- lookups ---------------------------------------------------------------------
    def lookup(self, id_groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """One collective lookup for several id groups: ids (n_i,) long -> embeddings (n_i, d).

        All groups go through one forward, so their gradients meet in one fused update (the
        replicated table: in one DDP all-reduce). Every rank must call this the same number of
        times (it is a collective).
        """
        device = self.dmp.device
        if self.replicated and torch.is_grad_enabled() and self._pending_grad():
            raise RuntimeError("the replicated item table still holds the gradient of an earlier backward: "
                               "call table.step_optimizer() after each backward (train_step does), or its "
                               "rows would never move and the gradients would pile up")
        sizes = [len(g) for g in id_groups]
        values = torch.cat([g.reshape(-1).to(torch.int64).cpu() for g in id_groups]) if id_groups \
            else torch.empty(0, dtype=torch.int64)
        if self.replicated and values.numel() == 0 and not torch.is_grad_enabled():
            # a replica's lookup is local (no collective): an empty one (a rank out of eval users)
            # is answered here; TorchRec's dense kernel cannot reshape zero ids
            return [torch.zeros(0, self.dim, device=device) for _ in sizes]
        if self.replicated:
            # one id per bag: fbgemm's CPU dense kernel pools (sums) each bag even under
            # PoolingMode.NONE (pytorch/FBGEMM#4586), so a bag of one id is the exact row
            lengths = torch.ones(values.numel(), dtype=torch.int64)
        else:
            lengths = torch.tensor(sizes, dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=values.to(device),
                                                  lengths=lengths.to(device))
        out = self.dmp(kjt)[FEATURE].values()
        return list(torch.split(out, sizes))

    @torch.no_grad()
    def rows(self, lo: int, hi: int, chunk: int = 1 << 20) -> torch.Tensor:
        """Rows [lo, hi) as a dense (hi - lo, d) tensor, read through the sharded lookup.

        Collective: every rank calls it, each with its own range; the number of lookups is the
        maximum over ranks, so ranks with shorter ranges keep in step (with empty lookups).
        Row 0 reads as zeros. The replicated table copies the rows from its own replica (no
        lookup, no collective).
        """
        if self.replicated:
            return self._replica()[lo:hi].clone()
        calls = max_over_ranks(max(1, -(-(hi - lo) // chunk)))
        parts = []
        for i in range(calls):
            start = lo + i * chunk
            ids = torch.arange(start, max(start, min(hi, start + chunk)))
            parts.append(self.lookup([ids])[0].detach())
        return torch.cat(parts)

    def local_row_bytes(self) -> int:
        """Bytes of the rows this rank holds (every shard; the replica: the whole table)."""
        return sum(t.numel() * t.element_size() for _, _, t in self.local_shards())

    @torch.no_grad()
    def score_rows(self, chunk: int = 1 << 20) -> torch.Tensor:
        """This rank's score block (``score_block()`` rows, (hi - lo, d)) for read-only use.

        When the rank holds exactly those rows at full width (row-wise sharding, and the
        replica) it is a view of the table's own storage: no copy, so evaluation needs no
        second table in memory; the caller must not write to it, and it moves when the table
        trains. Otherwise (other sharding types) it is ``rows(lo, hi, chunk)``, a copy through
        the lookup. Collective in the copying case only; the choice is the same on every rank.
        """
        lo, hi = self.score_block()
        if self.replicated:
            return self._replica()[lo:hi].detach()
        own = [(r, c, t) for r, c, t in self.local_shards() if t.numel()]
        view = (len(own) == 1 and own[0][0] == lo and own[0][1] == 0 and own[0][2].shape == (hi - lo, self.dim))
        if hi == lo and not own:
            view = True  # an empty block (more ranks than rows)
        if bool(any_rank(not view)):
            return self.rows(lo, hi, chunk)
        return own[0][2].detach() if own else torch.zeros(0, self.dim, device=self.dmp.device)

    @torch.no_grad()
    def full_table(self) -> torch.Tensor:
        """Every row on every rank (small tables only: tests and debugging)."""
        return self.rows(0, self.num_rows)

    # ---- optimizer ---------------------------------------------------------------------
    def step_optimizer(self) -> None:
        """Update the replicated table from its gradient (call once per batch, after the
        backward: DDP has all-reduced it there), then drop the gradient. Without a gradient
        (no backward since the last call) it does nothing, so a second call is harmless.
        Sharded tables: nothing to do (their fused optimizer ran inside the backward)."""
        if self.dense_optimizer is None:
            return
        self.dense_optimizer.step()
        self.dense_optimizer._optimizer.zero_grad(set_to_none=True)

    def optimizer_state_dict(self) -> dict:
        """The table optimizer's state keyed by the table's FQN, for DCP: the fused optimizer's
        (ShardedTensors) or the replicated table's (plain tensors, the same on every rank:
        DCP writes them once). Its tensors are the live state: DCP loads in place into them."""
        if self.dense_optimizer is not None:
            return self.dense_optimizer.state_dict()
        return self.dmp.fused_optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        if self.dense_optimizer is not None:
            self.dense_optimizer.load_state_dict(state)
        else:
            self.dmp.fused_optimizer.load_state_dict(state)

    def fused_optimizer_state(self) -> dict:
        return self.optimizer_state_dict()
