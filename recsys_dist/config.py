"""Typed job configuration: dataclasses loaded from YAML, overridable from the command line.

A job config names one dataset x model. Every field has a default, a YAML file under
``configs/`` overrides some, and ``key.sub=value`` pairs on the command line override the
rest (``train.max_steps=100 model.dim=128``). Values from the command line are parsed as
YAML scalars, so ``eval.mask_history=true`` and ``data.max_users=null`` do what they say.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def stream_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed for one random stream, keyed by (job seed, purpose, index).

    Every consumer of randomness (table init blocks, per-step training noise, sampled
    negatives, per-user eval noise) has its own purpose, so no two streams ever coincide.
    """
    import hashlib
    digest = hashlib.blake2b(f"{seed}/{purpose}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def default_data_dir() -> str:
    """Where raw datasets live: ``$RECSYS_DATA_DIR`` or ``<repo>/../shared/datasets``."""
    return os.environ.get("RECSYS_DATA_DIR", str(REPO_ROOT.parent / "shared" / "datasets"))


@dataclass
class DataConfig:
    """Which dataset, where its shards live and how batches are read."""

    dataset: str = "ml-1m"
    data_dir: str | None = None  # raw data; None -> default_data_dir()
    shards_url: str | None = None  # fsspec URL of the shard folder; None -> shards_out/<dataset>
    build_if_missing: bool = True  # build shards from raw data when the manifest is absent
    max_len: int = 50  # history length fed to the encoders (most recent items)
    train_prefixes_per_user: int | None = None  # None: every prefix is a training sample
    max_users: int | None = None  # keep the first N users (small slices for tests)
    samples_per_shard: int = 20000
    compress: bool = True  # gzip shards (.tar.gz): ~20x smaller, streamed through fsspec
    assignment: str = "balanced"  # train shards -> readers: balanced | round_robin (see shards/reader.py)
    num_workers: int = 0  # DataLoader workers per rank
    # dataset "synthetic": the generator's catalog and users (python -m shards synth; defaults there)
    synth_items: int = 10_000_000
    synth_users: int = 20_000

    def resolved_shards_url(self) -> str:
        if self.shards_url:
            return self.shards_url
        suffix = "" if self.max_users is None else f"-u{self.max_users}"
        return str(REPO_ROOT / "shards_out" / f"{self.dataset}-L{self.max_len}{suffix}")


@dataclass
class ModelConfig:
    """Dense model: which builder and its hyperparameters."""

    name: str = "diffurec"  # diffurec | sasrec | gru4rec | dreamrec | areal | dimerec
    dim: int = 64  # embedding and hidden size
    num_blocks: int = 2
    num_heads: int = 2
    dropout: float = 0.1  # inside Transformer blocks
    emb_dropout: float = 0.3  # on item embeddings (DiffuRec paper: 0.3)
    # diffusion (DiffuRec)
    diffusion_steps: int = 32
    schedule: str = "trunc_linear"
    lambda_uncertainty: float = 0.001  # lambda ~ N(value, value) per history item
    # guided denoisers (DreamRec, AREAL, DimeRec)
    p_uncond: float = 0.1  # classifier-free guidance: probability of dropping the guidance
    guidance_w: float = 2.0  # guidance strength w at sampling: (1 + w) f(c) - w f(null)
    sample_steps: int = 20  # reverse steps at evaluation (DDIM when < diffusion_steps)
    eta: float = 0.0  # DDIM eta (0 = deterministic; 1 with sample_steps = T = DDPM)
    guidance_ce_weight: float = 0.0  # DreamRec/AREAL: + weight * CE(guidance c) over the catalog (0 = MSE only, the papers')
    rank_by: str = "generated"  # DreamRec/AREAL at eval: generated (x0 from reverse diffusion) | guidance (c; ablation)
    num_layers: int = 1  # GRU4Rec layers
    # AREAL (MCRL encoder): Table 3 ablations are these switches
    mcrl_use_cnn: bool = True  # multi-scale CNN branch (local features)
    mcrl_use_lstm: bool = True  # residual LSTM branch (global features)
    mcrl_local_weight: float = 0.3  # fusion weight of the local branch (global gets 1 - w); paper: 3:7
    # DimeRec (GEM + DAM)
    num_interests: int = 4  # K guidance vectors
    gem: str = "model"  # model (self-attentive multi-interest) | rule (last-K items)
    lambda_recon: float = 0.1  # weight of the reconstruction loss
    mu_ssm: float = 1.0  # weight of the sampled-softmax loss on the denoised embedding
    sphere: bool = True  # geodesic random walk on the unit sphere (False: Euclidean DDPM)


@dataclass
class SparseConfig:
    """The TorchRec item table: sharding and its fused (in-backward) optimizer."""

    sharding: str = "row_wise"  # row_wise | table_wise | column_wise
    optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | sgd
    lr: float = 0.05
    eps: float = 1e-8
    init_std: float = 0.02  # rows ~ N(0, init_std^2), row 0 (padding) = 0
    init_block_rows: int = 65536  # rows per init block of the world-size-independent stream


@dataclass
class TrainConfig:
    """Optimisation of the dense part under DeepSpeed, and the loop."""

    batch_size: int = 256  # per rank
    max_steps: int = 300
    optimizer: str = "adamw"  # dense optimizer: adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    zero_stage: int = 1
    grad_clip: float = 1.0  # dense parameters only (DeepSpeed)
    loss: str = "full_ce"  # full_ce | sampled_softmax
    num_negatives: int = 1024  # sampled_softmax: negatives shared by the global batch
    negative_sampler: str = "uniform"  # uniform | popularity ((count + 1) ** sampler_alpha), logQ-corrected
    sampler_alpha: float = 0.75
    in_batch_negatives: bool = False  # also the global batch's targets as negatives (logQ-corrected)
    eval_every: int = 0  # validate every N steps (0: only at the end)
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    collective_timeout_s: float = 600.0  # a collective waiting longer (a dead/hung rank) raises


@dataclass
class EvalConfig:
    """Full-catalog evaluation protocol."""

    ks: tuple[int, ...] = (5, 10, 20, 50)
    batch_size: int = 512  # users per rank per batch
    mask_history: bool = False  # remove already-seen items from the candidates
    seed: int = 2024  # diffusion sampling noise at eval (per user, world-size independent)
    select_metric: str = "NDCG@10"  # validation metric that selects the checkpoint
    val_max_users: int | None = None  # validate on a fixed subset (first N users) for speed
    item_chunk: int = 65536  # items scored per matmul chunk (bounds memory)
    test_max_users: int | None = None  # test on a fixed subset (first N users): huge catalogs on CPU


@dataclass
class CheckpointConfig:
    """Where and how often the full job state is saved; resume is automatic."""

    url: str | None = None  # any fsspec URL; default <output_dir>/<name>/checkpoints
    every: int = 0  # save every N steps (0: only at the end); also always at the end
    keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: bool = True  # start from the newest complete checkpoint under ``url`` if there is one
    verify: str = "sha256"  # sha256 | size: how checkpoint files are checked before loading
    enabled: bool = True  # False: no checkpoint files at all (tests, benchmarks)


@dataclass
class JobConfig:
    """One training job: dataset x model, plus where its outputs go."""

    name: str = "ml1m-diffurec"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(self.run_dir() / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Convert a YAML value to the type of the field's current value where obvious."""
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _apply(obj: Any, updates: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        if key not in names:
            raise KeyError(f"unknown config field '{where}{key}' (known: {sorted(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"config field '{where}{key}' is a section; got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, where + key))


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["train.max_steps=100", "model.dim=128"]`` into a nested dict."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override '{pair}' is not of the form key.sub=value")
        key, raw = pair.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return nested


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The YAML at ``path`` preceded by the files its ``base:`` list names (relative paths)."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config base cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    bases = data.pop("base", [])
    layers: list[dict[str, Any]] = []
    for base in [bases] if isinstance(bases, str) else bases:
        layers += _read_yaml(path.parent / base, seen + (path,))
    return layers + [data]


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Load a JobConfig from a YAML file (optional) and apply command-line overrides.

    A YAML file may start with ``base: [a.yaml, b.yaml]``: those are applied first, in order,
    then the file itself, then the overrides.
    """
    cfg = JobConfig()
    if path is not None:
        for layer in _read_yaml(Path(path)):
            _apply(cfg, layer, "")
    _apply(cfg, parse_overrides(overrides), "")
    return cfg


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from ``to_dict()`` output (e.g. stored in a checkpoint or metrics)."""
    cfg = JobConfig()
    _apply(cfg, data, "")
    return cfg


def stored_config_as_now(data: dict[str, Any]) -> dict[str, Any] | None:
    """A ``to_dict()`` stored by an earlier run, as this version would write it: fields added
    to ``JobConfig`` since count as their defaults (new fields default to the behaviour from
    before they existed). None when the stored config has a field since removed or retyped."""
    try:
        return config_from_dict(data).to_dict()
    except (KeyError, TypeError, ValueError):
        return None
