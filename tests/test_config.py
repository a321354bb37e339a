"""Every shipped config loads, names a known model, and overrides behave."""

from pathlib import Path

import pytest

from recsys_dist.config import (REPO_ROOT, ConfigError, JobConfig, config_from_dict, load_config,
                                parse_overrides, stored_config_as_now)
from recsys_dist.models import MODEL_CONFIGS

CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg.model, MODEL_CONFIGS[cfg.model.name])
    assert cfg.name == path.stem.replace("_", "-")


def test_overrides_and_bases(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  dim: 32\ntrain:\n  max_steps: 5\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\nmodel:\n  dim: 48\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.lr=0.01", "eval.ks=[1,2]", "data.source.max_users=null"])
    assert (cfg.model.dim, cfg.train.max_steps, cfg.train.lr, cfg.eval.ks) == (48, 5, 0.01, (1, 2))
    assert cfg.data.source.max_users is None
    assert parse_overrides(["a.b=true"]) == {"a": {"b": True}}
    with pytest.raises(ConfigError, match="unknown config field 'train.nope'"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_overrides(["oops"])


def test_reuse_takes_a_finished_run_only_when_its_config_is_the_same(tmp_path):
    # compare --reuse and reproduce --reuse share launcher.commands.reusable_run
    import json

    from launcher.commands import reusable_run
    from recsys_dist.config import load_config

    cfg = load_config(None, ["model.name=dreamrec", "train.max_steps=50"])
    path = tmp_path / "metrics.json"

    def stored_as(config) -> Path:
        path.write_text(json.dumps({"config": config}))
        return path

    stored = json.loads(json.dumps(cfg.to_dict()))
    assert reusable_run(stored_as(stored), cfg)
    del stored["model"]["guidance_ce_weight"]  # a run from before the field existed: its default applies
    assert reusable_run(stored_as(stored), cfg)
    assert not reusable_run(path, load_config(None, ["model.name=dreamrec", "train.max_steps=60"]))
    assert not reusable_run(path, load_config(None, ["model.name=dreamrec", "train.max_steps=50",
                                                     "model.guidance_ce_weight=1.0"]))
    assert not reusable_run(stored_as({"model": {"retired_field": 1}}), cfg)
    assert not reusable_run(stored_as(None), cfg) and not reusable_run(tmp_path / "missing.json", cfg)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=abc", "config field 'train.max_steps' expects int, got 'abc' (str)"),
    ("train.max_steps=1.5", "config field 'train.max_steps' expects int, got 1.5 (float)"),
    ("train.max_steps=true", "config field 'train.max_steps' expects int, got True (bool)"),
    ("train.max_steps=", "config field 'train.max_steps' expects int, got None (NoneType)"),
    ("train.lr=abc", "config field 'train.lr' expects float, got 'abc' (str)"),
    ("train.lr=false", "config field 'train.lr' expects float, got False (bool)"),
    ("eval.mask_history=1", "config field 'eval.mask_history' expects bool, got 1 (int)"),
    ("eval.mask_history=0", "config field 'eval.mask_history' expects bool, got 0 (int)"),
    ("eval.mask_history=y", "config field 'eval.mask_history' expects bool, got 'y' (str)"),
    ("eval.mask_history='yes'", "config field 'eval.mask_history' expects bool, got 'yes' (str)"),
    ("eval.mask_history=enabled", "config field 'eval.mask_history' expects bool, got 'enabled' (str)"),
    ("model.name=3", "config field 'model.name' expects str, got 3 (int)"),
    ("data.train_prefixes_per_user=abc", "config field 'data.train_prefixes_per_user' expects int | None, got 'abc' (str)"),
    ("data.train_prefixes_per_user=2.5", "config field 'data.train_prefixes_per_user' expects int | None, got 2.5 (float)"),
    ("train.betas=[0.9]", "config field 'train.betas' expects tuple[float, float], got [0.9] (list): "
                          "1 element, expected 2"),
    ("train.betas=[0.9, 0.98, 0.999]", "config field 'train.betas' expects tuple[float, float]"),
    ("train.betas=0.9", "config field 'train.betas' expects tuple[float, float], got 0.9 (float)"),
    ("train.betas=[0.9, x]", "element 1 is 'x' (str), not float"),
    ("eval.ks=[5, 10.5]", "config field 'eval.ks' expects tuple[int, ...], got [5, 10.5] (list): "
                          "element 1 is 10.5 (float), not int"),
    ("eval.ks=[5, true]", "element 1 is True (bool), not int"),
    ("eval.ks=10", "config field 'eval.ks' expects tuple[int, ...], got 10 (int)"),
    ("train=5", "config field 'train' is a section"),
    ("train.max_steps.x=5", "config field 'train.max_steps' expects int, got {'x': 5} (dict)"),
    ("train.max_steps=[1,", "override 'train.max_steps=[1,': malformed value"),
    ("train..max_steps=1", "empty field name"),
    ("=1", "empty field name"),
    ("oops", "override 'oops' is not of the form key.sub=value"),
])
def test_overrides_of_the_wrong_type_are_rejected_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text and "\n" not in text
    assert isinstance(info.value, ValueError)  # callers catching ValueError still catch it


