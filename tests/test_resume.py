"""Kill -9 a rank mid-run; torchrun's elastic restart resumes from the newest checkpoint; the
result equals the uninterrupted run.

Two real 2-rank torchrun jobs (``python -m launcher train``) on the same seed and config:
A runs uninterrupted; B is killed (SIGKILL to one worker, chosen at random, a random moment
after its first checkpoint) and restarted by ``--max-restarts 1``. Tolerance: none. Every
number a step depends on is restored exactly (table rows and row-wise Adagrad state through
DCP, the dense module and ZeRO-1 Adam moments through DeepSpeed, each rank's torch RNG for
dropout, the data position to the batch; the diffusion noise is a function of (seed, step)),
and the CPU kernels are deterministic, so the final table, dense weights, optimizer state and
test metrics must be bitwise equal.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_harness import synth_shards as write_synth_shards
from recsys_dist.config import REPO_ROOT

STEPS, EVERY = 120, 10


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory):
    return write_synth_shards(tmp_path_factory.mktemp("synth") / "shards", 400, 300, 40, 20)


def _cmd(out_dir: Path, shards: Path, restarts: int) -> list[str]:
    return [sys.executable, "-m", "launcher", "train", "--config", "configs/models/diffurec.yaml",
            "--nproc-per-node", "2", "--max-restarts", str(restarts),
            "name=resume", f"output_dir={out_dir}", "data.dataset=synthetic", f"data.shards_url={shards}",
            "data.build_if_missing=false", "data.max_len=10", "model.dim=16", "model.num_blocks=1",
            "model.diffusion_steps=8", "train.batch_size=16", f"train.max_steps={STEPS}", "train.log_every=5",
            "train.eval_every=40", f"checkpoint.every={EVERY}", "checkpoint.keep=10", "eval.batch_size=64"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def _workers(first_attempt_only: bool = True) -> dict[int, int]:
    """{rank: pid} of this machine's recsys_dist.train workers of the first torchrun attempt."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"recsys_dist.train" not in cmdline:
                continue
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        if b"RANK" in env and (not first_attempt_only or env.get(b"TORCHELASTIC_RESTART_COUNT", b"0") == b"0"):
            found[int(env[b"RANK"])] = int(pid)
    return found


def _final_state(run_dir: Path) -> dict:
    """The last checkpoint of a run as full tensors (table via DCP, dense via DeepSpeed's files)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from recsys_dist.train.checkpoint import weights_only_torch_load

    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert (ckpt / "checkpoint.json").exists(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    flat = run_dir / "table.pt"
    dcp_to_torch_save(str(ckpt / "table"), str(flat))
    state = {"table": torch.load(flat, weights_only=True)}
    with weights_only_torch_load():
        for f in sorted((ckpt / "dense").rglob("*.pt")):
            state[f.name] = torch.load(f, weights_only=True)
    return state


def _assert_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k in ("ds_config", "ds_version"):
                continue
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")


@pytest.mark.slow
def test_kill_rank_resume_equals_uninterrupted(synth_shards, tmp_path):
    a = subprocess.run(_cmd(tmp_path / "A", synth_shards, 0), cwd=REPO_ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]

    rng = random.Random(int(time.time()))
    victim_rank, delay = rng.randrange(2), rng.uniform(0.0, 1.5)
    first_ckpt = tmp_path / "B" / "resume" / "checkpoints" / f"step-{EVERY:08d}" / "checkpoint.json"
    log = open(tmp_path / "B.log", "w")
    b = subprocess.Popen(_cmd(tmp_path / "B", synth_shards, 1), cwd=REPO_ROOT, env=_env(), stdout=log,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not first_ckpt.exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first_ckpt.exists(), (tmp_path / "B.log").read_text()[-3000:]
    time.sleep(delay)
    workers = _workers()
    assert victim_rank in workers, f"worker of rank {victim_rank} not found: {workers}"
    os.kill(workers[victim_rank], signal.SIGKILL)
    killed_at = sorted(p.name for p in first_ckpt.parent.parent.iterdir())
    assert b.wait(timeout=600) == 0, (tmp_path / "B.log").read_text()[-3000:]
    text = (tmp_path / "B.log").read_text()
    assert "resumed from" in text, text[-3000:]  # the restarted workers loaded a checkpoint
    assert f"step-{STEPS:08d}" not in killed_at, "the kill came after training had finished"

    ma = json.loads((tmp_path / "A" / "resume" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "B" / "resume" / "metrics.json").read_text())
    drop = {"seconds"}
    assert {k: v for k, v in ma["test"].items() if k not in drop} == {k: v for k, v in mb["test"].items() if k not in drop}
    assert ma["selected_step"] == mb["selected_step"]
    assert [v for _, v in ma["loss_curve"]] == [v for _, v in mb["loss_curve"]]
    _assert_equal(_final_state(tmp_path / "A" / "resume"), _final_state(tmp_path / "B" / "resume"))
