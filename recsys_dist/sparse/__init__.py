"""Sparse part: the TorchRec item table, its sharding plan and world-size-independent init."""

from recsys_dist.sparse.table import ShardedItemTable, plan_table, row_block

__all__ = ["ShardedItemTable", "plan_table", "row_block"]
