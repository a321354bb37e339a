"""One training step: batch of ids -> table lookups -> dense query -> full-catalog CE -> update.

The path of one batch (see README "One batch"):
  history/target ids (this rank) + this rank's block of catalog ids
  -> one collective lookup in the sharded table (pad ids are never sent)
  -> dense query from the DeepSpeed engine (noise drawn for the global batch, sliced)
  -> sharded softmax CE (exact log-sum-exp across ranks)
  -> engine.backward: dense grads all-reduced; table rows updated by the fused optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recsys_dist.config import stream_seed
from recsys_dist.sparse import ShardedItemTable
from recsys_dist.train.losses import sampled_softmax_ce, sharded_softmax_ce
from recsys_dist.train.negatives import NegativeSampler


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


def _all_gather_ids(ids: torch.Tensor, world: int) -> torch.Tensor:
    """(W * b,) ids of every rank (b equal on all ranks), in rank order."""
    if world == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(out, ids)
    return torch.cat(out)


def train_step(engine, table: ShardedItemTable, history: torch.Tensor, target: torch.Tensor,
               step: int, seed: int, loss_name: str = "full_ce", num_negatives: int = 1024,
               sampler: NegativeSampler | None = None, in_batch_negatives: bool = False) -> torch.Tensor:
    """Forward, backward and update for one batch; returns the global mean loss (detached).

    history: (B, L) long, 0 = pad, left-padded; target: (B,) long item ids. B equal on all ranks.
    loss_name: ``full_ce`` (softmax over every item, exact across shards) or
    ``sampled_softmax``: ``num_negatives`` ids from ``sampler`` (uniform if None) shared by the
    global batch, plus (``in_batch_negatives``) the global batch's targets, logQ-corrected.
    """
    model = engine.module
    rank, world = table.rank, table.world_size
    log_counts = None  # (n,) log expected count of each candidate (logQ correction)
    if not getattr(model, "uses_scorer", True):
        candidates = torch.empty(0, dtype=torch.long)
    elif loss_name == "full_ce":
        lo, hi = table.score_block()
        candidates = torch.arange(max(lo, 1), hi)  # this rank's rows; padding is never a candidate
    elif loss_name == "sampled_softmax":
        sampler = sampler or NegativeSampler(table.num_rows, kind="uniform")
        # n sampled ids (+ the global batch's B targets), each with its log expected count in the
        # candidate set: log(n q_j), or the mixture log(n q_j + (B - 1) p_j) with in-batch ids
        batch_ids = _all_gather_ids(target, world).cpu() if in_batch_negatives else None
        candidates, log_counts = sampler.candidates(num_negatives, seed, step, batch_ids)
    else:
        raise ValueError(f"unknown loss '{loss_name}' (full_ce | sampled_softmax)")
    batch, (block,) = embed(table, history, target, [candidates])
    noise = step_noise(model, step, seed, history.shape[0], history.shape[1], rank, world, batch.hist.device)
    engine.train()
    target_ids = target.to(batch.target.device)

    def scorer(query: torch.Tensor) -> torch.Tensor:
        """Mean softmax CE of this rank's targets for queries (B, d)."""
        query = query.float()
        target_logits = (query * batch.target.float()).sum(-1)
        if loss_name == "full_ce":
            return sharded_softmax_ce(query, target_logits, block.float())
        return sampled_softmax_ce(query, target_logits, target_ids, block.float(), candidates.to(query.device),
                                  None if log_counts is None else log_counts.to(query.device))

    dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed on GPU
    loss = engine(batch.hist.to(dtype), batch.mask, batch.target.to(dtype), noise, scorer).float()
    reduced = loss.detach().clone()
    if world > 1:
        dist.all_reduce(reduced)
        reduced /= world
    if not torch.isfinite(reduced):
        raise NonFiniteLossError(
            f"non-finite loss {reduced.item()} at step {step} (rank {rank} local loss {loss.item()}, "
            f"batch targets {target[:8].tolist()}...); stopped before this step's update")
    engine.backward(loss)
    engine.step()
    return reduced
