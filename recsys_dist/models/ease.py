"""EASE (Steck, WWW 2019, "Embarrassingly Shallow Autoencoders for Sparse Data") and the
popularity ranker: closed-form, training-free baselines for DiffRec-style (user vector ->
item scores) evaluation.

EASE learns an item-item weight matrix ``B`` with zero diagonal that reconstructs the user-item
matrix, ``min_B ||X - X B||_F^2 + lam ||B||_F^2`` s.t. ``diag(B) = 0``. Its closed form is

    P = (X^T X + lam I)^{-1},    B = I - P diag(1 / diag(P)),

i.e. ``B[i, j] = -P[i, j] / P[j, j]`` for ``i != j`` and ``B[j, j] = 0``. A user with row
``x_u`` scores item ``j`` by ``(x_u B)[j] = x_u . B[:, j]``. In the project's evaluators
(:func:`recsys_dist.eval.rank_target_sets`) that is ``queries = X`` rows ``(b, N)`` and
``item_block = B.T`` (rows of ``B.T`` are columns of ``B``), restricted to the rank's row block.

Id convention (as everywhere in this package): item ids are ``1 .. N - 1``; row/column 0 is
padding. Column 0 of ``X`` is ignored, and row and column 0 of the returned ``B`` are zero, so
padding neither contributes to nor receives a score (the evaluator also never ranks row 0).

Pure torch, no torch.distributed. Everything is dense: memory is a few ``N x N`` matrices of
``dtype`` (``N^2 * 8`` bytes each in float64; 98 MB for ML-1M's ~3.5k items), time one
``N x N`` Gram product over the users plus an ``O(N^3)`` Cholesky inverse.
"""

from __future__ import annotations

import torch

__all__ = ["fit_ease", "ease_from_gram", "ease_scores", "popularity_scores"]


def fit_ease(X: torch.Tensor, lam: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EASE's item-item weights ``B`` in closed form.

    Args:
        X: ``(U, N)`` float user-item matrix (typically binary: 1 where user ``u`` interacted
            with item ``j`` in the training split). Column 0 is padding and is ignored.
        lam: L2 regularisation ``lambda > 0`` (added to the diagonal of the Gram matrix).
        dtype: dtype of the Gram matrix, the inverse and ``B`` (float64 by default: the inverse
            of ``X^T X + lam I`` loses precision in float32 for small ``lam``).

    Returns:
        ``B``: ``(N, N)`` tensor of ``dtype`` on ``X``'s device with ``diag(B) = 0`` and row /
        column 0 zero; on the item block ``1..N-1``,
        ``B = I - P diag(1 / diag(P))`` with ``P = (X^T X + lam I)^{-1}`` (``X`` without its
        column 0). Scores of users ``X_b`` (``(b, N)``) are ``X_b @ B``.

    Memory: the Gram matrix, its Cholesky factor / inverse and ``B``, i.e. about
    ``3 N^2`` elements of ``dtype`` at peak (plus ``X`` cast to ``dtype``).

    Raises:
        ValueError: for a non-2-D ``X``, ``N < 1``, a non-positive or non-finite ``lam`` or a
            non-floating ``dtype``.
    """
    if X.dim() != 2 or X.shape[1] < 1:
        raise ValueError(f"X must be (U, N) with N >= 1, got shape {tuple(X.shape)}")
    lam = float(lam)
    if not lam > 0 or lam == float("inf"):
        raise ValueError(f"lam must be a positive finite number, got {lam}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point, got {dtype}")
    Xd = X.to(dtype)
    return ease_from_gram(Xd.T @ Xd, lam)


def ease_from_gram(G: torch.Tensor, lam: float) -> torch.Tensor:
    """:func:`fit_ease` from a precomputed ``(N, N)`` Gram matrix ``G = X^T X`` (row and
    column 0, padding, are ignored), in ``G``'s dtype; ``G`` is not modified. Lets a
    lambda sweep compute ``X^T X`` once."""
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 1:
        raise ValueError(f"G must be square (N, N) with N >= 1, got shape {tuple(G.shape)}")
    lam = float(lam)
    if not lam > 0 or lam == float("inf"):
        raise ValueError(f"lam must be a positive finite number, got {lam}")
    if not G.dtype.is_floating_point:
        raise ValueError(f"G must be floating point, got {G.dtype}")
    n = G.shape[0]
    A = G[1:, 1:].clone()  # items 1 .. N-1; row/column 0 is padding
    A.diagonal().add_(lam)
    L = torch.linalg.cholesky(A)  # X^T X + lam I is symmetric positive definite for lam > 0
    del A
    P = torch.cholesky_inverse(L)
    del L
    Bi = P / (-P.diagonal())[None, :]  # B[i, j] = -P[i, j] / P[j, j]
    del P
    Bi.diagonal().zero_()
    B = torch.zeros(n, n, dtype=G.dtype, device=G.device)
    B[1:, 1:] = Bi
    return B


def ease_scores(X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(b, N)`` EASE scores ``X @ B`` of users ``X`` (``(b, N)``; cast to ``B``'s dtype).

    Column 0 (padding) scores 0. Seen items are *not* masked here (the evaluator does that)."""
    return X.to(B.dtype) @ B


def popularity_scores(X: torch.Tensor) -> torch.Tensor:
    """``(N,)`` popularity of every item: the column sums of ``X`` (for binary ``X``, the number
    of training interactions), entry 0 (padding) set to 0; same dtype as ``X`` when floating,
    else float64. Rank with :func:`recsys_dist.eval.popularity_block` and ``queries =
    torch.ones(b, 1)``."""
    if X.dim() != 2:
        raise ValueError(f"X must be (U, N), got shape {tuple(X.shape)}")
    counts = X.sum(dim=0, dtype=X.dtype if X.dtype.is_floating_point else torch.float64)
    if counts.numel():
        counts[0] = 0
    return counts
