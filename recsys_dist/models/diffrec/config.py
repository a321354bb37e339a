"""``DiffRecConfig``: every knob of the DiffRec family, validated on construction.

Guarantees after ``__post_init__``: ``variant`` in ``VARIANTS``, ``dims`` / ``ae_dims`` non-empty
int tuples, ``act`` / ``ae_act`` keys of ``ACTIVATIONS``, ``mean_type`` x0 | eps,
``timestep_sampling`` importance | uniform, 0 <= ``sampling_steps`` <= ``steps``. Units:
``anneal_steps`` in epochs, ``vae_anneal_steps`` in batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

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

