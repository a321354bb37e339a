"""Run a function on N real processes (torch.multiprocessing forkserver, gloo) and collect results.

Each worker gets the env a torchrun agent would set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and one intra-op thread. A worker's exception is re-raised in the
parent with the worker's traceback, and a worker that dies without reporting fails the run.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_host(value: Any) -> Any:
    """Tensors -> numpy arrays (pickled by value: a tensor in a queue is shared through a file
    descriptor that dies with the worker)."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, env: dict) -> None:
    os.environ.clear()  # the caller's environment now, not the forkserver's at its start
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", _to_host(fn(*args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


# Workers fork from one forkserver that has imported these once per test session: a spawned
# process importing torch + torchrec took 4-5 s here (0.1 s forked), and the suite starts a few
# hundred. The forkserver only imports, so forking it is safe; each worker still starts its own
# process group and RNG, and takes the caller's environment as it is at the call (tests set
# credentials and endpoints with monkeypatch). What a preloaded module reads from the
# environment at import time is frozen at the forkserver's start: recsys_dist reads it only
# when called. On a CUDA build of torch, importing fbgemm_gpu queries the driver, and a CUDA
# context must not be forked: there the workers are spawned, as before.
PRELOAD = ["torch", "torch.distributed", "torchrec", "recsys_dist.sparse", "recsys_dist.train.engine"]


def _context():
    import torch

    if torch.version.cuda:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` processes; return the per-rank results in rank order.
    ``timeout_s`` bounds the whole run (every rank's report), not each report."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ))) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    import queue as queue_mod
    import time
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
                break
            results[rank] = value
    except queue_mod.Empty:
        errors.append(f"timed out after {timeout_s}s waiting for ranks {sorted(set(range(world_size)) - set(results))}")
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (0, None)]
    if bad:
        raise AssertionError(f"workers exited abnormally (rank, exitcode): {bad}")
    return [results[r] for r in range(world_size)]


def synth_shards(out, num_items: int, num_users: int, records_per_block: int, num_interests: int):
    """Write a small synthetic shard set (``python -m shards synth``, 2 blocks a shard) to ``out``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "shards", "synth", "--out", str(out), "--num-items", str(num_items),
                    "--num-users", str(num_users), "--records-per-block", str(records_per_block), "--blocks-per-shard", "2",
                    "--num-interests", str(num_interests), "--no-progress"], cwd=root, check=True,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=str(root)))
    return out
