"""Known-harmless third-party warnings are dropped by logger and message; anything else from the
same libraries still reaches the log."""

import logging
import warnings


def test_known_noise_is_dropped_and_other_warnings_pass(tmp_path, caplog):
    from recsys_dist.train.report import KNOWN_NOISE, setup_logging

    setup_logging(0, tmp_path)
    for name, prefix in KNOWN_NOISE:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        logger.warning(prefix + " (test)")
    logging.getLogger("torchrec.distributed.planner.types").warning("a real planner problem")
    for h in logging.getLogger().handlers:
        h.flush()
    text = (tmp_path / "train.log").read_text()
    assert "a real planner problem" in text
    assert not any(prefix in text for _, prefix in KNOWN_NOISE), text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from recsys_dist.train.report import quiet_known_noise
        quiet_known_noise()
        warnings.warn("HeuristicalStorageReservation is known to cause issues", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def test_known_prints_are_dropped_and_other_lines_pass(capsys):
    from recsys_dist.train.report import KNOWN_PRINTS, known_prints_dropped

    with known_prints_dropped():
        print("before")
        for line in KNOWN_PRINTS:
            print(line)
        print("a real message", end="")
        print(" continued")
        print("no newline at the end", end="")
    assert capsys.readouterr().out == "before\na real message continued\nno newline at the end"


def test_building_an_engine_prints_nothing():
    """DeepSpeed's engine set-up on CPU (a 1-rank gloo group, in a fresh process so this one
    keeps no process group) writes nothing to stdout: its shm-op line is dropped."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch\n"
            "from recsys_dist.config import TrainConfig\n"
            "from recsys_dist.distributed import init_distributed\n"
            "from recsys_dist.train.engine import build_engine\n"
            "init_distributed(torch.device('cpu'))\n"
            "build_engine(torch.nn.Linear(4, 4), TrainConfig(batch_size=2), torch.device('cpu'))\n"
            "print('engine ready')\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1:] == ["engine ready"]
    assert "built successfully" not in out.stdout, out.stdout
