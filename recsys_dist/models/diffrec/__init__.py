"""DiffRec, L-DiffRec, T-DiffRec and LT-DiffRec (Wang et al., SIGIR 2023, "Diffusion Recommender
Model"): the dense single-process reference of the model math, and the dense parts the sharded
job trains. Written from a reading of YiyanXu/DiffRec @ d35a6c6 (the file:line references in
this package are to it); nothing is copied from it. What the official code does and where this
package departs from it: docs/diffrec.md.

Contract: a model sees a user's whole interaction vector x_0 (B, N) float32, 0/1 (T-DiffRec:
temporal weights in [w_min, w_max]), diffuses it with a tiny Gaussian noise and learns to
recover it; the recovered x_0 scores every item, (B, N) (the caller masks seen items). The only
N-wide pieces are the denoiser's ``in_proj`` / ``out_proj`` (DiffRec) or the cluster VAE's
encoders and decoder (L-DiffRec); the sharded job holds those in the item table.

Modules: ``config`` (``DiffRecConfig``), ``data`` (x_0 rows, temporal weights), ``diffusion``
(schedule, importance sampler, training terms, reverse chain), ``clustering`` (k-means, cluster
widths), ``networks`` (denoiser, VAE), ``losses`` (L-DiffRec's weights), ``dense`` (the sharded
job's parts), ``reference`` (the single-process models and trainer).
"""

from recsys_dist.models.diffrec.config import ACTIVATIONS, VARIANTS, DiffRecConfig
from recsys_dist.models.diffrec.data import interaction_matrix, temporal_weights
from recsys_dist.models.diffrec.diffusion import DiffRecDiffusion, eval_noise
from recsys_dist.models.diffrec.clustering import cluster_widths, item_clusters, kmeans
from recsys_dist.models.diffrec.networks import (ClusterVAE, Denoiser, DenoiserCore, gaussian_latent, masked_dropout,
                                                 wide_init_stds)
from recsys_dist.models.diffrec.losses import combine_ldiffrec_loss, kl_weight_at, lamda_at, multinomial_loss
from recsys_dist.models.diffrec.dense import DiffRecDense, LDiffRecDense
from recsys_dist.models.diffrec.reference import (DiffRec, LDiffRec, build_diffrec, infer_scores, make_optimizer,
                                                  train_step)

__all__ = ["DiffRecConfig", "VARIANTS", "ACTIVATIONS", "interaction_matrix", "temporal_weights", "DiffRecDiffusion",
           "eval_noise", "kmeans", "item_clusters", "cluster_widths", "Denoiser", "DenoiserCore", "wide_init_stds",
           "ClusterVAE", "masked_dropout", "gaussian_latent", "multinomial_loss", "lamda_at", "kl_weight_at",
           "combine_ldiffrec_loss", "DiffRecDense", "LDiffRecDense", "DiffRec", "LDiffRec", "build_diffrec",
           "make_optimizer", "train_step", "infer_scores"]
