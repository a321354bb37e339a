"""The over-seeds summary of ``benchmarks/dreamrec_official_curve.py --summary``: each side's
test metrics at its val-selected epoch, mean and sample sd over the seeds found, and the mean
epochs trained and training seconds, computed here with numpy from the same inputs; the runs
without ``--seed`` are labelled with each side's default seed (official 2025, ours 0), a run
that never stopped early counts its whole budget, and runs of another patience are left out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _side(hr: float, ndcg: float, selected: int, trained: int, early: bool, official: bool, seed: int) -> dict:
    side = {"selected": {"epoch": selected, "test": {"HR@20": hr, "NDCG@20": ndcg}},
            "train_seconds": 7.0 * trained, "ran_at": "2026-12-07T00:00:00"}
    if official:
        side.update(args={"seed": seed}, stopped_early_at_epoch=trained if early else None,
                    rows=[{"epoch": e} for e in range(10, trained + 1, 10)])
    else:
        side.update(stopped_early=early, epochs=float(trained))
    return side


def _cells(text: str, side: str, n: int) -> list[str]:
    (line,) = [l for l in text.splitlines() if l.startswith(f"| {side} | {n} |")]
    return [c.strip() for c in line.split("|")[1:-1]]


def test_summary_is_the_mean_and_sample_sd_over_seeds(tmp_path):
    from dreamrec_official_curve import result_stem, write_seed_summary

    rng = np.random.default_rng(0)
    hr, ndcg = rng.uniform(0.005, 0.03, (2, 3)), rng.uniform(0.002, 0.01, (2, 3))
    trained = np.array([[120, 80, 1000], [180, 120, 0]])  # official seed 2: the whole budget, no early stop
    for i, seed in enumerate((None, 1, 2)):
        result = {"patience": 5, "seed": seed,
                  "official": _side(hr[0, i], ndcg[0, i], 30, int(trained[0, i]), i < 2, True,
                                    2025 if seed is None else seed)}
        if i < 2:  # ours has run two seeds only
            result["ours"] = _side(hr[1, i], ndcg[1, i], 70, int(trained[1, i]), True, False, seed or 0)
        (tmp_path / f"{result_stem(seed, 5)}.json").write_text(json.dumps(result))
    other = {"patience": 15, "seed": 3, "official": _side(0.5, 0.5, 10, 20, True, True, 3)}
    (tmp_path / f"{result_stem(3, 15)}.json").write_text(json.dumps(other))

    text = write_seed_summary(tmp_path, 5)
    assert (tmp_path / "dreamrec_official_curve-patience5-seeds.md").read_text() == text
    per_run = [[c.strip() for c in l.split("|")[1:-1]] for l in text.splitlines()
               if l.startswith("| official | ") or l.startswith("| ours | ")]
    per_run = [c for c in per_run if c[-1].endswith(".json")]
    assert [(c[0], c[1]) for c in per_run] == [("official", "2025"), ("official", "1"), ("official", "2"),
                                               ("ours", "0"), ("ours", "1")]
    assert per_run[2][2].startswith("1000") and "no early stop" in per_run[2][2]
    for side, row, n in (("official", 0, 3), ("ours", 1, 2)):
        cells = _cells(text, side, n)
        for col, values in ((2, hr[row, :n]), (3, ndcg[row, :n])):
            mean, sd = (float(x) for x in cells[col].split("±"))
            assert abs(mean - 100 * values.mean()) <= 0.005 + 1e-9
            assert abs(sd - 100 * values.std(ddof=1)) <= 0.005 + 1e-9
        assert abs(float(cells[4]) - trained[row, :n].mean()) <= 0.5
        assert abs(float(cells[5]) - 7.0 * trained[row, :n].mean()) <= 0.5
    assert all(c[1] != "3" for c in per_run)  # the patience-15 run is not in the patience-5 summary


def test_the_header_quotes_popularity_from_the_zhihu_table(tmp_path):
    from dreamrec_official_curve import result_stem, write_seed_summary, zhihu_popularity

    result = {"patience": 5, "seed": None, "official": _side(0.01, 0.005, 30, 80, True, True, 2025)}
    (tmp_path / f"{result_stem(None, 5)}.json").write_text(json.dumps(result))
    assert "popularity" not in write_seed_summary(tmp_path, 5).splitlines()[0]
    table = tmp_path / "zhihu.json"
    assert zhihu_popularity(table) is None
    table.write_text(json.dumps({"sasrec": [{"seed": 0}, {"popularity_test": {"HR@20": 0.012345, "NDCG@20": 0.00678}}]}))
    popularity = zhihu_popularity(table)
    assert popularity == {"HR@20": 0.012345, "NDCG@20": 0.00678}
    assert "popularity 1.23 / 0.68 on ours' test split" in write_seed_summary(tmp_path, 5, popularity).splitlines()[0]
