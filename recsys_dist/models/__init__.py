"""Model registry: a model is one builder from a ModelConfig to a dense nn.Module.

Modules here are pure torch math: no torchrec, torch.distributed or deepspeed imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # recsys_dist.config imports models.diffrec (its config section): no import cycle
    from recsys_dist.config import ModelConfig
from recsys_dist.models.base import SequenceRecommender
from recsys_dist.models.areal import AREAL
from recsys_dist.models.diffurec import DiffuRec
from recsys_dist.models.dimerec import DimeRec
from recsys_dist.models.dreamrec import DreamRec
from recsys_dist.models.gru4rec import GRU4Rec
from recsys_dist.models.sasrec import SASRec

Builder = Callable[["ModelConfig", int], SequenceRecommender]

MODELS: dict[str, Builder] = {
    "diffurec": lambda c, max_len: DiffuRec(c.dim, c.num_blocks, c.num_heads, c.dropout, c.emb_dropout,
                                            c.diffusion_steps, c.schedule, c.lambda_uncertainty,
                                            c.diffurec_form),
    "sasrec": lambda c, max_len: SASRec(c.dim, max_len, c.num_blocks, c.num_heads, c.dropout, c.emb_dropout),
    "gru4rec": lambda c, max_len: GRU4Rec(c.dim, c.num_layers, c.dropout, c.emb_dropout),
    "dreamrec": lambda c, max_len: DreamRec(c.dim, max_len, c.num_blocks, c.num_heads, c.dropout, c.emb_dropout,
                                            c.diffusion_steps, c.schedule, c.p_uncond, c.guidance_w,
                                            c.sample_steps, c.eta, c.guidance_ce_weight, c.rank_by,
                                            getattr(c, "dreamrec_form", "ours")),
    "areal": lambda c, max_len: AREAL(c.dim, max_len, c.num_blocks, c.dropout, c.emb_dropout, c.diffusion_steps,
                                      c.schedule, c.p_uncond, c.guidance_w, c.sample_steps, c.eta,
                                      c.mcrl_use_cnn, c.mcrl_use_lstm, c.mcrl_local_weight,
                                      c.guidance_ce_weight, c.rank_by),
    "dimerec": lambda c, max_len: DimeRec(c.dim, max_len, c.num_blocks, c.num_heads, c.dropout, c.emb_dropout,
                                          c.diffusion_steps, c.schedule, c.sample_steps, c.num_interests, c.gem,
                                          c.lambda_recon, c.mu_ssm, c.sphere),
}


#: models over whole per-user interaction sets, trained by their own job (not SequenceRecommenders):
#: ``model.name: diffrec`` -> recsys_dist/train/diffrec_job.py, config section ``diffrec:``
SET_MODELS: tuple[str, ...] = ("diffrec",)


def build_model(cfg: ModelConfig, max_len: int) -> SequenceRecommender:
    """Instantiate the dense model named by ``cfg.name``."""
    if cfg.name in SET_MODELS:
        raise ValueError(f"model '{cfg.name}' is a set model: its job is recsys_dist/train/diffrec_job.py")
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model '{cfg.name}' (known: {sorted(MODELS)} and set models {list(SET_MODELS)})")
    return MODELS[cfg.name](cfg, max_len)


__all__ = ["MODELS", "SET_MODELS", "build_model", "SequenceRecommender", "AREAL", "DiffuRec", "DimeRec", "DreamRec", "GRU4Rec", "SASRec"]
