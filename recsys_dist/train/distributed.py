"""Process-group set-up: backend and device chosen from the hardware.

The one device rule for collectives: on CPU the group is gloo; on GPU it is
``cpu:gloo,cuda:nccl`` (:func:`process_group_backend`), so CUDA tensors (table lookups, dense
gradients, eval scores) go through NCCL and small CPU bookkeeping tensors (batch flags, error
flags, counters) through gloo. An NCCL-only group would reject the latter.
"""

from __future__ import annotations

import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> cuda:<LOCAL_RANK> when CUDA is present, else cpu."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(requested)


def process_group_backend(device: torch.device) -> str:
    """The backend string for a job on ``device``: ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` on
    CUDA (every collective accepts CPU and CUDA tensors alike)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def backend_device_types(backend: str) -> set[str]:
    """Device types a backend string serves: ``"gloo"`` -> {cpu}, ``"nccl"`` -> {cuda},
    ``"cpu:gloo,cuda:nccl"`` -> {cpu, cuda}."""
    if ":" not in backend:
        return {"gloo": {"cpu"}, "nccl": {"cuda"}}.get(backend.lower(), set())
    return {part.split(":", 1)[0].strip() for part in backend.split(",")}


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _elastic_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store keyed by the restart attempt.

    torchrun keeps one store across elastic restarts; the gloo process group of a restarted
    worker would read the addresses of the previous attempt's (dead) workers from it and fail
    to connect. A per-attempt prefix gives every attempt a clean namespace."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"recsys-dist/attempt-{attempt}", store)


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that torchrun / the deepspeed launcher describe in the
    environment; a plain ``python`` run becomes a 1-rank group on a free local port.

    Returns (rank, world_size). A collective that waits longer than ``timeout_s`` raises
    instead of hanging, so a dead or stuck rank is reported.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = process_group_backend(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _elastic_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (dense init is the same on every rank and world size)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a detached tensor over ranks (for logging)."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x
