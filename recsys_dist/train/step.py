"""One training step: batch of ids -> table lookups -> dense query -> full-catalog CE -> update.

The path of one batch (see README "One batch"):
  history/target ids (this rank) + this rank's block of catalog ids
  -> one collective lookup in the sharded table (pad ids are never sent)
  -> dense query from the DeepSpeed engine (noise drawn for the global batch, sliced)
  -> sharded softmax CE (exact log-sum-exp across ranks)
  -> engine.backward: dense grads all-reduced; table rows updated by the fused optimizer.

Two objectives (``train.objective``):
- ``last``: one query per sample (the model's ``query``), scored against the sample's target;
  the loss is the mean over the batch.
- ``all_positions`` (causal models: SASRec, GRU4Rec): every position of the history predicts
  its next item in the same forward pass (``query_all``, (B, L, d)). Position i < L-1 predicts
  history[:, i+1], position L-1 the sample's target; position i is trained iff history[:, i]
  is a real item (left padding: its next item is then real too). The targets' embeddings are
  the history's, shifted left by one, plus the target's: no extra lookup. The loss is the mean
  CE over the real positions of the *global* batch: each rank returns
  ``sum of its positions' CE * world / global count`` (count all-reduced), so DeepSpeed's
  averaging of the gradients over ranks yields exactly the global mean's gradient whatever
  the ranks' counts are. The sharded CE all-gathers an equal number of query rows from every
  rank: each rank scores its real positions plus weight-0 filler rows up to the largest count
  of any rank (padding positions are otherwise not scored: short histories cost nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recsys_dist.config import stream_seed
from recsys_dist.sparse import ShardedItemTable
from recsys_dist.distributed import all_reduce_mean, max_over_ranks
from recsys_dist.train.catalog_loss import CatalogLoss, build_catalog_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, rank and batch."""


@dataclass
class DenseBatch:
    hist: torch.Tensor  # (B, L, d) left-padded history embeddings, zeros at padding
    mask: torch.Tensor  # (B, L) bool, True at real items
    target: torch.Tensor  # (B, d) target embeddings


def embed(table: ShardedItemTable, history: torch.Tensor, target: torch.Tensor | None,
          extra: list[torch.Tensor] = ()) -> tuple[DenseBatch, list[torch.Tensor]]:
    """Look up history (B, L) and target (B,) ids plus extra id groups in one collective call.

    Returns the dense batch and the embeddings of each extra group ((n_i, d) each).
    """
    device = table.dmp.device
    mask = history > 0
    target_ids = target if target is not None else torch.empty(0, dtype=torch.long)
    out = table.lookup([history[mask], target_ids, *extra])
    hist_values, target_emb, rest = out[0], out[1], out[2:]
    B, L = history.shape
    flat = torch.zeros(B * L, table.dim, dtype=hist_values.dtype, device=hist_values.device)
    index = mask.reshape(-1).nonzero().squeeze(1).to(hist_values.device)
    hist = flat.index_copy(0, index, hist_values).view(B, L, table.dim)
    return DenseBatch(hist, mask.to(device), target_emb), rest


