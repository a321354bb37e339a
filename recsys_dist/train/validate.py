"""Run a trained model over an eval split and rank the full catalog (recsys_dist.eval).

Each rank reads its own users (every user exactly once across ranks), computes their query
vectors (reverse diffusion for DiffuRec, seeded per user so the result does not depend on
the world size or batch composition), and the evaluator ranks every item on the rank that
owns it. Ranks with fewer batches keep joining the collectives with empty batches.

Protocol: with ``eval.mask_history`` the candidates exclude the user's *whole* seen set (the
batch's ``seen`` column, every earlier item however long the history), never the target; with
``eval.mask_scope: input`` only the items of the model's input window (HSTU's repo); ties
with the target follow ``eval.ties`` (default: expected rank under a random order of ties).
"""

from __future__ import annotations

import typing
from typing import Iterable

import torch

from recsys_dist.config import EvalConfig, stream_seed
from recsys_dist.distributed import collective_device, in_lockstep, row_range
from recsys_dist.eval import MetricAccumulator, rank_targets
from recsys_dist.eval.onepass import release_score_buffer
from recsys_dist.noise import EVAL_NOISE_KINDS, UserNormalStreams
from recsys_dist.sparse import ShardedItemTable
from recsys_dist.train.step import embed


def eval_noise(model, users: torch.Tensor, max_len: int, seed: int, kind: str = "generator"
               ) -> dict[str, torch.Tensor]:
    """Inference noise drawn per user from a (seed, user) stream: world-size independent.

    kind (``eval.noise``): "generator" (default) is a ``torch.Generator`` seeded by
    ``stream_seed(seed, "eval-noise", user)`` per user, in a Python loop; "counter" draws every
    user's noise in one batched call from counter-based streams keyed by (seed, "eval-noise",
    user) (:mod:`recsys_dist.noise`): other values, the same distribution, faster per user once
    its kernel is compiled (a one-off 40-150 s a process; docs/evaluation.md has the costs).
    """
    if kind == "counter":
        return model.draw_eval_noise(int(users.shape[0]), max_len, UserNormalStreams(seed, "eval-noise", users))
    if kind != "generator":
        raise ValueError(f"unknown eval noise {kind!r} (known: {', '.join(EVAL_NOISE_KINDS)})")
    parts = [model.draw_eval_noise(1, max_len, torch.Generator().manual_seed(stream_seed(seed, "eval-noise", int(u))))
             for u in users]
    if not parts:
        return {k: v[:0] for k, v in model.draw_eval_noise(1, max_len, torch.Generator()).items()}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _empty_batch(max_len: int) -> dict[str, torch.Tensor]:
    return {"history": torch.zeros(0, max_len, dtype=torch.long), "seen": torch.zeros(0, 0, dtype=torch.long),
            "target": torch.zeros(0, dtype=torch.long), "user": torch.zeros(0, dtype=torch.long)}


MASK_SCOPES = typing.get_args(typing.get_type_hints(EvalConfig)["mask_scope"])  # the config's Literal


def check_mask_scope(scope: str) -> None:
    if scope not in MASK_SCOPES:
        raise ValueError(f"unknown eval.mask_scope '{scope}' ({' | '.join(MASK_SCOPES)})")


def _masked(batch: dict[str, torch.Tensor], scope: str) -> torch.Tensor:
    """The ids ``eval.mask_history`` removes: the whole seen set (``seen``; the history for
    readers that store none), or only the model's input window (``input``: the (B, L) history,
    its padding 0 is never a candidate anyway)."""
    check_mask_scope(scope)
    return batch["seen"] if scope == "seen" and "seen" in batch else batch["history"]


@torch.no_grad()
def evaluate_model(model, table: ShardedItemTable, batches: Iterable[dict], cfg: EvalConfig,
                   max_len: int, progress=None, seed: int | None = None) -> dict[str, float]:
    """HR@K / NDCG@K of ``model`` over every user in ``batches`` (this rank's share).

    batches: dicts with "history" (B, L) long, "target" (B,) long, "user" (B,) long and
    (val/test) "seen" (B, S) long. seed: eval-noise seed (default ``cfg.seed``).
    Returns the same metric dict on every rank (plus "num_users").
    """
    seed = cfg.seed if seed is None else seed
    was_training = model.training
    model.eval()
    lo, hi = table.score_block()
    # the rows' keys: a view of the table (no copy), or a unit-row copy for cosine models
    block = model.item_keys(table.score_rows(chunk=cfg.item_chunk if cfg.item_chunk > 0 else 1 << 20))
    acc = MetricAccumulator(cfg.ks, cfg.ties)
    for batch in in_lockstep(batches):
        batch = batch if batch is not None else _empty_batch(max_len)
        dense, _ = embed(table, batch["history"], None)
        dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed on GPU
        noise = {k: v.to(dense.hist.device, dtype if v.is_floating_point() else v.dtype)
                 for k, v in eval_noise(model, batch["user"], max_len, seed, cfg.noise).items()}
        if dense.hist.shape[0]:
            query = model.infer(dense.hist.to(dtype), dense.mask, noise).float()
        else:
            query = torch.zeros(0, table.dim, device=dense.hist.device)
        if not bool(torch.isfinite(query).all()):
            raise ValueError(f"evaluation: the model produced NaN/inf queries for users "
                             f"{batch['user'][~torch.isfinite(query).all(-1).cpu()][:8].tolist()} "
                             f"(rank {table.rank}); refusing to rank them")
        result = rank_targets(query, batch["target"].to(query.device), block.float(), lo, table.num_rows,
                              histories=_masked(batch, cfg.mask_scope).to(query.device), mask_history=cfg.mask_history,
                              ks=cfg.ks, item_chunk=cfg.item_chunk, ties=cfg.ties)
        acc.update(result)
        if progress is not None:
            progress.update(int(batch["target"].shape[0]))
    model.train(was_training)
    release_score_buffer()  # the evaluator's scores are not kept through training
    return acc.compute()


@torch.no_grad()
def evaluate_popularity(item_counts: torch.Tensor, num_rows: int, batches: Iterable[dict], cfg: EvalConfig,
                        rank: int, world: int) -> dict[str, float]:
    """The popularity ranker through the same evaluator: d = 1, query = 1, score = train count."""
    lo, hi = row_range(num_rows, world, rank)
    device = collective_device()  # NCCL-only groups need the counts on the GPU
    block = item_counts[lo:hi, None].double().to(device)
    acc = MetricAccumulator(cfg.ks, cfg.ties)
    for batch in in_lockstep(batches):
        batch = batch if batch is not None else _empty_batch(1)
        b = batch["target"].shape[0]
        result = rank_targets(torch.ones(b, 1, dtype=torch.float64, device=device), batch["target"].to(device),
                              block, lo, num_rows, histories=_masked(batch, cfg.mask_scope).to(device),
                              mask_history=cfg.mask_history, ks=cfg.ks, ties=cfg.ties)
        acc.update(result)
    release_score_buffer()  # the evaluator's scores are not kept through training
    return acc.compute()
