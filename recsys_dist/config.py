"""Typed job configuration: dataclasses loaded from YAML, overridable from the command line.

A job config names one dataset x model. Every field has a default, a YAML file under
``configs/`` overrides some, and ``key.sub=value`` pairs on the command line override the
rest (``train.max_steps=100 model.dim=128``). Values from the command line are parsed as
YAML scalars, so ``eval.mask_history=true`` and ``data.source.max_users=null`` do what they say.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from recsys_dist.models import MODEL_CONFIGS, ModelConfig, model_config
from recsys_dist.models.diffrec import DiffRecConfig
from shards.source import SourceConfig

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


ML1M_SOURCE: dict[str, Any] = dict(path="ml-1m/raw/diffurec/interactions.tsv.gz", user="raw_user_id",
                                   item="raw_item_id", time="pos", time_is_position=True,
                                   protocol="leave_one_out", min_user_count=5, min_item_count=5)


@dataclass
class DataConfig:
    """Which dataset, where its raw data and shards live and how batches are read."""

    dataset: str = "ml-1m"  # a name (shard folder, logs); "synthetic" = the generator (synth_* below)
    # how to read the raw data (shards/source.py); the default is the embedded default dataset's
    # (ML-1M, as configs/datasets/ml1m.yaml); every other dataset is a YAML file
    source: SourceConfig = field(default_factory=lambda: SourceConfig(**ML1M_SOURCE))
    data_dir: str | None = None  # where relative source paths resolve; None -> default_data_dir()
    shards_url: str | None = None  # fsspec URL of the shard folder; None -> shards_out/<dataset>...
    build_if_missing: bool = True  # build shards from the source when the manifest is absent
    max_len: int = 50  # history length fed to the encoders (most recent items); read time, not in the shards
    train_prefixes_per_user: int | None = None  # None: every prefix is a training sample; K: the last K
    records_per_block: int = 1000  # users (sessions) per checksummed block of the shards
    blocks_per_shard: int = 4
    compress: bool = False  # gzip shards (.tar.gz)
    window_blocks: int = 8  # training shuffle: blocks whose samples are permuted together
    num_workers: int = 0  # DataLoader workers per rank
    # dataset "synthetic": the generator's catalog and users (python -m shards synth; defaults there)
    synth_items: int = 10_000_000
    synth_users: int = 20_000

    def resolved_shards_url(self) -> str:
        if self.shards_url:
            return self.shards_url
        suffix = "" if self.train_prefixes_per_user is None else f"-p{self.train_prefixes_per_user}"
        suffix += "" if self.source.max_users is None else f"-u{self.source.max_users}"
        return str(REPO_ROOT / "shards_out" / f"{self.dataset}-v2{suffix}")


@dataclass
class SparseConfig:
    """The TorchRec item table: sharding and its fused (in-backward) optimizer."""

    sharding: str = "row_wise"  # row_wise | table_wise | column_wise | data_parallel (replicated, dense kernel: small catalogs)
    optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | sgd | adamw (adamw: data_parallel only)
    betas: tuple[float, float] = (0.9, 0.999)  # adamw (data_parallel)
    weight_decay: float = 0.0  # adamw's decoupled weight decay (data_parallel); must be 0 otherwise
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
    max_epochs: int = 0  # > 0: run this many epochs of the train split (train.max_steps is then ignored)
    eval_every_epochs: int = 0  # > 0: validate every N epochs (overrides train.eval_every)
    patience: int = 0  # > 0: early stop after N validations without a better eval.select_metric
    objective: str = "last"  # last (the sample's target) | all_positions (causal models: every position's next item)
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    collective_timeout_s: float = 600.0  # a collective waiting longer (a dead/hung rank) raises


@dataclass
class EvalConfig:
    """Full-catalog evaluation protocol."""

    ks: tuple[int, ...] = (5, 10, 20, 50)
    batch_size: int = 512  # users per rank per batch
    mask_history: bool = False  # remove the user's whole seen set (train + earlier items) from the candidates
    # what mask_history removes: seen (the whole seen set before the target) | input (only the
    # items of the model's input window, the last data.max_len: HSTU's repo, eval.py)
    mask_scope: typing.Literal["seen", "input"] = "seen"
    ties: str = "expected"  # expected (random order of tied items, averaged exactly) | optimistic | pessimistic
    seed: int = 2024  # diffusion sampling noise at eval (per user, world-size independent)
    test_seeds: int = 3  # generative models: test metrics are mean/std over this many eval-noise seeds
    # generator (default: a torch.Generator per user) | counter (batched counter-based streams,
    # recsys_dist/noise.py: faster per user once its kernel is compiled, which costs 40-150 s a
    # process and needs a C++ compiler; for evaluations of very many users)
    noise: str = "generator"
    select_metric: str = "NDCG@10"  # validation metric that selects the checkpoint
    val_max_users: int | None = None  # validate on a fixed, seeded random subset of N users for speed
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
    # the selected (best validation) state is also copied in memory while each rank's table rows
    # are at most this many GiB (restoring from memory is faster); above it, and at 0, the test
    # reloads it from the checkpoint's best/ copy, so a large table is never held twice
    best_in_memory_max_gib: float = 1.0


@dataclass
class JobConfig:
    """One training job: dataset x model, plus where its outputs go."""

    name: str = "ml1m-diffurec"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    # the named model's own config (its dataclass next to its code, recsys_dist/models/):
    # ``model.name`` picks the class, the other fields are that model's
    model: ModelConfig = field(default_factory=model_config)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # DiffRec / T-DiffRec (model.name: diffrec): the model's own config, next to its code
    # (recsys_dist/models/diffrec/). Its lr / weight_decay / batch_size are the single-process
    # reference's; the job trains with train.lr, train.weight_decay, train.batch_size.
    diffrec: DiffRecConfig = field(default_factory=DiffRecConfig)

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(self.run_dir() / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config that cannot be used: unknown field, value of the wrong type, malformed override,
    missing or invalid YAML file. The message is one line naming the field or the file (the CLI
    prints it as ``error: <message>``). A ValueError, so callers catching ValueError still work."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A config file (or a ``base:`` it names) that does not exist."""


