import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")


# --------------------------------------------------------------------------- S3-protocol server

import pytest  # noqa: E402

_S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
                "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's, in a thread of this process) on 127.0.0.1 at a free port.

    For the session the standard AWS variables point at it (``AWS_ENDPOINT_URL``, dummy
    credentials, ``AWS_DEFAULT_REGION``; profiles and ``~/.aws`` files are masked), in
    ``os.environ`` itself so that spawned processes inherit them; they are restored at the
    end. Clients talk to it over TCP (no in-process mocking). Yields an object with
    ``endpoint``, ``host``, ``port`` and ``bucket`` (created empty).
    """
    import logging
    from types import SimpleNamespace

    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV_KEYS}
    for k in _S3_ENV_KEYS:
        os.environ.pop(k, None)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    bucket = "recsys-test"
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield SimpleNamespace(endpoint=endpoint, host=host, port=port, bucket=bucket)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


# --------------------------------------------------------------------------- launch tests' job

#: the small SASRec job the launch tests run (torchrun multi-node, the deepspeed launcher)
LAUNCH_JOB = ["--config", "configs/models/sasrec.yaml", "data.dataset=synthetic", "data.build_if_missing=false",
              "data.max_len=10", "model.dim=16", "model.num_blocks=1", "train.batch_size=16", "train.max_steps=24",
              "train.log_every=6", "eval.batch_size=64", "checkpoint.enabled=false", "name=job"]


@pytest.fixture(scope="session")
def launch_shards(tmp_path_factory):
    """Synthetic shards of the launch tests (300 items, 200 users)."""
    from distributed_harness import synth_shards
    return synth_shards(tmp_path_factory.mktemp("launch") / "shards", 300, 200, 40, 15)


@pytest.fixture(scope="session")
def torchrun_reference(launch_shards, tmp_path_factory):
    """metrics.json of LAUNCH_JOB on one node x 2 torchrun ranks: what every launch must match."""
    import json
    import subprocess

    out = tmp_path_factory.mktemp("torchrun-reference")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "launcher", "train", "--nproc-per-node", "2", *LAUNCH_JOB,
                        f"data.shards_url={launch_shards}", f"output_dir={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((out / "job" / "metrics.json").read_text())
    # the worker leaves with os._exit: what rank 0 printed must still reach a pipe, whole
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    assert printed["test"] == metrics["test"] and printed["popularity_test"] == metrics["popularity_test"]
    return metrics
