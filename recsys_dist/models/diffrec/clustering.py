"""L-DiffRec's item clusters: ``kmeans`` (deterministic given its generator), the cluster of
every item (``item_clusters``: (N,) long in [0, C)), and each cluster's share of the VAE's
widths (``cluster_widths``, L-DiffRec/models/Autoencoder.py:72-82)."""

from __future__ import annotations

import numpy as np
import torch

from recsys_dist.models.diffrec.config import DiffRecConfig


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, tol: float = 1e-4,
           max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with squared Euclidean distance, started from k distinct rows drawn with
    ``generator``, stopped when (sum of the centres' shifts)^2 < tol (the rule of
    ``kmeans_pytorch``, which L-DiffRec/models/Autoencoder.py:7, :60 calls) or after max_iter.
    An empty cluster keeps its centre. x (n, d) -> (labels (n,) long, centres (k, d) float32)."""
    x = x.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    centres = x[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(max_iter):
        labels = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        shift = (new - centres).norm(dim=1).sum()
        centres = new
        if float(shift) ** 2 < tol:
            break
    labels = torch.cdist(x, centres).argmin(dim=1)
    return labels, centres


def item_clusters(cfg: DiffRecConfig, n_items: int, item_emb=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) long: every item's cluster, all 0 when ``n_cate`` is 1, else ``kmeans`` of the item
    embeddings ``item_emb`` (N, d) with ``generator`` (default: seeded 0)."""
    if cfg.n_cate == 1:
        return torch.zeros(n_items, dtype=torch.long)
    if item_emb is None:
        raise ValueError("L-DiffRec needs item_emb (or cluster_ids)")
    item_emb = torch.as_tensor(np.asarray(item_emb))
    if item_emb.shape[0] != n_items:
        raise ValueError(f"item_emb has {item_emb.shape[0]} rows, expected {n_items}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    labels, _ = kmeans(item_emb, cfg.n_cate, gen, cfg.kmeans_tol, cfg.kmeans_max_iter)
    return labels


def cluster_widths(sizes: list[int], ae_dims: tuple[int, ...]) -> list[list[int]]:
    """Each cluster's share of every encoder width (Autoencoder.py:75-82): int(n_c / N * d_j),
    at least 1, the last cluster takes the rest. ``sizes`` (C,) items per cluster."""
    n, dims, c_num = sum(sizes), list(ae_dims), len(sizes)
    lat: list[list[int]] = []
    for c in range(c_num):
        if c == c_num - 1:
            lat.append([dims[j] - sum(lat[i][j] for i in range(c)) for j in range(len(dims))])
        else:
            lat.append([max(int(sizes[c] / n * dims[j]), 1) for j in range(len(dims))])
    if any(w < 1 for ws in lat for w in ws):
        raise ValueError(f"ae_dims {ae_dims} too narrow for {c_num} clusters: widths {lat}")
    return lat

