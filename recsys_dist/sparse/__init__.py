"""Sparse part: the TorchRec item table (sharded, or replicated for small catalogs), its
sharding plan and world-size-independent init."""

from recsys_dist.sparse.table import ShardedItemTable, check_sparse_config, plan_table

__all__ = ["ShardedItemTable", "check_sparse_config", "plan_table"]
