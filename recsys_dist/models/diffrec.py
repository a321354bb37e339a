"""DiffRec, L-DiffRec, T-DiffRec and LT-DiffRec (Wang et al., SIGIR 2023, "Diffusion Recommender
Model"): a dense, single-process reference of the model math.

Unlike this package's sequence models, a DiffRec model sees a user's whole interaction vector
x_0 in {0, 1}^N (T-DiffRec: time-weighted values in [w_min, w_max]), diffuses it with a tiny
Gaussian noise and learns to recover it; the recovered x_0 scores every item. Placement onto
sharded item tables comes later: the only N-wide pieces are the denoiser's ``in_proj`` (N -> h)
and ``out_proj`` (h -> N, with bias) (DiffRec), or the cluster VAE's per-cluster encoders and its
decoder (L-DiffRec); everything else is small.

Everything here was written from a reading of the official code, YiyanXu/DiffRec @ d35a6c6
(file:line below refers to it); nothing is copied from it.

What the official code does, and this module does too:

- schedule (DiffRec/models/gaussian_diffusion.py:28-51, :301-307): ``linear-var``, the variance
  1 - alphabar_t = linspace(scale * min, scale * max, T); beta_1 fixed to 1e-5 in DiffRec/ and
  T-DiffRec/ (``beta_fixed`` True, :14, :30-31), not in L-DiffRec/ and LT-DiffRec/ (their
  gaussian_diffusion.py:14 defaults it to False). See ``recsys_dist.diffusion.schedules.diffrec_betas``.
- training (:122-174): t from the importance sampler below, x_t = q(x_t | x_0) (:125-127), the
  denoiser predicts x_0 (``mean_type`` "x0") or eps (:132-136); mse = mean over items (:140).
  ``reweight`` (:142-151): x0 -> weight SNR(t-1) - SNR(t) (SNR(t) = abar_t / (1 - abar_t),
  :277-282, float64), 1 at t = 0; eps -> weight (1 - abar_t) / ((1 - abar_{t-1})^2 (1 - beta_t)),
  1 at t = 0, and at t = 0 the loss is mean((x_0 - x0_hat)^2 / 2) instead of the mse. The loss of
  a sample is weight * loss / pt (:155, :173); the batch loss is their mean (main.py:167).
  With ``reweight`` off the official code fails (``loss`` is unbound at :155); here it is then
  the plain mse, weight 1. The official parser also turns any given value of ``--reweight``
  (``type=bool``, main.py:69) into True, so every official run reweights.
- timestep importance sampling (:157-199), on whatever ``reweight`` says (:124 always asks for
  'importance'): every t keeps its last ``history_num_per_term`` = 10 values of weight * loss
  (before the division by pt), appended per sample in batch order, oldest dropped when full
  (:158-171). While any t has fewer than 10, t ~ U{0..T-1} and pt = 1 (:178-179, :193-197);
  then p_t = sqrt(mean_k L_{t,k}^2) / sum_s sqrt(mean_k L_{s,k}^2), mixed with the uniform
  distribution, p_t <- (1 - 0.001) p_t + 0.001 / T (:181-184), t ~ p (with replacement, :188)
  and pt = p_t * T (:189).
- inference, ``p_sample`` (:93-120): x_T' = x_0 itself if T' = ``sampling_steps`` = 0, else
  q(x_{T'} | x_0) at index T' - 1 (:95-99); then *all* T reverse steps, t = T-1 .. 0 (:101,
  whatever T' is), each x_{t-1} = the posterior mean of q(x_{t-1} | x_t, x0_hat) (:212-232,
  :234-267), plus sqrt(posterior variance) * noise at t > 0 when ``sampling_noise`` (:112-117;
  its log-variance table clips index 0 to index 1's value, :81-83, unused because t = 0 adds
  no noise). At t = 0 the posterior mean is x0_hat itself (coefficients 1 and 0), so the scores
  are the denoiser's x_0 prediction at the end of the chain; the caller masks seen items
  (main.py:136-139).
- denoiser (DiffRec/models/DNN.py): the sinusoidal step embedding of width ``emb_size`` (:85-104,
  = ``recsys_dist.diffusion.timestep_embedding``) through Linear(emb, emb) without activation
  (:20, :67-68); x -> F.normalize(x) if ``norm`` (:69-70) -> Dropout(0.5) (:33, :71) ->
  concatenated with the embedding (:22-23, :72); then with ``dims`` = [d_1, .., d_k]
  (main.py:109-111: out_dims = dims + [N], in_dims = its reverse) the layers are
  N + emb -> d_k -> .. -> d_1 -> d_2 -> .. -> d_k -> N, tanh after each but the last (:73-80).
  Init (:36-64): weights N(0, 2 / (fan_in + fan_out)), biases N(0, 0.001^2). L-DiffRec's denoiser
  (L-DiffRec/models/DNN.py:12-74) is the same network with a choice of activation and
  xavier-normal weights with zero biases (:62, :96-112). Here the first layer is split, exactly:
  W [x, e] + b = ``in_proj``(x) + ``time_proj``(e) (``time_proj`` has no bias), both drawn with
  the fan-in of the concatenation, N + emb.
- L-DiffRec (L-DiffRec/models/Autoencoder.py, main.py): k-means on the item embeddings
  (Autoencoder.py:60, ``kmeans_pytorch``: Lloyd from k distinct random items, until the squared
  sum of the centres' shifts < 1e-4), one encoder per cluster over that cluster's columns, widths
  in proportion to the cluster size (int(n_c / N * d_j), at least 1; the last cluster takes the
  rest, :72-82), ending in 2 x latent (mu | logvar) *with* the activation after every layer, the
  last included (:83-94); Dropout(0.1) on x before the split (:24, :128); the latent is the
  concatenation of the clusters' mu (+ exp(logvar / 2) eps while training, :156-170); KL =
  -0.5 mean_b sum_d (1 + logvar - mu^2 - e^logvar) (:163). The decoder is one Linear(latent, N)
  over the whole latent when ``--out_dims`` is [] (every official recipe, :101-105), else one
  per cluster mirroring its encoder widths (:106-123; the values of ``--out_dims`` are unused
  there). The reconstruction loss is MultVAE's -mean_b sum_i x_i log softmax(recon)_i (:189-190)
  against the *dropped-out* x (Encode returns it, :146, :165). The diffusion runs on the latent
  (main.py:267-273): its x0_hat (``pred_xstart``, L-DiffRec/models/gaussian_diffusion.py:157-160)
  is decoded. Loss (main.py:275-290): lamda_e = max((1 - e / anneal_steps) lamda, anneal_cap)
  with e the number of *epochs* done (update_count, :299), the KL weight min(vae_anneal_cap,
  s / vae_anneal_steps) with s the number of *batches* done (:280-283, :292); loss = lamda_e
  elbo + vae_loss with ``reweight``, else elbo + lamda_e vae_loss. Two AdamW optimizers, lr1
  for the VAE, lr2 for the denoiser (main.py:149-171). Inference encodes without dropout or
  sampling (latent = mu), runs the chain on the latent, decodes (main.py:196-198).
- T-DiffRec (T-DiffRec/data_utils.py:36-47): a user's M train interactions, in the order they
  appear in train_list.npy, get weights ``linspace(w_min, w_max, M)``, i.e. w_m = w_min +
  (m - 1) / (M - 1) (w_max - w_min) (a single interaction gets w_min); the weighted vector is
  both the training x_0 and the inference input, while the masks use the 0/1 matrix
  (T-DiffRec/main.py:95). Defaults w_min 0.1, w_max 1.0 (main.py:54-55). LT-DiffRec = L-DiffRec
  on the weighted vectors (LT-DiffRec/main.py:108, :116).

Kept from this project rather than the official code: randomness is explicit
(``draw_noise`` / ``draw_eval_noise`` from a given generator, dropout aside), and the timestep
is drawn as a uniform u mapped through the inverse CDF of the current sampler distribution
(the official ``randint`` / ``multinomial`` draw the same distributions); the history update is
a separate ``update_history(t, loss)`` so a trainer can feed it the global batch; k-means is our
own (deterministic given its generator, empty clusters keep their centre, at most
``kmeans_max_iter`` iterations); the shared L-DiffRec decoder is indexed by original item ids
(the official one by the cluster-concatenated order; a permutation of the same layer), so
``decode`` returns N columns in the original order; ``noise_scale`` 0 (the official
no-diffusion ablation, :103-107, :128-129) is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys_dist.diffusion import GaussianDiffusion, NoiseSchedule, timestep_embedding
from recsys_dist.diffusion.schedules import diffrec_betas

VARIANTS = ("diffrec", "t-diffrec", "l-diffrec", "lt-diffrec")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


@dataclass
class DiffRecConfig:
    """Every knob of the DiffRec family. Defaults are the official main.py defaults of DiffRec/
    (denoiser, diffusion) and L-DiffRec/ (VAE, lamda); ``ml1m_clean`` gives the official ML-1M
    recipes of each folder's inference.py."""

    variant: str = "diffrec"  # diffrec | t-diffrec | l-diffrec | lt-diffrec
    # denoiser (DNN.py); L-DiffRec's --mlp_dims is ``dims`` too
    dims: tuple[int, ...] = (1000,)  # --dims: N -> d_k .. d_1 .. d_k -> N
    emb_size: int = 10  # --emb_size: timestep embedding width
    norm: bool = False  # --norm: L2-normalise x before the dropout
    dropout: float = 0.5  # DNN(dropout=0.5), on the denoiser's input
    act: str = "tanh"  # DiffRec: tanh (fixed); L-DiffRec --mlp_act_func
    # diffusion (gaussian_diffusion.py)
    mean_type: str = "x0"  # x0 | eps
    steps: int = 100  # T
    noise_schedule: str = "linear-var"  # linear-var | linear
    noise_scale: float = 0.1
    noise_min: float = 1e-4
    noise_max: float = 0.02
    beta_fixed: bool | None = None  # None: True for diffrec/t-diffrec, False for l-/lt-diffrec (official)
    reweight: bool = True
    timestep_sampling: str = "importance"  # importance (official, always) | uniform
    history_num_per_term: int = 10
    uniform_prob: float = 0.001
    sampling_steps: int = 0  # T': forward steps applied to the input at inference (0: none)
    sampling_noise: bool = False  # noise in the reverse steps at inference
    # T-DiffRec (data_utils.py)
    w_min: float = 0.1
    w_max: float = 1.0
    # L-DiffRec (Autoencoder.py, main.py)
    n_cate: int = 3  # clusters
    item_emb: str | None = None  # L-DiffRec clustering input: (num_items, d) .npy, row = raw item id (data dir relative)
    ae_dims: tuple[int, ...] = (300,)  # encoder widths from the input side, last = latent (official --in_dims reversed)
    ae_shared_decoder: bool = True  # official --out_dims [] : one Linear(latent, N)
    ae_act: str = "tanh"  # --act_func
    ae_dropout: float = 0.1
    reparam: bool = True
    lamda: float = 0.03
    anneal_cap: float = 0.005
    anneal_steps: int = 500  # in epochs
    vae_anneal_cap: float = 0.3
    vae_anneal_steps: int = 200  # in batches
    kmeans_tol: float = 1e-4
    kmeans_max_iter: int = 300
    # optimisation (the trainer's; AdamW in every folder)
    lr: float = 1e-4  # DiffRec --lr; L-DiffRec --lr2 (denoiser)
    weight_decay: float = 0.0
    ae_lr: float = 1e-4  # L-DiffRec --lr1
    ae_weight_decay: float = 0.0
    batch_size: int = 400

    def __post_init__(self) -> None:
        self.dims = tuple(int(d) for d in self.dims)
        self.ae_dims = tuple(int(d) for d in self.ae_dims)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown DiffRec variant '{self.variant}' (known: {VARIANTS})")
        if self.mean_type not in ("x0", "eps"):
            raise ValueError(f"mean_type must be x0 or eps, got '{self.mean_type}'")
        if self.timestep_sampling not in ("importance", "uniform"):
            raise ValueError(f"timestep_sampling must be importance or uniform, got '{self.timestep_sampling}'")
        if not self.dims or not self.ae_dims:
            raise ValueError("dims and ae_dims need at least one width")
        if self.act not in ACTIVATIONS or self.ae_act not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {sorted(ACTIVATIONS)}")
        if not 0 <= self.sampling_steps <= self.steps:
            raise ValueError(f"sampling_steps must be in [0, steps], got {self.sampling_steps}")

    @property
    def latent(self) -> bool:
        return self.variant in ("l-diffrec", "lt-diffrec")

    @property
    def temporal(self) -> bool:
        return self.variant in ("t-diffrec", "lt-diffrec")

    @property
    def betas_fixed(self) -> bool:
        return (not self.latent) if self.beta_fixed is None else self.beta_fixed

    @classmethod
    def ml1m_clean(cls, variant: str = "diffrec", **overrides) -> "DiffRecConfig":
        """The official ml-1m_clean recipe: DiffRec/inference.py:72-76, :139 (lr 1e-3, wd 0,
        bs 400, dims [200, 600], emb 10, x0, T 40, scale 0.005, min 0.005, max 0.01, T' 0,
        reweight); L-DiffRec/inference.py:78-82, :145 (lr1 1e-3, lr2 5e-4, 2 clusters, in [300],
        out [], lamda 0.03, mlp_dims [300], T 40, scale 0.005, min 0.005, max 0.02). T-DiffRec
        has no ML-1M recipe (T-DiffRec/inference.py:65-80): DiffRec's, with w 0.1 .. 1.0."""
        if variant in ("diffrec", "t-diffrec"):
            base = cls(variant=variant, lr=1e-3, weight_decay=0.0, batch_size=400, dims=(200, 600), emb_size=10,
                       mean_type="x0", steps=40, noise_scale=0.005, noise_min=0.005, noise_max=0.01,
                       sampling_steps=0, reweight=True)
        else:
            base = cls(variant=variant, ae_lr=1e-3, lr=5e-4, weight_decay=0.0, ae_weight_decay=0.0, batch_size=400,
                       n_cate=2, ae_dims=(300,), ae_shared_decoder=True, lamda=0.03, dims=(300,), emb_size=10,
                       mean_type="x0", steps=40, noise_scale=0.005, noise_min=0.005, noise_max=0.02,
                       sampling_steps=0, reweight=True)
        return replace(base, **overrides)


