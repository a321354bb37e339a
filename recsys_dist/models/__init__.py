"""Model registry: ``model.name`` -> the model's config dataclass (next to its code), whose
``build(max_len)`` makes the dense nn.Module.

Modules here are pure torch math: no torchrec, torch.distributed or deepspeed imports. Adding a
model: a module with the nn.Module (the contract in ``base.py``) and its config dataclass
(a ``ModelConfig`` subclass with ``name`` and ``build``), one line in :data:`MODEL_CONFIGS`
(README "Adding a dataset or a model").
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_dist.models.areal import AREAL, AREALConfig
from recsys_dist.models.base import ModelConfig, SequenceRecommender
from recsys_dist.models.diffurec import DiffuRec, DiffuRecConfig
from recsys_dist.models.dimerec import DimeRec, DimeRecConfig
from recsys_dist.models.dreamrec import DreamRec, DreamRecConfig
from recsys_dist.models.gru4rec import GRU4Rec, GRU4RecConfig
from recsys_dist.models.sasrec import SASRec, SASRecConfig


@dataclass
class SetModelConfig(ModelConfig):
    """``model.name: diffrec``: a model over whole per-user interaction sets, trained by its own
    job (recsys_dist/train/diffrec_job.py); its hyperparameters are the ``diffrec:`` section."""

    name: str = "diffrec"

    def build(self, max_len: int) -> SequenceRecommender:
        raise ValueError(f"model '{self.name}' is a set model: its job is recsys_dist/train/diffrec_job.py")


#: every model name and its config class
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    "diffurec": DiffuRecConfig,
    "sasrec": SASRecConfig,
    "gru4rec": GRU4RecConfig,
    "dreamrec": DreamRecConfig,
    "areal": AREALConfig,
    "dimerec": DimeRecConfig,
    "diffrec": SetModelConfig,
}

#: models over whole per-user interaction sets, trained by their own job (not SequenceRecommenders)
SET_MODELS: tuple[str, ...] = tuple(n for n, c in MODEL_CONFIGS.items() if issubclass(c, SetModelConfig))
#: models over item sequences (the SequenceRecommender contract, trained by train/trainer.py)
SEQUENCE_MODELS: tuple[str, ...] = tuple(n for n in MODEL_CONFIGS if n not in SET_MODELS)


def model_config(name: str = "diffurec", **fields) -> ModelConfig:
    """A fresh config of the model ``name`` (its defaults, then ``fields``)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(sorted(MODEL_CONFIGS))})")
    return MODEL_CONFIGS[name](**fields)


def build_model(cfg: ModelConfig, max_len: int) -> SequenceRecommender:
    """Instantiate the dense model ``cfg`` describes (``cfg.build``)."""
    if cfg.name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model '{cfg.name}' (known: {', '.join(sorted(MODEL_CONFIGS))})")
    if not isinstance(cfg, MODEL_CONFIGS[cfg.name]):
        raise ValueError(f"model.name={cfg.name!r} but the config is a {type(cfg).__name__}")
    return cfg.build(max_len)


__all__ = ["MODEL_CONFIGS", "SEQUENCE_MODELS", "SET_MODELS", "ModelConfig", "build_model", "model_config", "SequenceRecommender",
           "AREAL", "DiffuRec", "DimeRec", "DreamRec", "GRU4Rec", "SASRec"]
