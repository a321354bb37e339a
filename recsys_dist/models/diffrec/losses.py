"""The losses of L-DiffRec (L-DiffRec/main.py:275-299, Autoencoder.py:189-190): the VAE's
multinomial reconstruction loss, the annealed weights (``lamda_at``: per *epoch* done;
``kl_weight_at``: per *batch* done) and their combination with the diffusion ELBO. Shared by
the dense reference and the sharded job, so both weigh alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_dist.models.diffrec.config import DiffRecConfig


def multinomial_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-mean_b sum_i x_i log softmax(logits)_i (MultVAE; Autoencoder.py:189-190)."""
    return -torch.mean(torch.sum(F.log_softmax(logits, dim=1) * x, dim=-1))



def lamda_at(c: DiffRecConfig, epoch: int) -> float:
    """L-DiffRec's weight of the diffusion loss after ``epoch`` epochs (main.py:275-299)."""
    if c.anneal_steps > 0:
        return max((1.0 - epoch / c.anneal_steps) * c.lamda, c.anneal_cap)
    return max(c.lamda, c.anneal_cap)


def kl_weight_at(c: DiffRecConfig, step: int) -> float:
    """The KL weight after ``step`` batches (main.py:280-283)."""
    return min(c.vae_anneal_cap, 1.0 * step / c.vae_anneal_steps) if c.vae_anneal_steps > 0 else c.vae_anneal_cap


def combine_ldiffrec_loss(c: DiffRecConfig, elbo: torch.Tensor, vae_loss: torch.Tensor, epoch: int) -> torch.Tensor:
    """lamda_e elbo + vae_loss with reweighting, else elbo + lamda_e vae_loss (main.py:284-290)."""
    lamda = lamda_at(c, epoch)
    return lamda * elbo + vae_loss if c.reweight else elbo + lamda * vae_loss