# ----------------------------------------------------------------------------------------- data


def temporal_weights(users: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """T-DiffRec's weight of every (user, item) row (T-DiffRec/data_utils.py:36-47): each user's
    rows, in the order they appear, get linspace(w_min, w_max, M_u); M_u = 1 gives w_min.
    ``users`` (n,) int64 -> (n,) float64."""
    users = torch.as_tensor(users, dtype=torch.long)
    n = users.numel()
    out = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return out
    order = torch.argsort(users, stable=True)  # keeps each user's rows in order of appearance
    su = users[order]
    _, counts = torch.unique_consecutive(su, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    m = torch.arange(n) - torch.repeat_interleave(starts, counts)  # 0-based position m - 1
    big_m = torch.repeat_interleave(counts, counts).to(torch.float64)
    frac = torch.where(big_m > 1, m.to(torch.float64) / (big_m - 1).clamp(min=1), torch.zeros_like(big_m))
    out[order] = w_min + frac * (w_max - w_min)
    return out


def interaction_matrix(pairs, n_users: int, n_items: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (n_users, n_items) float32 from [user, item] rows (DiffRec/data_utils.py:34-36);
    duplicate pairs add up, as scipy's csr_matrix does. ``weights``: T-DiffRec values per row."""
    pairs = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
    vals = torch.ones(pairs.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
    x = torch.zeros(n_users, n_items, dtype=torch.float64)
    x.index_put_((pairs[:, 0], pairs[:, 1]), vals, accumulate=True)
    return x.float()


# ------------------------------------------------------------------------------------ diffusion


class DiffRecDiffusion(nn.Module):
    """DiffRec's Gaussian diffusion: schedule tables, the loss-history importance sampler, the
    training terms and the reverse chain (DiffRec/models/gaussian_diffusion.py, see the module
    docstring). The history lives in buffers (checkpointed with the model)."""

    def __init__(self, cfg: DiffRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps = cfg.steps
        betas = diffrec_betas(cfg.steps, cfg.noise_scale, cfg.noise_min, cfg.noise_max,
                              kind=cfg.noise_schedule, beta_fixed=cfg.betas_fixed)
        schedule = NoiseSchedule(betas)
        self.gd = GaussianDiffusion(schedule)  # q_sample, posterior (float32 tables from float64)
        abar, abar_prev = schedule.alpha_bar, schedule.alpha_bar_prev
        self.register_buffer("betas64", betas, persistent=False)
        self.register_buffer("abar64", abar, persistent=False)
        self.register_buffer("abar_prev64", abar_prev, persistent=False)
        self.register_buffer("sqrt_recip_abar", (1.0 / abar).sqrt().float(), persistent=False)
        self.register_buffer("sqrt_recipm1_abar", (1.0 / abar - 1.0).sqrt().float(), persistent=False)
        self.register_buffer("Lt_history", torch.zeros(cfg.steps, cfg.history_num_per_term, dtype=torch.float64))
        self.register_buffer("Lt_count", torch.zeros(cfg.steps, dtype=torch.long))

    # --- schedule helpers
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t / (1 - abar_t), float64 (gaussian_diffusion.py:277-282)."""
        a = self.abar64[t]
        return a / (1.0 - a)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.gd.q_sample(x0, t, eps)

    def x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """gaussian_diffusion.py:270-275."""
        c1 = self.sqrt_recip_abar[t].view(-1, 1).to(xt.dtype)
        c2 = self.sqrt_recipm1_abar[t].view(-1, 1).to(xt.dtype)
        return c1 * xt - c2 * eps

    # --- importance sampler
    def timestep_probs(self) -> torch.Tensor | None:
        """p_t (T,) float64 of the importance sampler, or None while it still samples uniformly
        (some t has fewer than ``history_num_per_term`` losses; gaussian_diffusion.py:176-191)."""
        if self.cfg.timestep_sampling == "uniform" or not bool((self.Lt_count == self.cfg.history_num_per_term).all()):
            return None
        lt = torch.sqrt(torch.mean(self.Lt_history ** 2, dim=-1))
        p = lt / lt.sum()
        return p * (1.0 - self.cfg.uniform_prob) + self.cfg.uniform_prob / self.steps

    def sample_timesteps(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniforms u (B,) in [0, 1) -> (t (B,) long, pt (B,) float64) by the inverse CDF."""
        u = u.to(torch.float64)
        p = self.timestep_probs()
        if p is None:
            t = (u * self.steps).long().clamp_(0, self.steps - 1)
            return t, torch.ones_like(u)
        p = p.to(u.device)
        t = torch.searchsorted(torch.cumsum(p, 0), u, right=True).clamp_(0, self.steps - 1)
        return t, p[t] * self.steps

    @torch.no_grad()
    def update_history(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Append each sample's weight * loss to its t's history, in batch order, keeping the
        last ``history_num_per_term`` (gaussian_diffusion.py:157-171)."""
        k = self.cfg.history_num_per_term
        t = t.detach().to(self.Lt_count.device)
        loss = loss.detach().to(self.Lt_history.device, torch.float64)
        for s in torch.unique(t).tolist():
            new = loss[t == s]
            c = int(self.Lt_count[s])
            merged = torch.cat([self.Lt_history[s, :c], new])[-k:]
            self.Lt_history[s, : merged.numel()] = merged
            self.Lt_count[s] = merged.numel()

    # --- training
    def training_terms(self, denoise, x0: torch.Tensor, t_u: torch.Tensor, eps: torch.Tensor) -> dict:
        """One batch of gaussian_diffusion.py:122-174 without the history update:
        ``loss`` (B,) = weight * loss / pt, ``history`` (B,) = weight * loss (detached, for
        ``update_history``), ``t`` (B,), ``pred_x0`` (B, d)."""
        t, pt = self.sample_timesteps(t_u.to(x0.device))
        xt = self.q_sample(x0, t, eps)
        out = denoise(xt, t)
        if self.cfg.mean_type == "x0":
            target, pred_x0 = x0, out
        else:
            target, pred_x0 = eps, self.x0_from_eps(xt, t, out)
        mse = ((target - out) ** 2).mean(dim=1)
        likelihood = ((x0 - pred_x0) ** 2 / 2.0).mean(dim=1) if self.needs_likelihood else None
        loss, history = self.weigh(t, pt, mse, likelihood)
        return {"loss": loss, "history": history, "t": t, "pred_x0": pred_x0}

    @property
    def needs_likelihood(self) -> bool:
        """Whether ``weigh`` needs the t = 0 likelihood term (eps prediction with reweighting)."""
        return self.cfg.reweight and self.cfg.mean_type == "eps"

    def weigh(self, t: torch.Tensor, pt: torch.Tensor, mse: torch.Tensor,
              likelihood: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss from its mse over the N outputs (gaussian_diffusion.py:140-155):
        (weight * loss / pt, weight * loss detached). ``likelihood`` (B,): mean((x0 - x0_hat)^2 / 2),
        needed when ``needs_likelihood``. The sharded job computes mse and likelihood as sums of
        per-shard sums and calls this, so both paths weigh alike."""
        if self.cfg.reweight:
            if self.cfg.mean_type == "x0":
                w = self.snr((t - 1).clamp(min=0)) - self.snr(t)
                loss = mse
            else:
                if likelihood is None:
                    raise ValueError("eps prediction with reweight needs the likelihood term")
                b, ab, abp = self.betas64[t], self.abar64[t], self.abar_prev64[t]
                w = (1.0 - ab) / ((1.0 - abp).clamp(min=1e-300) ** 2 * (1.0 - b))
                loss = torch.where(t == 0, likelihood, mse)
            w = torch.where(t == 0, torch.ones_like(w), w)
        else:
            w, loss = torch.ones_like(pt), mse
        weighted = w.to(loss.dtype) * loss
        return weighted / pt.to(loss.dtype), weighted.detach()

    # --- inference
    def reverse(self, denoise, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """p_sample (gaussian_diffusion.py:93-120): from x (or q(x_{T'} | x) when T' > 0) run all
        T reverse steps with posterior means (+ noise when ``sampling_noise``)."""
        b, ts = x.shape[0], self.cfg.sampling_steps
        if ts > 0:
            t = torch.full((b,), ts - 1, dtype=torch.long, device=x.device)
            x = self.q_sample(x, t, noise["eps"].to(x))
        for i in reversed(range(self.steps)):
            t = torch.full((b,), i, dtype=torch.long, device=x.device)
            out = denoise(x, t)
            x0_hat = out if self.cfg.mean_type == "x0" else self.x0_from_eps(x, t, out)
            if self.cfg.sampling_noise:
                x = self.gd.p_step(x0_hat, x, t, noise["step_noise"][i].to(x))
            else:
                x, _ = self.gd.posterior(x0_hat, x, t)
        return x


# ------------------------------------------------------------------------------------- denoiser


def _xavier_(layer: nn.Linear, fan_in: int, fan_out: int, bias_std: float) -> None:
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        if layer.bias is not None:
            if bias_std > 0:
                layer.bias.normal_(0.0, bias_std)
            else:
                layer.bias.zero_()


class DenoiserCore(nn.Module):
    """Everything of DiffRec's MLP (DNN.py) except the two N-wide weight matrices: the step
    embedding, the first layer's bias, the hidden layers. ``forward(pre_x, t)``: ``pre_x`` (B, d_k)
    = the first layer's input weights applied to the (dropped-out) x, without bias -> the last
    hidden state h (B, d_k), to which the output layer (h -> N, with bias) is applied. The
    sharded job holds the N-wide matrices in the item table (``recsys_dist/sparse/wide.py``) and
    trains only this module under DeepSpeed."""

    def __init__(self, n_in: int, dims: tuple[int, ...], emb_size: int, act: str = "tanh",
                 bias_std: float = 0.001) -> None:
        super().__init__()
        self.emb_size = emb_size
        self.widths = list(dims[::-1]) + list(dims[1:])  # d_k .. d_1 d_2 .. d_k
        self.emb_layer = nn.Linear(emb_size, emb_size)
        self.time_proj = nn.Linear(emb_size, self.widths[0], bias=False)
        self.in_bias = nn.Parameter(torch.zeros(self.widths[0]))
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.act = ACTIVATIONS[act]()
        _xavier_(self.emb_layer, emb_size, emb_size, bias_std)
        _xavier_(self.time_proj, n_in + emb_size, self.widths[0], 0.0)
        with torch.no_grad():
            if bias_std > 0:
                self.in_bias.normal_(0.0, bias_std)
        for layer in self.hidden:
            _xavier_(layer, layer.in_features, layer.out_features, bias_std)

    @property
    def in_width(self) -> int:
        return self.widths[0]

    @property
    def out_width(self) -> int:
        return self.widths[-1]

    def time_part(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_proj(self.emb_layer(timestep_embedding(t, self.emb_size)))

    def forward(self, pre_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.act(pre_x + self.in_bias + self.time_part(t))
        for layer in self.hidden:
            h = self.act(layer(h))
        return h


def wide_init_stds(n_in: int, core: DenoiserCore, bias_std: float) -> tuple[float, float, float]:
    """Init standard deviations of the N-wide pieces: the input weights (fan-in n_in + emb, as
    the official first layer over [x, emb]), the output weights, the output bias."""
    return (math.sqrt(2.0 / (n_in + core.emb_size + core.in_width)),
            math.sqrt(2.0 / (core.out_width + n_in)), bias_std)


class Denoiser(nn.Module):
    """DiffRec's MLP (DNN.py), with the two N-wide layers separable:

    h = act(in_proj(drop(norm(x))) + b + time_proj(emb_layer(sinusoid(t)))), h = act(layer(h)) for
    each hidden layer, out = out_proj(h). ``in_proj``: Linear(n_in, d_k) without bias (the bias
    b is ``core.in_bias``); ``time_proj``: Linear(emb, d_k) without; together they are the
    official Linear(n_in + emb, d_k) on [x, emb], drawn with the fan-in of the concatenation.
    ``bias_std`` 0.001: DiffRec's init (DNN.py:36-64); 0: L-DiffRec's (xavier-normal, zero bias).
    ``drop_mask`` (B, n_in) of 0/1, optional: the dropout's keep mask, given explicitly (the
    sharded job draws it from a world-size-independent stream; a test feeds the same one here).
    """

    def __init__(self, n_in: int, dims: tuple[int, ...], emb_size: int, norm: bool = False, dropout: float = 0.5,
                 act: str = "tanh", bias_std: float = 0.001) -> None:
        super().__init__()
        self.n_in, self.emb_size, self.norm, self.p_drop = n_in, emb_size, norm, dropout
        self.core = DenoiserCore(n_in, dims, emb_size, act, bias_std)
        self.in_proj = nn.Linear(n_in, self.core.in_width, bias=False)
        self.out_proj = nn.Linear(self.core.out_width, n_in)
        self.drop = nn.Dropout(dropout)
        std_in, std_out, std_b = wide_init_stds(n_in, self.core, bias_std)
        with torch.no_grad():
            self.in_proj.weight.normal_(0.0, std_in)
            self.out_proj.weight.normal_(0.0, std_out)
            if std_b > 0:
                self.out_proj.bias.normal_(0.0, std_b)
            else:
                self.out_proj.bias.zero_()

    def input_part(self, x: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """in_proj(dropout(normalise(x))): the only piece that reads the N input columns."""
        if self.norm:
            x = F.normalize(x, dim=-1)
        if drop_mask is not None and self.training and self.p_drop > 0:
            x = x * drop_mask.to(x.dtype) / (1.0 - self.p_drop)
        else:
            x = self.drop(x)
        return self.in_proj(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.core(self.input_part(x, drop_mask), t))


# ------------------------------------------------------------------------------------ DiffRec


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
        return _eval_noise(self.cfg, batch_size, self.n_items, generator)

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
        latent = mu + torch.exp(0.5 * logvar) * z_eps.to(mu) if sample else mu
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return latent, kl

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


def _eval_noise(cfg: DiffRecConfig, batch_size: int, width: int, generator: torch.Generator) -> dict:
    out = {}
    if cfg.sampling_steps > 0:
        out["eps"] = torch.randn(batch_size, width, generator=generator)
    if cfg.sampling_noise:
        out["step_noise"] = torch.randn(cfg.steps, batch_size, width, generator=generator)
    return out


# ------------------------------------------------------------------------------------ L-DiffRec


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


def _mlp(widths: list[int], act: str, last_act: bool) -> nn.Sequential:
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), ACTIVATIONS[act]()]
    if not last_act:
        mods.pop()
    return nn.Sequential(*mods)


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


class ClusterVAE(nn.Module):
    """L-DiffRec's grouped VAE (L-DiffRec/models/Autoencoder.py, module docstring).

    ``cluster_ids`` (N,) long in [0, C). ``cluster_items[c]``: the items of cluster c in id order;
    together they cover every item exactly once. ``latent_dims[c]``: the width of cluster c's
    part of every layer (``latent_dims[c][-1]`` its latent size). ``encode`` -> (dropped-out x,
    latent (B, sum of latent sizes), mu, logvar, KL); ``decode`` (B, latent) -> (B, N) logits in
    the original item order."""

    def __init__(self, cluster_ids: torch.Tensor, ae_dims: tuple[int, ...], act: str = "tanh",
                 dropout: float = 0.1, shared_decoder: bool = True) -> None:
        super().__init__()
        cluster_ids = torch.as_tensor(cluster_ids, dtype=torch.long)
        n = cluster_ids.numel()
        c_num = int(cluster_ids.max()) + 1 if n else 0
        items = [torch.nonzero(cluster_ids == c).flatten() for c in range(c_num)]
        if any(i.numel() == 0 for i in items):
            raise ValueError("every cluster needs at least one item")
        self.n_items, self.n_clusters, self.shared_decoder = n, c_num, shared_decoder
        for c, idx in enumerate(items):
            self.register_buffer(f"items_{c}", idx, persistent=False)
        lat = cluster_widths([int(i.numel()) for i in items], ae_dims)
        self.latent_dims = lat
        self.latent_size = sum(ws[-1] for ws in lat)
        self.encoders = nn.ModuleList(
            _mlp([items[c].numel()] + lat[c][:-1] + [2 * lat[c][-1]], act, last_act=True) for c in range(c_num))
        if shared_decoder:
            self.decoder = nn.Linear(self.latent_size, n)  # row i = item i (original order)
        else:
            self.decoders = nn.ModuleList(
                _mlp(lat[c][::-1] + [items[c].numel()], act, last_act=False) for c in range(c_num))
        for m in self.modules():  # xavier_normal_initialization (Autoencoder.py:125, :193-205)
            if isinstance(m, nn.Linear):
                _xavier_(m, m.in_features, m.out_features, 0.0)
        self.drop = nn.Dropout(dropout)

    @property
    def cluster_items(self) -> list[torch.Tensor]:
        return [getattr(self, f"items_{c}") for c in range(self.n_clusters)]

    def encode(self, x: torch.Tensor, z_eps: torch.Tensor | None = None, sample: bool | None = None,
               drop_mask: torch.Tensor | None = None):
        """Autoencoder.py:127-170. ``sample`` (default: ``self.training``): latent = mu +
        exp(logvar / 2) z_eps, else mu. ``drop_mask`` (B, N) 0/1: the input dropout's keep mask,
        given explicitly (the sharded job's streams), else ``nn.Dropout``."""
        if drop_mask is not None and self.training and self.drop.p > 0:
            x = x * drop_mask.to(x.dtype) / (1.0 - self.drop.p)
        else:
            x = self.drop(x)
        mus, logvars = [], []
        for c, (idx, enc) in enumerate(zip(self.cluster_items, self.encoders)):
            h = enc(x[:, idx])
            w = self.latent_dims[c][-1]
            mus.append(h[:, :w])
            logvars.append(h[:, w:])
        mu, logvar = torch.cat(mus, dim=-1), torch.cat(logvars, dim=-1)
        if (self.training if sample is None else sample):
            latent = mu + torch.exp(0.5 * logvar) * z_eps.to(mu)
        else:
            latent = mu
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return x, latent, mu, logvar, kl

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder.py:172-187, columns in the original item order."""
        if self.shared_decoder:
            return self.decoder(z)
        out = z.new_empty(z.shape[0], self.n_items)
        start = 0
        for c, (idx, dec) in enumerate(zip(self.cluster_items, self.decoders)):
            w = self.latent_dims[c][-1]
            out[:, idx] = dec(z[:, start:start + w])
            start += w
        return out


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
            if cfg.n_cate == 1:
                cluster_ids = torch.zeros(n_items, dtype=torch.long)
            else:
                if item_emb is None:
                    raise ValueError("L-DiffRec needs item_emb (or cluster_ids)")
                item_emb = torch.as_tensor(np.asarray(item_emb))
                if item_emb.shape[0] != n_items:
                    raise ValueError(f"item_emb has {item_emb.shape[0]} rows, expected {n_items}")
                gen = kmeans_generator if kmeans_generator is not None else torch.Generator().manual_seed(0)
                cluster_ids, _ = kmeans(item_emb, cfg.n_cate, gen, cfg.kmeans_tol, cfg.kmeans_max_iter)
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
        return _eval_noise(self.cfg, batch_size, self.latent_size, generator)

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


__all__ = ["DiffRecConfig", "DiffRec", "DiffRecDense", "DenoiserCore", "LDiffRec", "LDiffRecDense", "cluster_widths", "ClusterVAE", "Denoiser", "DiffRecDiffusion", "build_diffrec",
           "kmeans", "temporal_weights", "interaction_matrix", "multinomial_loss", "make_optimizer", "train_step",
           "infer_scores", "VARIANTS"]