@pytest.mark.parametrize("override, field, expected", [
    ("train.lr=1", "train.lr", 1.0),  # int -> float
    ("train.lr=1e-3", "train.lr", 0.001),  # YAML 1.1 reads 1e-3 as a string; a float field takes it
    ("train.betas=[0.9, 1]", "train.betas", (0.9, 1.0)),  # list -> tuple, int -> float
    ("eval.ks=[1]", "eval.ks", (1,)),
    ("eval.ks=[]", "eval.ks", ()),
    ("eval.mask_history=true", "eval.mask_history", True),
    ("eval.mask_history=no", "eval.mask_history", False),  # a YAML 1.1 boolean
    ("data.source.max_users=null", "data.source.max_users", None),
    ("data.source.max_users=7", "data.source.max_users", 7),
    ("checkpoint.url=s3://b/x", "checkpoint.url", "s3://b/x"),
    ("data.source.files={train: a.tsv, valid: b.tsv, test: c.tsv}", "data.source.path", None),  # a new source
    ("train={max_steps: 3}", "train.max_steps", 3),
])
def test_well_typed_overrides_are_converted(override, field, expected):
    cfg = load_config(None, [override])
    value = cfg
    for part in field.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_yaml_files_are_type_checked_and_name_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: lots\n")
    (tmp_path / "job.yaml").write_text("base: base.yaml\nmodel:\n  dim: 32\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: config field 'train.max_steps' expects int, got 'lots'"):
        load_config(tmp_path / "job.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n")
    cfg = load_config(tmp_path / "ok.yaml")
    assert (cfg.train.lr, cfg.train.betas) == (0.001, (0.8, 0.9))
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML: .*line \d+"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "cyc.yaml").write_text("base: cyc.yaml\n")
    with pytest.raises(ConfigError, match="config base cycle"):
        load_config(tmp_path / "cyc.yaml")
    with pytest.raises(ConfigError, match="config file not found: .*nonexistent.yaml") as info:
        load_config(tmp_path / "nonexistent.yaml")
    assert isinstance(info.value, FileNotFoundError)  # still a FileNotFoundError for older callers


def test_stored_configs_are_type_checked():
    import json

    stored = json.loads(json.dumps(JobConfig().to_dict()))  # tuples come back as lists
    assert config_from_dict(stored) == JobConfig()
    assert stored_config_as_now(stored) == JobConfig().to_dict()
    stored["train"]["max_steps"] = "300"  # a field since retyped (or a hand-edited store)
    with pytest.raises(ConfigError, match="config field 'train.max_steps' expects int, got '300'"):
        config_from_dict(stored)
    assert stored_config_as_now(stored) is None
    stored["train"]["max_steps"] = 300
    stored["eval"]["ks"] = [5, 10, "x"]
    assert stored_config_as_now(stored) is None
    assert stored_config_as_now({"train": 5}) is None
    assert stored_config_as_now({"train": {"gone": 1}}) is None


