"""What the item table accepts, without importing torchrec: its sharding types, its sparse
optimizers and the check of a ``SparseConfig`` against them.

The one list of each; ``table.py`` (the table itself) and ``planner.py`` (the capacity
planner) both use these, and the launcher's ``plan`` options are built from them while its
parser stays cheap.
"""

from __future__ import annotations

from recsys_dist.config import SparseConfig

# TorchRec's ShardingType values (an EmbeddingCollection: no table_row_wise for sequence tables)
SHARDINGS = ("row_wise", "table_wise", "column_wise", "data_parallel")
REPLICATED = "data_parallel"  # every rank holds the whole table: small catalogs, dense kernel
SHARDED = tuple(s for s in SHARDINGS if s != REPLICATED)  # the fused in-backward kernel
FUSED_OPTIMIZERS = ("rowwise_adagrad", "sgd")  # sharded tables: fbgemm's fused kernels (CPU: these two)
DENSE_OPTIMIZERS = ("adamw", "rowwise_adagrad", "sgd")  # the replicated table: torch optimizers


def check_sparse_config(cfg: SparseConfig) -> None:
    """Raise ValueError for a sharding / optimizer combination the table cannot train with."""
    if cfg.sharding not in SHARDINGS:
        raise ValueError(f"unknown sparse.sharding '{cfg.sharding}' ({' | '.join(SHARDINGS)})")
    weight_decay = float(cfg.weight_decay)
    if cfg.sharding == REPLICATED:
        if cfg.optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"unknown sparse.optimizer '{cfg.optimizer}' for sparse.sharding=data_parallel "
                             f"({' | '.join(DENSE_OPTIMIZERS)})")
        if weight_decay != 0.0 and cfg.optimizer != "adamw":
            raise ValueError(f"sparse.weight_decay={weight_decay} is AdamW's (decoupled) weight decay; "
                             f"sparse.optimizer={cfg.optimizer} has none: set sparse.weight_decay=0")
        return
    if cfg.optimizer == "adamw":
        raise ValueError(f"sparse.optimizer=adamw needs sparse.sharding=data_parallel (a replicated table, "
                         f"stepped by torch's AdamW after the backward); a {cfg.sharding}-sharded table is "
                         f"trained by TorchRec's fused in-backward kernel, which here supports only "
                         f"{' | '.join(FUSED_OPTIMIZERS)}")
    if cfg.optimizer not in FUSED_OPTIMIZERS:
        raise ValueError(f"unknown sparse.optimizer '{cfg.optimizer}' for sparse.sharding={cfg.sharding} "
                         f"({' | '.join(FUSED_OPTIMIZERS)}; adamw needs sparse.sharding=data_parallel)")
    if weight_decay != 0.0:
        raise ValueError(f"sparse.weight_decay={weight_decay} applies only to sparse.optimizer=adamw "
                         f"(sparse.sharding=data_parallel): set sparse.weight_decay=0")
