"""The dense single-process reference models: ``DiffRec`` (DiffRec, T-DiffRec: x_0 rows (B, N)
of 0/1 or temporal weights) and ``LDiffRec`` (L-DiffRec, LT-DiffRec: the cluster VAE with the
diffusion on its latent), ``build_diffrec``, and a plain trainer (``make_optimizer``,
``train_step``, ``infer_scores``). Randomness is explicit: ``draw_noise`` / ``draw_eval_noise``
from a given generator (dropout aside). ``infer`` -> (B, N) scores; the caller masks seen items.
The sharded job must match these on the same global batches (``tests/test_diffrec_sharded.py``)."""

from __future__ import annotations

import torch
from torch import nn

from recsys_dist.models.diffrec.clustering import item_clusters
from recsys_dist.models.diffrec.config import DiffRecConfig
from recsys_dist.models.diffrec.diffusion import DiffRecDiffusion, eval_noise
from recsys_dist.models.diffrec.losses import combine_ldiffrec_loss, kl_weight_at, lamda_at, multinomial_loss
from recsys_dist.models.diffrec.networks import ClusterVAE, Denoiser


class DiffRec(nn.Module):
    """DiffRec and T-DiffRec (the same model; T-DiffRec's x_0 are ``temporal_weights`` values).

    ``loss(x0, noise)`` is one training step's scalar loss for a batch of x_0 rows (B, N) and
    updates the sampler's loss history; ``infer(x, noise)`` -> (B, N) scores (the caller masks
    seen items). Call ``eval()`` before ``infer`` (the denoiser's dropout)."""

    def __init__(self, cfg: DiffRecConfig, n_items: int) -> None:
        super().__init__()
        if cfg.latent:
            raise ValueError("use LDiffRec for l-diffrec / lt-diffrec")
        self.cfg, self.n_items = cfg, n_items
        self.diffusion = DiffRecDiffusion(cfg)
        self.denoiser = Denoiser(n_items, cfg.dims, cfg.emb_size, cfg.norm, cfg.dropout, cfg.act, bias_std=0.001)

    def draw_noise(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``t_u`` (B,) float64 uniforms for the timestep, ``eps`` (B, N) for q(x_t | x_0)."""
        return {"t_u": torch.rand(batch_size, generator=generator, dtype=torch.float64),
                "eps": torch.randn(batch_size, self.n_items, generator=generator)}

    def draw_eval_noise(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``eps`` (B, N) when sampling_steps > 0; ``step_noise`` (T, B, N) when sampling_noise."""
        return eval_noise(self.cfg, batch_size, self.n_items, generator)

    def loss_terms(self, x0: torch.Tensor, noise: dict[str, torch.Tensor]) -> dict:
        """``noise``: ``t_u``, ``eps`` and optionally ``drop_mask`` (B, N), the input dropout's keep mask."""
        mask = noise.get("drop_mask")
        return self.diffusion.training_terms(lambda x, t: self.denoiser(x, t, mask), x0, noise["t_u"],
                                             noise["eps"].to(x0))

    def loss(self, x0: torch.Tensor, noise: dict[str, torch.Tensor], update_history: bool = True, **_) -> torch.Tensor:
        terms = self.loss_terms(x0, noise)
        if update_history:
            self.diffusion.update_history(terms["t"], terms["history"])
        return terms["loss"].mean()

    def infer(self, x: torch.Tensor, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.diffusion.reverse(self.denoiser, x, noise or {})

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]


class LDiffRec(nn.Module):
    """L-DiffRec and LT-DiffRec: the cluster VAE, and DiffRec's diffusion on its latent.

    ``item_emb`` (N, d) clusters the items (k-means with ``kmeans_generator``); pass
    ``cluster_ids`` instead to skip it. ``loss(x0, noise, epoch, step)``: ``epoch`` = epochs done
    (lamda's annealing), ``step`` = batches done (the KL weight's)."""

    def __init__(self, cfg: DiffRecConfig, n_items: int, item_emb: torch.Tensor | None = None,
                 cluster_ids: torch.Tensor | None = None, kmeans_generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not cfg.latent:
            raise ValueError("use DiffRec for diffrec / t-diffrec")
        self.cfg, self.n_items = cfg, n_items
        if cluster_ids is None:
            cluster_ids = item_clusters(cfg, n_items, item_emb, kmeans_generator)
        self.vae = ClusterVAE(cluster_ids, cfg.ae_dims, cfg.ae_act, cfg.ae_dropout, cfg.ae_shared_decoder)
        self.latent_size = self.vae.latent_size
        self.diffusion = DiffRecDiffusion(cfg)
        self.denoiser = Denoiser(self.latent_size, cfg.dims, cfg.emb_size, cfg.norm, cfg.dropout, cfg.act,
                                 bias_std=0.0)

    def draw_noise(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``t_u`` (B,), ``eps`` (B, latent) for the diffusion, ``z_eps`` (B, latent) for the VAE."""
        return {"t_u": torch.rand(batch_size, generator=generator, dtype=torch.float64),
                "eps": torch.randn(batch_size, self.latent_size, generator=generator),
                "z_eps": torch.randn(batch_size, self.latent_size, generator=generator)}

    def draw_eval_noise(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return eval_noise(self.cfg, batch_size, self.latent_size, generator)

    def lamda_at(self, epoch: int) -> float:
        return lamda_at(self.cfg, epoch)

    def kl_weight_at(self, step: int) -> float:
        return kl_weight_at(self.cfg, step)

    def loss_terms(self, x0: torch.Tensor, noise: dict[str, torch.Tensor], epoch: int = 0, step: int = 0) -> dict:
        """``noise``: ``t_u``, ``eps``, ``z_eps``, and optionally the keep masks ``x_drop_mask``
        (B, N) of the VAE's input dropout and ``drop_mask`` (B, latent) of the denoiser's."""
        x_drop, latent, _, _, kl = self.vae.encode(x0, noise["z_eps"] if self.cfg.reparam else None,
                                                   sample=self.training and self.cfg.reparam,
                                                   drop_mask=noise.get("x_drop_mask"))
        mask = noise.get("drop_mask")
        terms = self.diffusion.training_terms(lambda x, t: self.denoiser(x, t, mask), latent, noise["t_u"],
                                              noise["eps"].to(latent))
        elbo = terms["loss"].mean()
        recon = self.vae.decode(terms["pred_x0"])
        vae_loss = multinomial_loss(recon, x_drop) + self.kl_weight_at(step) * kl
        loss = combine_ldiffrec_loss(self.cfg, elbo, vae_loss, epoch)
        return {**terms, "elbo": elbo, "vae_loss": vae_loss, "kl": kl, "total": loss}

    def loss(self, x0: torch.Tensor, noise: dict[str, torch.Tensor], epoch: int = 0, step: int = 0,
             update_history: bool = True) -> torch.Tensor:
        terms = self.loss_terms(x0, noise, epoch, step)
        if update_history:
            self.diffusion.update_history(terms["t"], terms["history"])
        return terms["total"]

    def infer(self, x: torch.Tensor, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        _, z, _, _, _ = self.vae.encode(x, sample=False)
        return self.vae.decode(self.diffusion.reverse(self.denoiser, z, noise or {}))

    def param_groups(self) -> list[dict]:
        """AdamW groups: lr1 / wd1 for the VAE, lr2 / wd2 for the denoiser (main.py:149-171)."""
        return [{"params": list(self.vae.parameters()), "lr": self.cfg.ae_lr, "weight_decay": self.cfg.ae_weight_decay},
                {"params": list(self.denoiser.parameters()), "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]


# ---------------------------------------------------------------------------------- entry points


def build_diffrec(cfg: DiffRecConfig, n_items: int, item_emb=None, cluster_ids=None,
                  kmeans_generator: torch.Generator | None = None) -> nn.Module:
    """DiffRec (diffrec, t-diffrec) or LDiffRec (l-diffrec, lt-diffrec) for ``n_items`` items."""
    if cfg.latent:
        return LDiffRec(cfg, n_items, item_emb, cluster_ids, kmeans_generator)
    return DiffRec(cfg, n_items)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with the official learning rates (one group per official optimizer)."""
    return torch.optim.AdamW(model.param_groups())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor, generator: torch.Generator,
               epoch: int = 0, step: int = 0) -> float:
    """One single-process step on a batch of x_0 rows (B, N): draw the noise, loss (updates the
    sampler history), backward, optimizer step. Returns the loss."""
    model.train()
    noise = model.draw_noise(x0.shape[0], generator)
    noise = {k: v.to(x0.device) for k, v in noise.items()}
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(x0, noise, epoch=epoch, step=step)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def infer_scores(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None,
                 batch_size: int = 1024) -> torch.Tensor:
    """(U, N) scores for rows x (U, N), in batches, in eval mode (the caller masks seen items)."""
    model.eval()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        noise = {k: v.to(xb.device) for k, v in model.draw_eval_noise(xb.shape[0], gen).items()}
        out.append(model.infer(xb, noise))
    return torch.cat(out)
