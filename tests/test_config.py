"""Every shipped config loads, names a known model, and overrides behave."""

from pathlib import Path

import pytest

from recsys_dist.config import REPO_ROOT, load_config, parse_overrides
from recsys_dist.models import MODELS

CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert cfg.model.name in MODELS
    assert cfg.name == path.stem.replace("_", "-")


def test_overrides_and_bases(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  dim: 32\ntrain:\n  max_steps: 5\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\nmodel:\n  dim: 48\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.lr=0.01", "eval.ks=[1,2]", "data.max_users=null"])
    assert (cfg.model.dim, cfg.train.max_steps, cfg.train.lr, cfg.eval.ks) == (48, 5, 0.01, (1, 2))
    assert cfg.data.max_users is None
    assert parse_overrides(["a.b=true"]) == {"a": {"b": True}}
    with pytest.raises(KeyError, match="unknown config field 'train.nope'"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_overrides(["oops"])


def test_compare_reuses_a_run_only_when_its_config_is_the_same():
    import json

    from launcher.commands import _same_config
    from recsys_dist.config import load_config

    cfg = load_config(None, ["model.name=dreamrec", "train.max_steps=50"])
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert _same_config(stored, cfg)
    del stored["model"]["guidance_ce_weight"]  # a run from before the field existed: its default applies
    assert _same_config(stored, cfg)
    assert not _same_config(stored, load_config(None, ["model.name=dreamrec", "train.max_steps=60"]))
    assert not _same_config(stored, load_config(None, ["model.name=dreamrec", "train.max_steps=50",
                                                       "model.guidance_ce_weight=1.0"]))
    assert not _same_config({"model": {"retired_field": 1}}, cfg) and not _same_config(None, cfg)
