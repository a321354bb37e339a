"""The networks of the DiffRec family: the MLP denoiser (DiffRec/models/DNN.py), split so that
its two N-wide layers are separable (``Denoiser`` = ``in_proj`` (N -> d_k, no bias) +
``DenoiserCore`` + ``out_proj`` (d_k -> N)), and L-DiffRec's grouped VAE ``ClusterVAE``
(L-DiffRec/models/Autoencoder.py). Shapes: x (B, N) float32, t (B,) long; a ``drop_mask`` is
the input dropout's 0/1 keep mask (B, N), given explicitly by the sharded job."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys_dist.diffusion import timestep_embedding
from recsys_dist.models.diffrec.clustering import cluster_widths
from recsys_dist.models.diffrec.config import ACTIVATIONS


def masked_dropout(drop: nn.Dropout, x: torch.Tensor, drop_mask: torch.Tensor | None, training: bool) -> torch.Tensor:
    """``drop(x)``, or x * drop_mask / (1 - p) when an explicit keep mask is given while training."""
    if drop_mask is not None and training and drop.p > 0:
        return x * drop_mask.to(x.dtype) / (1.0 - drop.p)
    return drop(x)


def gaussian_latent(mu: torch.Tensor, logvar: torch.Tensor, z_eps: torch.Tensor | None,
                    sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, KL): latent = mu + exp(logvar / 2) z_eps if ``sample`` else mu; KL =
    -0.5 mean_b sum_d (1 + logvar - mu^2 - e^logvar) (Autoencoder.py:156-170)."""
    latent = mu + torch.exp(0.5 * logvar) * z_eps.to(mu) if sample else mu
    kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
    return latent, kl


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
        return self.in_proj(masked_dropout(self.drop, x, drop_mask, self.training))

    def forward(self, x: torch.Tensor, t: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.core(self.input_part(x, drop_mask), t))


# ------------------------------------------------------------------------------------ the VAE


def _mlp(widths: list[int], act: str, last_act: bool) -> nn.Sequential:
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), ACTIVATIONS[act]()]
    if not last_act:
        mods.pop()
    return nn.Sequential(*mods)


class ClusterVAE(nn.Module):
    """L-DiffRec's grouped VAE (L-DiffRec/models/Autoencoder.py; docs/diffrec.md).

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
        x = masked_dropout(self.drop, x, drop_mask, self.training)
        mus, logvars = [], []
        for c, (idx, enc) in enumerate(zip(self.cluster_items, self.encoders)):
            h = enc(x[:, idx])
            w = self.latent_dims[c][-1]
            mus.append(h[:, :w])
            logvars.append(h[:, w:])
        mu, logvar = torch.cat(mus, dim=-1), torch.cat(logvars, dim=-1)
        latent, kl = gaussian_latent(mu, logvar, z_eps, self.training if sample is None else sample)
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