def step_noise(model, step: int, seed: int, local_batch: int, max_len: int, rank: int, world: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Noise for this rank's rows of the global batch, drawn from a (seed, step) stream, so
    any world size with the same global batch sees the same noise."""
    gen = torch.Generator().manual_seed(stream_seed(seed, "train-noise", step))
    noise = model.draw_noise(local_batch * world, max_len, gen)
    return {k: v[rank * local_batch:(rank + 1) * local_batch].to(device) for k, v in noise.items()}


OBJECTIVES = ("last", "all_positions")


def check_objective(model, objective: str) -> None:
    """Raise ValueError if ``objective`` is unknown or ``model`` cannot be trained on it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown train.objective '{objective}' ({' | '.join(OBJECTIVES)})")
    if objective == "all_positions" and not getattr(model, "supports_all_positions", False):
        raise ValueError(
            f"train.objective=all_positions needs a causal model whose every position predicts the next "
            f"item (supports_all_positions, query_all); {type(model).__name__} is not one: use "
            f"train.objective=last")


def next_item_ids(history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, L) the item each position predicts: history[:, i+1] for i < L-1, the target at L-1."""
    return torch.cat([history[:, 1:], target[:, None].to(history.dtype)], dim=1)


def _position_rows(mask: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sample, position) rows the all-positions loss scores, and their weights.

    mask (B, L): True at real positions. Returns ``rows`` (n,) indices into the flattened B*L
    positions -- this rank's real positions, then copies of row 0 up to n = the largest count
    of any rank (the sharded CE all-gathers an equal number of rows from every rank; padding
    positions beyond that are not scored at all) -- and ``weights`` (n,): ``world / global
    count`` at the real positions, 0 at the filler rows.
    """
    valid = mask.reshape(-1)
    real = valid.nonzero().squeeze(1)
    total = torch.tensor([real.numel()], dtype=torch.long, device=mask.device)
    if world > 1:
        dist.all_reduce(total)
    n = max(max_over_ranks(real.numel()), 1)
    rows = torch.cat([real, real.new_zeros(n - real.numel())])
    weights = torch.zeros(n, dtype=torch.float32, device=mask.device)
    weights[:real.numel()] = world / max(int(total.item()), 1)
    return rows, weights


def train_step(engine, table: ShardedItemTable, history: torch.Tensor, target: torch.Tensor,
               step: int, seed: int, catalog_loss: CatalogLoss | None = None,
               objective: str = "last") -> torch.Tensor:
    """Forward, backward and update for one batch; returns the global mean loss (detached).

    history: (B, L) long, 0 = pad, left-padded; target: (B,) long item ids. B equal on all ranks.
    seed: the job's seed (the diffusion noise of ``step`` is drawn from it).
    catalog_loss: the job's loss over the catalog (``catalog_loss.py``; default: the full
    softmax CE, or none for models that train without one).
    objective: ``last`` or ``all_positions`` (see the module docstring); the returned loss is
    the mean over the global batch's samples, or over its real positions.
    """
    model = engine.module
    check_objective(model, objective)
    if catalog_loss is None:
        catalog_loss = build_catalog_loss("full_ce", table, model)
    all_positions = objective == "all_positions"
    rank, world = table.rank, table.world_size
    cands = catalog_loss.candidates(step, target)
    batch, (block,) = embed(table, history, target, [cands.ids])
    noise = step_noise(model, step, seed, history.shape[0], history.shape[1], rank, world, batch.hist.device)
    engine.train()
    weights = None  # per-row loss weights (all positions)
    if all_positions:
        rows, weights = _position_rows(batch.mask, world)
        B, L = history.shape
        target_ids = next_item_ids(history, target).reshape(B * L).to(rows.device)[rows]
        target_emb = torch.cat([batch.hist[:, 1:], batch.target[:, None]], dim=1).reshape(B * L, table.dim)[rows]
    else:
        target_ids = target.to(batch.target.device)
        target_emb = batch.target

    def scorer(query: torch.Tensor) -> torch.Tensor:
        """Catalog loss of this rank's targets for queries (B, d): their mean; under all
        positions queries (B, L, d): this rank's share of the global mean over real positions.
        Queries score the rows' ``item_keys`` (the rows, or unit rows for cosine models)."""
        query = query.float()
        if all_positions:
            query = query.reshape(B * L, query.shape[-1])[rows]
        target_logits = (query * model.item_keys(target_emb.float())).sum(-1)
        return catalog_loss(query, target_logits, target_ids, cands, model.item_keys(block), weights=weights)

    dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed on GPU
    kwargs = {"all_positions": True} if all_positions else {}
    loss = engine(batch.hist.to(dtype), batch.mask, batch.target.to(dtype), noise, scorer, **kwargs).float()
    reduced = all_reduce_mean(loss)
    if not torch.isfinite(reduced):
        raise NonFiniteLossError(
            f"non-finite loss {reduced.item()} at step {step} (rank {rank} local loss {loss.item()}, "
            f"batch targets {target[:8].tolist()}...); stopped before this step's update")
    engine.backward(loss)
    engine.step()
    table.step_optimizer()  # replicated table: its optimizer step on the DDP-averaged gradient; no-op when fused
    return reduced
