"""The deepspeed launcher as users run it: one node with 2 CPU ranks, and two "nodes" on
127.0.0.1 started without ssh (``--no-ssh --node-rank i --master-addr``, DeepSpeed's no-ssh
mode), each ending with the same metrics as the torchrun run of the same config (the world is 2
gloo ranks in all three; every number is keyed by global rank, not by launcher or node).
Launcher mistakes (missing or malformed hostfile, a wrong slot count, --no-ssh without its
node rank) end as one line and exit status 2 before anything starts.
"""

import json
import os
import socket
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import LAUNCH_JOB as JOB
from recsys_dist.config import REPO_ROOT, ConfigError


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def _launch(args, out, synth):
    return subprocess.Popen([sys.executable, "-m", "launcher", "train", *args, *JOB, f"data.shards_url={synth}",
                             f"output_dir={out}"], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _metrics(out):
    return json.loads((out / "job" / "metrics.json").read_text())


def _same(a, b):
    assert a["world_size"] == b["world_size"] == 2
    for key in ("test", "popularity_test"):
        for metric, value in a[key].items():
            if metric != "seconds":
                assert b[key][metric] == pytest.approx(value, abs=1e-9), (key, metric)
    assert [v for _, v in b["loss_curve"]] == pytest.approx([v for _, v in a["loss_curve"]], abs=1e-6)


@pytest.mark.slow
def test_deepspeed_one_node_and_two_nodes_without_ssh_match_torchrun(launch_shards, torchrun_reference, tmp_path):
    synth = launch_shards
    one = _launch(["--launcher", "deepspeed", "--nproc-per-node", "2"], tmp_path / "ds1", synth)
    out = one.communicate(timeout=600)[0]
    assert one.returncode == 0, out[-3000:]
    assert "deepspeed.launcher.runner" in out
    _same(torchrun_reference, _metrics(tmp_path / "ds1"))

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [_launch(["--launcher", "deepspeed", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(i),
                      "--master-addr", "127.0.0.1", "--master-port", str(port)], tmp_path / f"node{i}", synth)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, o in zip(nodes, outs):
        assert p.returncode == 0, o[-3000:]
    assert (tmp_path / "node0" / "job" / "metrics.json").exists()
    assert not (tmp_path / "node1" / "job" / "metrics.json").exists()  # only global rank 0 reports
    _same(torchrun_reference, _metrics(tmp_path / "node0"))


def _args(**kw):
    base = dict(launcher="deepspeed", hostfile=None, no_ssh=False, node_rank=None, master_addr=None, master_port=None)
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("text,kw,match", [
    (None, {"hostfile": "/nonexistent/hostfile"}, "no such file"),
    ("node0 slots=0\n", {}, "expected 'HOST slots=N'"),
    ("node0 slots=two\n", {}, "expected 'HOST slots=N'"),
    ("node0\n", {}, "expected 'HOST slots=N'"),
    ("node0 slots=1\nnode0 slots=1\n", {}, "listed twice"),
    ("# nothing\n", {}, "no hosts"),
    ("node0 slots=1\nnode1 slots=1\n", {"no_ssh": True, "node_rank": 0}, "needs --hostfile"),
    ("node0 slots=1\nnode1 slots=1\n", {"no_ssh": True, "node_rank": 2, "master_addr": "h"}, "not a node"),
])
def test_launcher_mistakes_are_one_clear_line(tmp_path, text, kw, match):
    from launcher.commands import check_deepspeed_args

    if text is not None:
        (tmp_path / "hostfile").write_text(text)
        kw = {"hostfile": str(tmp_path / "hostfile"), **kw}
    with pytest.raises(ConfigError, match=match):
        check_deepspeed_args(_args(**kw))


def test_a_launcher_mistake_exits_2_with_one_line(tmp_path):
    (tmp_path / "hostfile").write_text("node0 slots=0\n")
    p = subprocess.run([sys.executable, "-m", "launcher", "train", "--launcher", "deepspeed", "--hostfile",
                        str(tmp_path / "hostfile"), *JOB], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "slots=N" in lines[0], p.stderr
