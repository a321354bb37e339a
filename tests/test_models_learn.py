"""Every model trains on 2 real gloo ranks (TorchRec table + DeepSpeed dense) over a small
real slice (300 ML-1M users) and must beat the popularity ranker on full-catalog test HR@20,
scored by the same evaluator on the same users. This also runs each model's step many times
on 2 ranks: random timesteps and guidance dropout must never desynchronise the ranks."""

import math

import pytest

from distributed_harness import run_distributed
from recsys_dist.config import REPO_ROOT, default_data_dir
from pathlib import Path

DATA = Path(default_data_dir()) / "ml-1m" / "raw" / "diffurec" / "interactions.tsv.gz"

GUIDANCE_CE = ["model.guidance_ce_weight=1.0", "sparse.init_std=0.02", "sparse.lr=0.05"]
# per model: its config file, the budget, and overrides that make it learn within that budget
CASES = {
    "sasrec": ("configs/models/sasrec.yaml", 120, []),
    "gru4rec": ("configs/models/gru4rec.yaml", 240, ["train.lr=0.01", "model.emb_dropout=0.0"]),
    "diffurec": ("configs/models/diffurec.yaml", 120, []),
    "dimerec": ("configs/models/dimerec.yaml", 120, []),
    # DreamRec / AREAL with the guidance CE (DimeRec's L_gem on the encoder; the denoiser stays
    # MSE-only) and a learnable table; the papers' MSE-only form is held to training soundly
    # below, not to beating popularity (docs/results.md, "DreamRec and AREAL at CPU budgets")
    "dreamrec+gce": ("configs/models/dreamrec.yaml", 120, GUIDANCE_CE),
    "areal+gce": ("configs/models/areal.yaml", 240, GUIDANCE_CE),
}
# MSE-only generative models (no negatives) learn far more slowly (DreamRec's own code: HR@20
# 1.2 % after 30 epochs on Zhihu, ../shared/reference.md); within a CI budget they are held to
# training soundly on 2 ranks, not to beating popularity (see docs/results.md "Comparing every model").
GENERATIVE = {
    "dreamrec": ("configs/models/dreamrec.yaml", 120, []),
    "areal": ("configs/models/areal.yaml", 120, []),
}


def _fit(config: str, overrides: list[str]):
    from recsys_dist.config import load_config
    from recsys_dist.train.trainer import fit

    cfg = load_config(config, overrides)
    out = fit(cfg)
    return {"test": out["test"], "popularity": out["popularity_test"], "world": out["world_size"],
            "losses": [v for _, v in out["loss_curve"]]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(tmp_path_factory.mktemp("learn") / "shards")


def _train_two_ranks(cases, model, shards, tmp_path):
    """Fit ``model`` on 2 ranks; check both report the same all-reduced metrics; return rank 0's."""
    config, steps, extra = cases[model]
    out = run_distributed(_fit, 2, str(REPO_ROOT / config), _overrides(model, steps, shards, tmp_path, extra))
    assert out[0]["world"] == 2 and out[0]["test"]["num_users"] == 300
    same = {k: v for k, v in out[0]["test"].items() if k != "seconds"}
    assert same == {k: v for k, v in out[1]["test"].items() if k != "seconds"}  # all-reduced: identical
    return out[0]


def _overrides(model, steps, shards, tmp_path, extra):
    return ["data.dataset=ml-1m", "data.max_len=20", "data.source.max_users=300", "data.train_prefixes_per_user=40",
                 f"data.shards_url={shards}", f"output_dir={tmp_path}", f"name={model.replace('+', '-')}",
                 "train.batch_size=64", f"train.max_steps={steps}", "train.eval_every=0", "train.log_every=20",
                 "eval.val_max_users=null", *extra]


needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"ML-1M not found at {DATA} (set RECSYS_DATA_DIR)")


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("model", sorted(CASES))
def test_model_beats_popularity(model, shards, tmp_path):
    out = _train_two_ranks(CASES, model, shards, tmp_path)
    test, pop = out["test"], out["popularity"]
    assert test["HR@20"] >= pop["HR@20"] + 0.03 and test["HR@20"] >= 1.5 * pop["HR@20"], (model, test["HR@20"], pop["HR@20"])
    # (a collapsed model cannot pass this by ties: they count as a random order, tests/test_evaluator.py)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("model", sorted(GENERATIVE))
def test_generative_model_trains_on_two_ranks(model, shards, tmp_path):
    """Soundness only, stated as such: finite losses and identical all-reduced metrics on both
    ranks (checked in _train_two_ranks). No learning claim: a loss drop is no evidence here, the
    table can shrink under an MSE-only loss and make it fall at random-level ranking."""
    out = _train_two_ranks(GENERATIVE, model, shards, tmp_path)
    losses = out["losses"]
    assert losses and all(math.isfinite(v) for v in losses), losses
