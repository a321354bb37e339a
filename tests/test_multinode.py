"""A real 2-node job on this machine: two launcher agents on 127.0.0.1 meet at a c10d
rendezvous (one worker each), train and evaluate to completion, and report the same metrics as
a 2-process single-node run of the same config.

Why equal: in both runs the world is 2 gloo ranks; which process becomes rank 0 decides only
which rank's data it reads, and every number (global batch order, noise streams, all-reduced
metrics) is keyed by rank, not by node. Tolerance: none on HR (counts); NDCG to 1e-9.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import LAUNCH_JOB as JOB
from recsys_dist.config import REPO_ROOT


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_two_nodes_c10d_match_single_node(launch_shards, torchrun_reference, tmp_path):
    synth = launch_shards
    endpoint = f"127.0.0.1:{_port()}"
    nodes = []
    for node in range(2):
        # each "node" writes its own output dir, as separate machines would
        cmd = [sys.executable, "-m", "launcher", "train", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "two-node-test", *JOB,
               f"data.shards_url={synth}", f"output_dir={tmp_path / f'node{node}'}"]
        nodes.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-3000:]
    assert sum("--rdzv-backend=c10d" in out for out in outputs) == 2

    written = [d for d in ("node0", "node1") if (tmp_path / d / "job" / "metrics.json").exists()]
    assert len(written) == 1, written  # only global rank 0 writes the report
    two = json.loads((tmp_path / written[0] / "job" / "metrics.json").read_text())
    one = torchrun_reference
    assert two["world_size"] == one["world_size"] == 2
    for key in ("test", "popularity_test"):
        for metric, value in one[key].items():
            if metric == "seconds":
                continue
            assert two[key][metric] == pytest.approx(value, abs=1e-9), (key, metric)
    assert [v for _, v in two["loss_curve"]] == pytest.approx([v for _, v in one["loss_curve"]], abs=1e-6)
