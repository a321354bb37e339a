"""DiffRec's input rows: per-user interaction vectors x_0 (B, N) from [user, item] pairs, and
T-DiffRec's temporal weights (T-DiffRec/data_utils.py:36-47: linspace(w_min, w_max, M_u) over a
user's M_u rows in order of appearance; M_u = 1 gives w_min)."""

from __future__ import annotations

import numpy as np
import torch

def temporal_weights(users: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """T-DiffRec's weight of every (user, item) row (T-DiffRec/data_utils.py:36-47): each user's
    rows, in the order they appear, get linspace(w_min, w_max, M_u); M_u = 1 gives w_min.
    ``users`` (n,) int64 -> (n,) float64."""
    users = torch.as_tensor(users, dtype=torch.long)
    n = users.numel()
    out = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return out
    order = torch.argsort(users, stable=True)  # keeps each user's rows in order of appearance
    su = users[order]
    _, counts = torch.unique_consecutive(su, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    m = torch.arange(n) - torch.repeat_interleave(starts, counts)  # 0-based position m - 1
    big_m = torch.repeat_interleave(counts, counts).to(torch.float64)
    frac = torch.where(big_m > 1, m.to(torch.float64) / (big_m - 1).clamp(min=1), torch.zeros_like(big_m))
    out[order] = w_min + frac * (w_max - w_min)
    return out


def interaction_matrix(pairs, n_users: int, n_items: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (n_users, n_items) float32 from [user, item] rows (DiffRec/data_utils.py:34-36);
    duplicate pairs add up, as scipy's csr_matrix does. ``weights``: T-DiffRec values per row."""
    pairs = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
    vals = torch.ones(pairs.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
    x = torch.zeros(n_users, n_items, dtype=torch.float64)
    x.index_put_((pairs[:, 0], pairs[:, 1]), vals, accumulate=True)
    return x.float()

