"""The DeepSpeed engine for the dense part.

Only the dense module goes to ``deepspeed.initialize``; the TorchRec table stays a separate
object (DeepSpeed broadcasts the parameters it is given from rank 0, which would overwrite
every other rank's table shard with rank 0's rows). The replicated table
(``sparse.sharding=data_parallel``) stays outside too: TorchRec's DDP already averages its
gradient over ranks, and its own optimizer steps it (``ShardedItemTable.step_optimizer``), so
DeepSpeed's gradient clipping and bf16 cover the dense parameters only, as for a sharded table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recsys_dist.config import TrainConfig
from recsys_dist.train.report import known_prints_dropped


def deepspeed_config(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """ZeRO stage from config; bf16 on GPU, fp32 on CPU; clipping covers dense params only."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,  # the table updates every batch (fused, or step_optimizer)
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch SGD under ZeRO 1/2 (tested here)
        "bf16": {"enabled": device.type == "cuda"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """Wrap the dense model: returns a DeepSpeedEngine (data-parallel, ZeRO 1/2)."""
    import os

    # name the accelerator instead of letting DeepSpeed probe for one (and log that it fell back)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed  # heavy import, kept local

    model.to(device)
    # a model may split its parameters into groups with their own learning rates (L-DiffRec: the
    # VAE's and the denoiser's, as its two official optimizers); default: one group at train.lr
    params = model.dense_param_groups(cfg.lr) if hasattr(model, "dense_param_groups") else model.parameters()
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown dense optimizer '{cfg.optimizer}' (adamw | sgd)")
    with known_prints_dropped():  # DeepSpeed's per-process "shm comm op built successfully"
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, device),
                                               dist_init_required=False)
    return engine