_NONE_TYPE = type(None)


class _Mismatch(Exception):
    """A value that does not fit a type hint (internal; becomes a ConfigError naming the field)."""


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[Any, str]]:
    """Field name -> (resolved type hint, the annotation as written) of a config dataclass.

    ``from __future__ import annotations`` leaves annotations as strings: resolve them."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints.get(f.name, Any), f.type if isinstance(f.type, str) else getattr(
        f.type, "__name__", str(f.type))) for f in dataclasses.fields(cls)}


def _type_label(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _check(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` (int -> float, list -> tuple), or raise _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE_TYPE in args:
            return None
        details = []
        for arg in args:
            if arg is not _NONE_TYPE:
                try:
                    return _check(value, arg)
                except _Mismatch as e:
                    details += [str(e)] if str(e) else []
        raise _Mismatch("; ".join(details))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(f"one of {list(args)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            elem = [args[0] if args else Any] * len(value)
        else:
            if len(value) != len(args):
                raise _Mismatch(f"{len(value)} element{'' if len(value) == 1 else 's'}, expected {len(args)}")
            elem = list(args)
        out = []
        for i, (v, t) in enumerate(zip(value, elem)):
            try:
                out.append(_check(v, t))
            except _Mismatch:
                raise _Mismatch(f"element {i} is {v!r} ({type(v).__name__}), not {_type_label(t)}") from None
        return tuple(out) if origin is tuple else out
    if origin is not None:  # dict[str, int] and the like: the container type only
        if isinstance(value, origin):
            return value
        raise _Mismatch()
    if hint is bool:  # only YAML true/false (and yes/no/on/off, YAML 1.1 booleans); never 0/1
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if hint is int:  # bool is an int in Python: not a valid int here
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch()
    if hint is float:
        if isinstance(value, bool):
            raise _Mismatch()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch()
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch()
    return value  # a hint this checker does not know: unchecked


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, hint: Any, name: str, label: str | None = None) -> Any:
    """``value`` (from YAML, an override or a stored config) checked against the field's type
    hint and converted where lossless (int -> float, list -> tuple); ConfigError otherwise."""
    try:
        return _check(value, hint)
    except _Mismatch as e:
        detail = f": {e}" if str(e) else ""
        raise ConfigError(f"config field '{name}' expects {label or _type_label(hint)}, got "
                          f"{_short_repr(value)} ({type(value).__name__}){detail}") from None


def _apply(obj: Any, updates: Any, where: str) -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{where.rstrip('.') or '<top level>'}' must be a mapping, "
                          f"got {_short_repr(updates)} ({type(updates).__name__})")
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        if key not in types_:
            raise ConfigError(f"unknown config field '{where}{key}' (known: {', '.join(sorted(types_))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config field '{where}{key}' is a section (set its fields, e.g. "
                                  f"{where}{key}.<field>=...); got {_short_repr(value)}")
            if isinstance(current, SourceConfig) and {"path", "files"} & set(value):
                current = type(current)()  # a source that names its files is a new source, not a patch
                setattr(obj, key, current)
            if isinstance(current, ModelConfig) and "name" in value:
                current = _switch_model(current, value["name"], f"{where}{key}.name")
                setattr(obj, key, current)
                value = {k: v for k, v in value.items() if k != "name"}
            _apply(current, value, f"{where}{key}.")
        else:
            hint, label = types_[key]
            setattr(obj, key, _coerce(value, hint, where + key, label))


def _switch_model(current: ModelConfig, name: Any, where: str) -> ModelConfig:
    """The config of model ``name``; fields set (to a non-default value) on the previous model's
    config carry over where the new model has them (a dataset file may set ``model.dim`` before
    a model file names the model)."""
    name = _coerce(name, str, where)
    if name == current.name:
        return current
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"config field '{where}': unknown model {_short_repr(name)} "
                          f"(known: {', '.join(sorted(MODEL_CONFIGS))})")
    new = MODEL_CONFIGS[name]()
    old_defaults = type(current)()
    for f in dataclasses.fields(current):
        if f.name != "name" and hasattr(new, f.name) and getattr(current, f.name) != getattr(old_defaults, f.name):
            setattr(new, f.name, getattr(current, f.name))
    return new


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["train.max_steps=100", "model.dim=128"]`` into a nested dict."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not of the form key.sub=value")
        key, raw = pair.split("=", 1)
        parts = [part.strip() for part in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override '{pair}': empty field name in '{key}' (expected key.sub=value)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{pair}': malformed value: {_yaml_problem(e)}") from None
        node = nested
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{pair}' conflicts with an earlier override setting "
                                  f"'{'.'.join(parts[:i + 1])}' to a value")
        node[parts[-1]] = value
    return nested


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """(file, mapping) for the YAML at ``path``, preceded by those of the files its ``base:``
    list names (paths relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.exists():
        where = f" (a base of {seen[-1]})" if seen else ""
        raise ConfigFileNotFoundError(f"config file not found: {path}{where}")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file name or a list of file names, got {bases!r}")
    layers: list[tuple[Path, dict[str, Any]]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path,))
    return layers + [(path, data)]


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Load a JobConfig from a YAML file (optional) and apply command-line overrides.

    A YAML file may start with ``base: [a.yaml, b.yaml]``: those are applied first, in order,
    then the file itself, then the overrides. Every value is checked against its field's type
    (ConfigError, one line naming the field, otherwise).
    """
    cfg = JobConfig()
    if path is not None:
        for file, layer in _read_yaml(Path(path)):
            try:
                _apply(cfg, layer, "")
            except ConfigError as e:
                raise ConfigError(f"{file}: {e}") from None
    _apply(cfg, parse_overrides(overrides), "")
    return cfg


#: the fields of the flat ``model:`` section before each model owned its config (every run up to
#: then stored all of them, most unused by its model): :func:`config_from_dict` drops those the
#: named model does not have
LEGACY_MODEL_FIELDS = frozenset((
    "name", "dim", "num_blocks", "num_heads", "dropout", "emb_dropout", "diffusion_steps", "schedule",
    "lambda_uncertainty", "diffurec_form", "dreamrec_form", "p_uncond", "guidance_w", "sample_steps", "eta",
    "guidance_ce_weight", "rank_by", "num_layers", "mcrl_use_cnn", "mcrl_use_lstm", "mcrl_local_weight",
    "num_interests", "gem", "lambda_recon", "mu_ssm", "sphere"))

#: fields a model gained after the flat section: a flat section's value was another model's
#: (e.g. DreamRec's ``sample_steps: 20``), so it is dropped and the field takes its default
FIELDS_ADDED_SINCE_FLAT: dict[str, frozenset[str]] = {
    "diffurec": frozenset(("sample_steps", "eta")),  # DiffuRec's DDIM sampler
}


def _migrate_model_section(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config's ``model`` section as the named model's config has it: fields of the
    old flat section that the model does not have are dropped (they never reached it)."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("name", "diffurec") not in MODEL_CONFIGS:
        return data
    name = model.get("name", "diffurec")
    own = {f.name for f in dataclasses.fields(MODEL_CONFIGS[name])}
    if any(k in LEGACY_MODEL_FIELDS and k not in own for k in model):  # the old flat section
        own -= FIELDS_ADDED_SINCE_FLAT.get(name, frozenset())  # there, these belonged to other models
    return {**data, "model": {k: v for k, v in model.items() if k in own or k not in LEGACY_MODEL_FIELDS}}


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from ``to_dict()`` output (e.g. stored in a checkpoint or metrics),
    including one written before each model owned its config (:data:`LEGACY_MODEL_FIELDS`);
    values are type-checked like a YAML file's (ConfigError)."""
    cfg = JobConfig()
    _apply(cfg, _migrate_model_section(data), "")
    return cfg


