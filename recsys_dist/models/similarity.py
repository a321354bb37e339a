"""How a next-item model's query scores an item row: the dot product, or the cosine over a
temperature (the recipe of HSTU's repo for its SASRec baseline).

``model.similarity: dot`` (default): score = q . e, the SASRec and GRU4Rec papers' form.

``model.similarity: cosine``: score = (q / |q|) . (e / |e|) / temperature, both norms clamped
at ``EPS``; logits lie in [-1 / T, 1 / T]. This is what HSTU's repo trains its SASRec baseline with
(generative-recommenders, configs/ml-1m/sasrec-sampled-softmax-n128-final.gin:
``user_embedding_norm = "l2_norm"``, ``item_l2_norm = True``, ``temperature = 0.05``,
``l2_norm_eps = 1e-6``; evaluation ranks by the plain cosine), the run behind the ML-1M SASRec
target of docs/results.md. Both sides are computed in float32 (under bf16 the unit vectors
over T = 0.05 would carry logit errors of ~0.05).

Where each side is applied, so every loss and the evaluator see the same score: the model
applies :meth:`Similarity.query` to the queries it returns (``query``, ``query_all``,
``infer``); the trainer's scorer and the evaluator pass the rows they score through the
model's ``item_keys`` (:meth:`Similarity.keys`). The table's rows themselves stay raw: the
encoder reads them as its inputs, unnormalised, as HSTU's does. Ranking by q . keys(e) is then
ranking by the model's score (the temperature scales every score of a query alike).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIMILARITIES = ("dot", "cosine")
EPS = 1e-6  # HSTU's l2_norm_eps: the smallest norm divided by


@dataclass
class SimilarityFields:
    """The score of a query against an item row (mixin of next-item model configs)."""

    similarity: str = "dot"  # dot | cosine (unit query and item vectors, over temperature)
    temperature: float = 1.0  # cosine only: logits = cosine / temperature (HSTU: 0.05)


class Similarity:
    """The two sides of ``similarity``: ``query`` (..., d) and ``keys`` (n, d), both shape-
    preserving; for ``dot`` both are the identity (no copy)."""

    def __init__(self, kind: str = "dot", temperature: float = 1.0) -> None:
        if kind not in SIMILARITIES:
            raise ValueError(f"unknown model.similarity '{kind}' ({' | '.join(SIMILARITIES)})")
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if kind == "dot" and temperature != 1.0:
            raise ValueError(f"model.temperature={temperature} applies to model.similarity=cosine only "
                             f"(a dot-product model's scale is its embeddings'); set model.similarity=cosine")
        if kind == "cosine" and temperature == 1.0:
            warnings.warn("model.similarity=cosine with model.temperature=1.0: logits lie in [-1, 1], which "
                          "hardly trains a softmax over a catalog (HSTU uses 0.05)", stacklevel=2)
        self.kind, self.temperature = kind, float(temperature)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """The scored query: q itself, or q / max(|q|, EPS) / temperature (float32)."""
        if self.kind == "dot":
            return q
        return F.normalize(q.float(), dim=-1, eps=EPS) / self.temperature

    def keys(self, rows: torch.Tensor) -> torch.Tensor:
        """The scored item vectors: the rows themselves, or rows / max(|row|, EPS) (float32;
        a zero row, the padding row, stays zero)."""
        if self.kind == "dot":
            return rows
        return F.normalize(rows.float(), dim=-1, eps=EPS)
