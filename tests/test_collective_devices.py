"""The one device rule for collectives: a GPU job's process group takes CPU tensors too.

Small bookkeeping tensors (the eval batch flag, error flags, the lookup-call count, the
popularity block) live on the CPU. An NCCL-only group rejects CPU tensors, so the first
multi-rank GPU validation would fail; the trainer's GPU group is ``cpu:gloo,cuda:nccl``.
No GPU here: this checks the rule the trainer applies, and that every collective tensor a
2-rank CPU job sends is one the GPU job's group would accept.
"""

from __future__ import annotations

import torch

from recsys_dist.distributed import backend_device_types, process_group_backend


def test_gpu_group_serves_cpu_and_cuda_tensors() -> None:
    served = backend_device_types(process_group_backend(torch.device("cuda")))
    assert {"cpu", "cuda"} <= served
    assert backend_device_types(process_group_backend(torch.device("cpu"))) == {"cpu"}
    assert backend_device_types("nccl") == {"cuda"}  # what the trainer used before: no CPU tensors


def test_collective_device_of_a_device_keyed_group() -> None:
    """collective_device() must read a device-keyed backend string as serving CPU."""
    import torch.distributed as dist

    from recsys_dist.distributed import collective_device

    store = dist.HashStore()
    dist.init_process_group("cpu:gloo", store=store, rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cpu")
        flag = torch.ones(1, device=collective_device())
        dist.all_reduce(flag)  # a CPU bookkeeping tensor on a device-keyed group
        assert flag.item() == 1
    finally:
        dist.destroy_process_group()