# The flat ``model:`` section every run stored before each model owned its config (26 fields,
# their defaults then), as an earlier metrics.json / checkpoint holds it.
FLAT_MODEL_SECTION = {
    "name": "diffurec", "dim": 64, "num_blocks": 2, "num_heads": 2, "dropout": 0.1, "emb_dropout": 0.3,
    "diffusion_steps": 32, "schedule": "trunc_linear", "lambda_uncertainty": 0.001, "diffurec_form": "official",
    "dreamrec_form": "ours", "p_uncond": 0.1, "guidance_w": 2.0, "sample_steps": 20, "eta": 0.0,
    "guidance_ce_weight": 0.0, "rank_by": "generated", "num_layers": 1, "mcrl_use_cnn": True,
    "mcrl_use_lstm": True, "mcrl_local_weight": 0.3, "num_interests": 4, "gem": "model", "lambda_recon": 0.1,
    "mu_ssm": 1.0, "sphere": True}


@pytest.mark.parametrize("overrides", [
    ["model.name=sasrec", "model.num_blocks=3", "model.dropout=0.2"],
    ["model.name=gru4rec", "model.num_layers=2"],
    ["model.name=dreamrec", "model.dreamrec_form=official", "model.guidance_w=1.0"],
    ["model.name=dimerec", "model.num_interests=2"],
    ["model.name=diffurec", "model.lambda_uncertainty=0.01"],
])
def test_configs_stored_with_the_flat_model_section_still_load(overrides):
    """Migration: an old store (every model field, most unused) reads as the named model's own
    config with the values it had, and compares equal to the same job written today."""
    import json

    now = load_config(None, overrides)
    old = json.loads(json.dumps(now.to_dict()))
    flat = dict(FLAT_MODEL_SECTION)
    flat.update(old["model"])  # the run's own values over the old defaults of the other fields
    old["model"] = flat
    assert set(flat) > set(now.to_dict()["model"])  # it really stored fields its model lacks
    assert config_from_dict(old) == now
    assert stored_config_as_now(old) == now.to_dict()


def test_a_flat_section_keeps_diffurec_on_the_sampler_it_ran_with():
    """The flat section stored DreamRec's ``sample_steps: 20`` beside a DiffuRec run, which
    sampled all T steps ancestrally; DiffuRec's own ``sample_steps`` (DDIM) came later."""
    old = load_config(None, ["model.name=diffurec"]).to_dict()
    old["model"] = dict(FLAT_MODEL_SECTION)
    assert old["model"]["sample_steps"] == 20
    model = config_from_dict(old).model
    assert (model.sample_steps, model.eta) == (0, 0.0)
    ddim = load_config(None, ["model.name=diffurec", "model.sample_steps=4"]).to_dict()
    assert config_from_dict(ddim).model.sample_steps == 4  # today's own field is kept


def test_each_model_stores_only_its_own_fields():
    sasrec = load_config(None, ["model.name=sasrec"]).to_dict()["model"]
    assert set(sasrec) == {"name", "dim", "num_blocks", "num_heads", "dropout", "emb_dropout", "similarity", "temperature"}
    with pytest.raises(ConfigError, match=r"unknown config field 'model\.num_interests'"):
        load_config(None, ["model.name=sasrec", "model.num_interests=2"])
    with pytest.raises(ConfigError, match=r"'model\.name': unknown model 'nope'"):
        load_config(None, ["model.name=nope"])
    # a value set before the model is named carries over where the model has the field
    assert load_config(None, ["model.dim=32", "model.num_heads=4", "model.name=sasrec"]).model.num_heads == 4
    with pytest.raises(ConfigError, match=r"unknown config field 'model\.num_heads'"):
        load_config(None, ["model.num_heads=4", "model.name=gru4rec"])  # a GRU has no heads
