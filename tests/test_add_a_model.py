"""The README's "Adding a dataset or a model", followed literally: the blocks it shows are
copied into a copy of the package (the model file, the two registry lines, the two YAML files)
and the new model trains and is evaluated on 1 rank with no other change."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_dist.config import REPO_ROOT, default_data_dir

DATA = Path(default_data_dir()) / "ml-1m" / "raw" / "diffurec" / "interactions.tsv.gz"
REGISTRY = "recsys_dist/models/__init__.py"


def readme_blocks() -> tuple[dict[str, str], list[str]]:
    """{path: text} of every ``add-a-model:file`` block and the ``add-a-model:registry`` lines."""
    text = (REPO_ROOT / "README.md").read_text()
    block = r"<!-- add-a-model:{} -->\s*```\w*\n(.*?)```"
    files = {m.group(1): m.group(2) for m in re.finditer(block.format(r"file (\S+)"), text, re.S)}
    registry = re.search(block.format("registry"), text, re.S)
    assert files and registry, "README lost its add-a-model blocks"
    return files, registry.group(1).strip("\n").splitlines()


def add_model(root: Path) -> None:
    """What the README says to do, done to the copy at ``root``."""
    files, (import_line, entry_line) = readme_blocks()
    for rel, text in files.items():
        (root / rel).write_text(text)
    lines = (root / REGISTRY).read_text().splitlines()
    last_import = max(i for i, line in enumerate(lines) if line.startswith("from recsys_dist.models."))
    lines.insert(last_import + 1, import_line)
    table = next(i for i, line in enumerate(lines) if line.startswith("MODEL_CONFIGS"))
    lines.insert(table + 1, entry_line)
    (root / REGISTRY).write_text("\n".join(lines) + "\n")


@pytest.mark.skipif(not DATA.exists(), reason=f"ML-1M not found at {DATA}")
def test_readme_recipe_adds_a_model_that_trains(tmp_path) -> None:
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("recsys_dist", "shards", "configs", "launcher"):
        shutil.copytree(REPO_ROOT / part, root / part, ignore=ignore)
    add_model(root)
    cmd = [sys.executable, "-m", "recsys_dist.train", "--config", "configs/ml1m_meanpool.yaml",
           f"data.data_dir={default_data_dir()}", "data.source.max_users=200", "data.max_len=20",
           "data.train_prefixes_per_user=4", "train.batch_size=64", "train.max_steps=40", "train.log_every=1",
           "eval.val_max_users=100", "checkpoint.enabled=false", f"output_dir={tmp_path / 'runs'}", "model.dim=32"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "ml1m-meanpool" / "metrics.json").read_text())
    assert metrics["model"] == "meanpool"
    assert metrics["config"]["model"] == {"name": "meanpool", "dim": 32}  # its own fields only
    # it learned: the full-catalog CE starts near ln(catalog size) (near-zero logits; a model
    # whose updates never land stays there) and ends clearly below it
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert losses[0] > 7.0  # ln(~3,000 items of the 200-user slice) = 8.0
    assert sum(losses[-5:]) / 5 < 0.95 * losses[0]
    assert all(math.isfinite(v) for v in metrics["test"].values())
    # the run measures its own memory: peak RSS per rank, and the table rows it held
    assert len(metrics["peak_rss_gib_per_rank"]) == 1 and 0.1 < metrics["peak_rss_gib_per_rank"][0] < 24
    table = metrics["item_table"]
    assert table["row_bytes_per_rank"] == [table["rows"] * 32 * 4]  # 1 rank holds every row, fp32, d 32
