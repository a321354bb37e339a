"""A new dataset is a YAML file: a CSV made here goes through ``launcher prepare`` and a 2-rank
``launcher train`` unchanged (no package code knows it), and its bad rows are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from recsys_dist.config import REPO_ROOT

USERS, ITEMS = 60, 30


def _write(tmp_path, rows):
    (tmp_path / "clicks.csv").write_text("uid,iid,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    (tmp_path / "clicks.yaml").write_text(
        "data:\n  dataset: clicks\n  source:\n    path: clicks.csv\n    user: uid\n    item: iid\n"
        "    time: ts\n    protocol: leave_one_out\n    min_user_count: 3\n")
    (tmp_path / "job.yaml").write_text(
        f"base: [clicks.yaml, {REPO_ROOT / 'configs/models/sasrec.yaml'}]\nname: clicks-sasrec\n"
        f"output_dir: {tmp_path / 'runs'}\ndata:\n  data_dir: {tmp_path}\n  shards_url: {tmp_path / 'shards'}\n"
        "  max_len: 8\n  records_per_block: 16\nmodel:\n  dim: 16\n  num_blocks: 1\n"
        "train:\n  batch_size: 16\n  max_steps: 12\n  eval_every: 6\neval:\n  batch_size: 32\ncheckpoint:\n"
        "  enabled: false\n")


def _launcher(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_csv_dataset_prepares_and_trains_on_two_ranks(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"item-{int(i)}", t) for u in range(USERS)
            for t, i in enumerate(rng.integers(0, ITEMS, size=int(rng.integers(4, 9))))]
    rng.shuffle(rows)  # file order is not time order: the ts column orders each user
    _write(tmp_path, rows)
    p = _launcher("prepare", "--config", str(tmp_path / "job.yaml"), cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["num_records"] == USERS and m["num_samples"]["test"] == USERS
    assert m["num_interactions"]["train"] == len(rows) - 2 * USERS
    t = _launcher("train", "--nproc-per-node", "2", "--config", str(tmp_path / "job.yaml"), cwd=tmp_path)
    assert t.returncode == 0, t.stderr[-3000:]
    out = json.loads((tmp_path / "runs" / "clicks-sasrec" / "metrics.json").read_text())
    assert out["test"]["num_users"] == USERS and out["world_size"] == 2


def test_bad_rows_are_one_line_errors_naming_file_line_and_column(tmp_path):
    _write(tmp_path, [("a", "x", 1), ("a", "y", "soon"), ("a", "z", 3)])
    p = _launcher("prepare", "--config", str(tmp_path / "job.yaml"), cwd=REPO_ROOT)
    assert p.returncode != 0
    last = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1]
    assert "clicks.csv" in last and "line 3" in last and "ts" in last, p.stderr[-2000:]


def test_prebuilt_shards_are_used_where_the_raw_data_is_absent(tmp_path):
    """A node with the shards but not the raw file uses them when they were built with the same
    parameters, and refuses (naming the file) when the job asks for another build."""
    import pytest

    from shards.build import build_shards
    from shards.source import SourceConfig

    (tmp_path / "c.csv").write_text("u,i,t\n" + "".join(f"{u},{i},{i}\n" for u in range(6) for i in range(5)))
    src = SourceConfig(path="c.csv", user="u", item="i", time="t")
    m = build_shards(src, str(tmp_path / "s"), dataset="c", data_dir=str(tmp_path))
    (tmp_path / "c.csv").unlink()
    assert build_shards(src, str(tmp_path / "s"), dataset="c", data_dir=str(tmp_path)) == m
    with pytest.raises(FileNotFoundError, match="c.csv"):
        build_shards(src, str(tmp_path / "s"), dataset="c", data_dir=str(tmp_path), records_per_block=2)
