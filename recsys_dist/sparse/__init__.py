"""Sparse part: the TorchRec item table (sharded, or replicated for small catalogs), its
sharding plan and world-size-independent init (``table``), what it accepts (``spec``, no
torchrec) and the capacity planner built on it (``planner``).

The table's names load on first use, so ``recsys_dist.sparse.spec`` / ``.planner`` import
without torchrec (the launcher's parser stays cheap)."""

from recsys_dist.sparse.spec import check_sparse_config

__all__ = ["ShardedItemTable", "check_sparse_config", "plan_table"]


def __getattr__(name: str):
    if name in ("ShardedItemTable", "plan_table"):
        from recsys_dist.sparse import table
        return getattr(table, name)
    raise AttributeError(f"module 'recsys_dist.sparse' has no attribute '{name}'")
