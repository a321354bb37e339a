"""The over-seeds summary of ``benchmarks/dreamrec_official_curve.py --summary``: each side's
test metrics at its val-selected epoch, mean and sample sd over the seeds found, computed
here with numpy from the same inputs; runs of another patience are left out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _side(hr: float, ndcg: float, epoch: int, official: bool, seed: int) -> dict:
    side = {"selected": {"epoch": epoch, "test": {"HR@20": hr, "NDCG@20": ndcg}},
            "train_seconds": 100.0 * epoch, "ran_at": "2026-12-07T00:00:00"}
    if official:
        side.update(args={"seed": seed}, stopped_early_at_epoch=epoch + 50)
    else:
        side.update(stopped_early=True, epochs=float(epoch + 50))
    return side


def test_summary_is_the_mean_and_sample_sd_over_seeds(tmp_path):
    from dreamrec_official_curve import result_stem, write_seed_summary

    rng = np.random.default_rng(0)
    hr, ndcg = rng.uniform(0.005, 0.03, (2, 3)), rng.uniform(0.002, 0.01, (2, 3))
    for i, seed in enumerate((None, 1, 2)):
        result = {"patience": 5, "seed": seed,
                  "official": _side(hr[0, i], ndcg[0, i], 10 * (i + 1), True, 2025 if seed is None else seed)}
        if i < 2:  # ours has run two seeds only
            result["ours"] = _side(hr[1, i], ndcg[1, i], 20 * (i + 1), False, seed or 0)
        (tmp_path / f"{result_stem(seed, 5)}.json").write_text(json.dumps(result))
    other = {"patience": 0, "seed": 3, "official": _side(0.5, 0.5, 10, True, 3)}
    (tmp_path / f"{result_stem(3, 0)}.json").write_text(json.dumps(other))

    text = write_seed_summary(tmp_path, 5)
    assert (tmp_path / "dreamrec_official_curve-patience5-seeds.md").read_text() == text
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines()
            if line.startswith("| official | 3 |") or line.startswith("| ours | 2 |")}
    for side, n in (("official", 3), ("ours", 2)):
        cells = rows[side]
        for col, values in ((3, hr[0 if side == "official" else 1, :n]), (4, ndcg[0 if side == "official" else 1, :n])):
            mean, sd = (float(x) for x in cells[col].split("±"))
            assert abs(mean - 100 * values.mean()) <= 0.005 + 1e-9
            assert abs(sd - 100 * values.std(ddof=1)) <= 0.005 + 1e-9
    assert "seed3" not in text
