"""Inputs and checks shared by the model tests: left-padded histories (an empty one included),
random left-padded id batches, and the padding-never-changes-the-output check."""

from __future__ import annotations

import dataclasses

import torch


def dense_inputs(L: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hist (4, L, D) zero at padding, mask (4, L), target (4, D); rows hold 1, 5, L and 0 items
    (row 3: an empty history, the first interaction of a Zhihu session)."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(4, L, D, generator=g)
    mask = torch.zeros(4, L, dtype=torch.bool)
    mask[0, -1:] = True
    mask[1, -5:] = True
    mask[2] = True
    return hist * mask[..., None], mask, torch.randn(4, D, generator=g)


def left_padded_batches(seed: int, steps: int, global_batch: int, rows: int, L: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` (history (B, L) left-padded with 0, target (B,)) batches of ids in [1, rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        hist = torch.randint(1, rows, (global_batch, L), generator=g)
        lengths = torch.randint(1, L + 1, (global_batch,), generator=g)
        hist[torch.arange(L)[None, :] < (L - lengths)[:, None]] = 0  # left padding
        out.append((hist, torch.randint(1, rows, (global_batch,), generator=g)))
    return out


def assert_padding_is_ignored(model, hist, mask, target, scorer, dim: int) -> torch.Tensor:
    """Garbage in padded positions changes neither the loss nor the inference query; the same
    noise gives the same query. Returns the query (B, dim)."""
    L = hist.shape[1]
    noise = model.draw_noise(hist.shape[0], L, torch.Generator().manual_seed(1))
    loss = model(hist, mask, target, noise, scorer)
    assert loss.dim() == 0 and torch.isfinite(loss)
    poisoned = hist + (~mask)[..., None] * 100.0
    assert torch.allclose(model(poisoned, mask, target, noise, scorer), loss, atol=1e-5)
    ev = model.draw_eval_noise(hist.shape[0], L, torch.Generator().manual_seed(2))
    q = model.infer(hist, mask, ev)
    assert q.shape == (hist.shape[0], dim) and torch.isfinite(q).all()
    assert torch.allclose(model.infer(poisoned, mask, ev), q, atol=1e-5)
    assert torch.equal(model.infer(hist, mask, ev), q)
    return q


def train_tiny_next_item(model, table: torch.nn.Embedding, opt, loss_fn, steps: int, B: int, L: int,
                         seed: int = 1) -> list[float]:
    """Train on a toy next-item rule (the label is the last item + 1, mod the catalog); half the
    histories are short. ``loss_fn(model, hist, mask, target_emb, labels, generator)`` returns the
    batch loss. Returns the losses."""
    n_items = table.num_embeddings
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[: B // 2, : L // 2] = False
    losses = []
    for _ in range(steps):
        items = torch.randint(0, n_items, (B, L), generator=g)
        labels = (items[:, -1] + 1) % n_items
        loss = loss_fn(model, table(items) * mask[..., None], mask, table(labels), labels, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def small_model_config(name: str, **fields):
    """The config of model ``name`` with those of ``fields`` that it has (the model tests share
    one set of small settings across models with different fields)."""
    from recsys_dist.models import MODEL_CONFIGS, model_config

    own = {f.name for f in dataclasses.fields(MODEL_CONFIGS[name])}
    return model_config(name, **{k: v for k, v in fields.items() if k in own})