#: (section, field, value before the field existed) for fields whose default is *not* the old
#: behaviour: a config stored before the field existed is read with the old value.
OLD_BEHAVIOUR: tuple[tuple[str, str, Any], ...] = (
    ("model", "diffurec_form", "paper"),  # DiffuRec: per-item lambda, norm on z (before official form)
    ("eval", "ties", "optimistic"),  # the target won every tie
    ("eval", "test_seeds", 1),  # one eval-noise seed
)


def stored_config_as_now(data: dict[str, Any]) -> dict[str, Any] | None:
    """A ``to_dict()`` stored by an earlier run, as this version would write it: fields added
    to ``JobConfig`` since count as their defaults (new fields default to the behaviour from
    before they existed), except where a new default changed the behaviour: those get the value
    that reproduces the old behaviour (:data:`OLD_BEHAVIOUR`). None when the stored config has a
    field since removed or retyped."""
    import copy

    data = copy.deepcopy(data)
    for section, key, old in OLD_BEHAVIOUR:
        part = data.get(section)
        if section == "model" and isinstance(part, dict):  # only where the named model has the field
            known = MODEL_CONFIGS.get(part.get("name", "diffurec"))
            if known is None or key not in {f.name for f in dataclasses.fields(known)}:
                continue
        if isinstance(part, dict) and key not in part:
            part[key] = old
    try:
        return config_from_dict(data).to_dict()
    except (KeyError, TypeError, ValueError):  # ConfigError is a ValueError
        return None
