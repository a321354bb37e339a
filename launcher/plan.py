"""``python -m launcher plan``: the capacity planner's command line (options and printing).

The planning -- the trainer's item table on the meta device, TorchRec's planner on a
simulated topology, the report -- is ``recsys_dist.sparse.planner``; the sharding and
optimizer choices are the trainer's own (``recsys_dist.sparse.spec``). torchrec is imported
only when planning, so building the launcher's parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys

from recsys_dist.sparse.planner import (DEFAULT, DTYPE_BYTES, PlanDoesNotFit, PlanError,
                                        format_plan, parse_count, parse_size, plan_capacity)
from recsys_dist.sparse.spec import FUSED_OPTIMIZERS, SHARDED


def _arg(parse):
    """Wrap a parser so argparse reports its ValueError message."""
    def inner(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    inner.__name__ = parse.__name__
    return inner


DESCRIPTION = """\
Plan the item table on a simulated GPU cluster with TorchRec's planner (meta tensors: nothing
is allocated) and print the sharding plan, per-rank memory (weights, optimizer, buffers) and
the estimated lookup and all-to-all cost per batch. Exits 1, saying why, if it does not fit.

example: python -m launcher plan --items 1_000_000_000 --dim 128 --gpus 64 --gpu-mem 80GiB
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's options."""
    p.add_argument("--items", type=_arg(parse_count), required=True,
                   help="catalog size N (1_000_000_000 and 1e9 work); the table has N+1 rows")
    p.add_argument("--dim", type=_arg(parse_count), required=True, help="embedding dim d")
    p.add_argument("--gpus", type=_arg(parse_count), required=True, help="world size W")
    p.add_argument("--gpu-mem", type=_arg(parse_size), required=True,
                   help="HBM per GPU: 80GiB, 80GB (=10^9 bytes), 81920MiB")
    p.add_argument("--gpus-per-node", type=_arg(parse_count), default=8,
                   help="GPUs per node (default 8): sets intra- vs inter-node all-to-all cost")
    p.add_argument("--host-mem", type=_arg(parse_size), default=None,
                   help="host DRAM per node (default: TorchRec's 128GiB per GPU); the fused "
                        "kernel keeps the table in HBM, so this is reported, not used")
    p.add_argument("--batch-size", type=_arg(parse_count), default=512,
                   help="samples per rank per step (default 512)")
    p.add_argument("--ids-per-sample", "--pooling", type=float, default=50.0,
                   help="item ids each sample looks up, i.e. the history length (default 50)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp32",
                   help="table weight dtype (default fp32)")
    p.add_argument("--optimizer", choices=list(FUSED_OPTIMIZERS), default=DEFAULT.optimizer,
                   help=f"fused sparse optimizer (default {DEFAULT.optimizer}, the project's)")
    p.add_argument("--sharding", choices=list(SHARDED), default=DEFAULT.sharding,
                   help=f"sharding type (default {DEFAULT.sharding}, the project's)")
    p.add_argument("--reserve", type=float, default=0.15,
                   help="fraction of HBM held back for the dense model, activations and CUDA "
                        "context (default 0.15, TorchRec's)")
    p.add_argument("--intra-host-bw", type=float, default=None,
                   help="GiB/s per GPU within a node (default TorchRec's 600)")
    p.add_argument("--inter-host-bw", type=float, default=None,
                   help="GiB/s per GPU across nodes (default TorchRec's 12.5)")
    p.add_argument("--show-plan", action="store_true",
                   help="also print TorchRec's sharding plan (one line per shard)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 with the report on stdout, 1 (reason on stderr) if it does not fit."""
    try:
        plan = plan_capacity(
            args.items, args.dim, args.gpus, args.gpu_mem, gpus_per_node=args.gpus_per_node,
            host_mem=args.host_mem, batch_size=args.batch_size,
            ids_per_sample=args.ids_per_sample, dtype=args.dtype, optimizer=args.optimizer,
            sharding=args.sharding, reserve=args.reserve, intra_host_bw=args.intra_host_bw,
            inter_host_bw=args.inter_host_bw)
    except PlanDoesNotFit as err:
        if args.json:
            print(json.dumps({"fits": False, "reason": str(err),
                              "need_per_rank_bytes": err.need_per_rank,
                              "available_per_rank_bytes": err.available_per_rank,
                              "min_gpus": err.min_gpus}, indent=2))
        print(f"plan refused: {err}", file=sys.stderr)
        return 1
    except (PlanError, ValueError) as err:
        print(f"plan failed: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(format_plan(plan, show_plan=args.show_plan))
    return 0
