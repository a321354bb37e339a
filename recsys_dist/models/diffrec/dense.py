"""The dense parts the sharded job (``recsys_dist/train/diffrec_job.py``) trains under
DeepSpeed: every parameter but the N-wide weights, which live in the item table
(``recsys_dist/sparse/wide.py``). ``DiffRecDense.forward(pre_x (B, d_k), t (B,)) -> h (B, d_k)``;
``LDiffRecDense.forward(pre_enc (b, 2 L), t_u, eps, z_eps) -> training terms + KL``. Same
math, init and parameter order as the dense reference (``reference.py``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from recsys_dist.models.diffrec.clustering import cluster_widths
from recsys_dist.models.diffrec.config import ACTIVATIONS, DiffRecConfig
from recsys_dist.models.diffrec.diffusion import DiffRecDiffusion
from recsys_dist.models.diffrec.networks import Denoiser, DenoiserCore, gaussian_latent, wide_init_stds


class DiffRecDense(nn.Module):
    """DiffRec / T-DiffRec without the N-wide weights: the diffusion (schedule, importance
    sampler history) and the denoiser's :class:`DenoiserCore`. The sharded job
    (``recsys_dist/train/diffrec_job.py``) trains this under DeepSpeed and holds the N-wide
    layers in the item table (``recsys_dist/sparse/wide.py``); ``forward(pre_x, t)`` -> h."""

    def __init__(self, cfg: DiffRecConfig, n_items: int) -> None:
        super().__init__()
        if cfg.latent:
            raise ValueError("the sharded DiffRec job covers diffrec / t-diffrec (L-DiffRec: the dense reference)")
        self.cfg, self.n_items = cfg, n_items
        self.diffusion = DiffRecDiffusion(cfg)
        self.core = DenoiserCore(n_items, cfg.dims, cfg.emb_size, cfg.act, bias_std=0.001)

    def wide_init_stds(self) -> tuple[float, float, float]:
        return wide_init_stds(self.n_items, self.core, 0.001)

    def forward(self, pre_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.core(pre_x, t)


class LDiffRecDense(nn.Module):
    """L-DiffRec / LT-DiffRec without its N-wide weights, for the sharded job: the cluster
    encoders' biases and activation, the diffusion (and its sampler history) and the latent
    denoiser. The official ML-1M recipe's VAE only: one encoder layer per cluster (n_c -> 2 lat_c,
    activation after it) and the shared decoder Linear(latent, N), whose weights are item-table
    rows (``recsys_dist/sparse/wide.py``). ``pre_enc`` (b, 2 * latent): the encoders' input
    products without bias, cluster by cluster ``[mu_c | logvar_c]`` (2 lat_c each)."""

    def __init__(self, cfg: DiffRecConfig, cluster_sizes: list[int]) -> None:
        super().__init__()
        if not cfg.latent:
            raise ValueError("LDiffRecDense is for l-diffrec / lt-diffrec")
        if len(cfg.ae_dims) != 1 or not cfg.ae_shared_decoder:
            raise ValueError("the sharded L-DiffRec job has one encoder layer per cluster (diffrec.ae_dims of one "
                             "width) and the shared decoder (diffrec.ae_shared_decoder: true), the official recipes")
        self.cfg, self.cluster_sizes = cfg, list(cluster_sizes)
        self.latent_dims = [w[-1] for w in cluster_widths(self.cluster_sizes, cfg.ae_dims)]
        self.latent_size = sum(self.latent_dims)
        self.n_items = sum(self.cluster_sizes)
        self.enc_bias = nn.Parameter(torch.zeros(2 * self.latent_size))  # xavier init: zero biases
        self.ae_act = ACTIVATIONS[cfg.ae_act]()
        self.diffusion = DiffRecDiffusion(cfg)
        self.denoiser = Denoiser(self.latent_size, cfg.dims, cfg.emb_size, cfg.norm, cfg.dropout, cfg.act,
                                 bias_std=0.0)

    #: learning rate of the VAE's dense parameters (the encoders' biases); the job sets it to the
    #: item table's (sparse.lr), which trains the VAE's N-wide weights: the official lr1
    vae_lr: float | None = None

    def dense_param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the VAE's biases at ``vae_lr`` (default ``lr``), the denoiser and the
        rest at ``lr`` (the official lr2), as L-DiffRec's two AdamW optimizers (main.py:149-171)."""
        vae = [self.enc_bias]
        rest = [p for n, p in self.named_parameters() if n != "enc_bias"]
        return [{"params": vae, "lr": self.vae_lr if self.vae_lr is not None else lr}, {"params": rest, "lr": lr}]

    def init_stds(self) -> tuple[list[float], float]:
        """Xavier-normal stds of each cluster's encoder (fan n_c + 2 lat_c) and of the decoder."""
        enc = [math.sqrt(2.0 / (n + 2 * w)) for n, w in zip(self.cluster_sizes, self.latent_dims)]
        return enc, math.sqrt(2.0 / (self.latent_size + self.n_items))

    def encode(self, pre_enc: torch.Tensor, z_eps: torch.Tensor | None, sample: bool):
        """-> latent (b, L), KL (mean over the b users), as ``ClusterVAE.encode``."""
        h = self.ae_act(pre_enc + self.enc_bias)
        mus, logvars, start = [], [], 0
        for w in self.latent_dims:
            mus.append(h[:, start:start + w])
            logvars.append(h[:, start + w:start + 2 * w])
            start += 2 * w
        mu, logvar = torch.cat(mus, dim=-1), torch.cat(logvars, dim=-1)
        return gaussian_latent(mu, logvar, z_eps, sample)

    def forward(self, pre_enc: torch.Tensor, t_u: torch.Tensor, eps: torch.Tensor, z_eps: torch.Tensor,
                drop_mask: torch.Tensor | None = None) -> dict:
        """One training forward of this rank's users: the diffusion terms on the latent (as
        ``LDiffRec.loss_terms``) and the KL."""
        latent, kl = self.encode(pre_enc, z_eps if self.cfg.reparam else None, self.training and self.cfg.reparam)
        terms = self.diffusion.training_terms(lambda x, t: self.denoiser(x, t, drop_mask), latent, t_u, eps.to(latent))
        return {**terms, "kl": kl}

    @torch.no_grad()
    def infer_latent(self, pre_enc: torch.Tensor) -> torch.Tensor:
        """Encode without sampling (latent = mu) and run the reverse chain on the latent."""
        latent, _ = self.encode(pre_enc, None, False)
        return self.diffusion.reverse(self.denoiser, latent, {})
