"""A bad job config on the command line is one line on stderr and exit status 2, never a traceback,
and nothing is launched (the config is checked before torchrun or any training starts)."""

import os
import subprocess
import sys

import pytest

from recsys_dist.config import REPO_ROOT

JOB = "configs/ml1m_diffurec.yaml"


def run_launcher(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, names", [
    (["train", "--config", "/nonexistent.yaml", "--launcher", "local"], ["config file not found", "/nonexistent.yaml"]),
    (["train", "--config", JOB, "train.nosuch=1"], ["unknown config field 'train.nosuch'", "known: ", "max_steps"]),
    (["train", "--config", JOB, "--launcher", "local", "train.max_steps=abc"],
     ["config field 'train.max_steps' expects int, got 'abc' (str)"]),
    (["train", "--config", JOB, "eval.mask_history=1"], ["config field 'eval.mask_history' expects bool"]),
    (["train", "--config", JOB, "train.betas=[0.9]"], ["config field 'train.betas' expects tuple[float, float]"]),
    (["train", "--config", JOB, "train.max_steps=[1,"], ["override 'train.max_steps=[1,': malformed value"]),
    (["train", "--config", JOB, "oops"], ["override 'oops' is not of the form key.sub=value"]),
])
def test_bad_config_is_one_line_and_exit_2(argv, names):
    proc = run_launcher(*argv)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(n in lines[0] for n in names), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""  # nothing launched, nothing trained


def test_demo_and_compare_report_config_errors_the_same_way(capsys):
    from launcher.__main__ import main

    # each of these fails while loading the first job's config, before any job is launched
    assert main(["demo", "--dataset-config", "nosuch"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: config file not found: {REPO_ROOT / 'configs' / 'nosuch_diffurec.yaml'}")
    assert main(["demo", "train.max_steps=abc"]) == 2
    assert capsys.readouterr().err.strip() == "error: config field 'train.max_steps' expects int, got 'abc' (str)"
    assert main(["compare", "--datasets", "zhihu", "--models", "sasrec", "--", "model.dim=big"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config field 'model.dim' expects int, got 'big'" in err


def test_overrides_may_follow_options_and_a_double_dash():
    """argparse fills a ``nargs="*"`` positional once: overrides after an option used to be refused."""
    from launcher.__main__ import parse_args

    args = parse_args(["reproduce", "ml1m", "--rows", "sasrec-allpos", "--seeds", "0", "--", "checkpoint.every=240"])
    assert (args.table, args.rows, args.seeds, args.overrides) == ("ml1m", ["sasrec-allpos"], ["0"], ["checkpoint.every=240"])
    args = parse_args(["train", "--config", JOB, "model.dim=32", "--nproc-per-node", "1", "train.lr=0.1"])
    assert (args.nproc_per_node, args.overrides) == (1, ["model.dim=32", "train.lr=0.1"])  # in the order given
    with pytest.raises(SystemExit) as e:  # a stray word is still a usage error
        parse_args(["reproduce", "ml1m", "--rows", "a", "--", "oops"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):  # plan takes no overrides
        parse_args(["plan", "--items", "10", "x.y=1"])
