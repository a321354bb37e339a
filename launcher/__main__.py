"""``python -m launcher <command>``: the user-facing CLI of recsys-dist.

Commands:
  prepare   build WebDataset shards + manifest for a job's dataset
  train     train + evaluate a job on N ranks (torchrun, the deepspeed launcher, or in-process)
  demo      the README's main job: DiffuRec and SASRec on ML-1M, 2 CPU ranks, one table
  compare   every model x dataset under one protocol -> one markdown table (and docs/results.md)
  reproduce one reproduction table (configs/reproduce/<table>.yaml), every row over training seeds
  plan      capacity planner: TorchRec's planner shards the item table over N simulated GPUs
"""

from __future__ import annotations

import argparse
import sys

from launcher import commands
from launcher import plan as plan_cli  # light: torchrec is imported only when planning
from launcher import reproduce as reproduce_cli
from launcher import retest as retest_cli
from recsys_dist.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def job_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML job config, e.g. configs/ml1m_diffurec.yaml")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="config overrides, e.g. train.max_steps=100 model.dim=128")

    p = sub.add_parser("prepare", help="build shards for the job's dataset",
                       description="Read the job's data.source and write seq-v2 WebDataset shards + manifest.json "
                                   "at data.shards_url (default shards_out/<dataset>-v2[-p<prefixes>][-u<users>]); "
                                   "idempotent. Any dataset is a source YAML: docs/data.md.")
    job_args(p)
    p.set_defaults(func=commands.prepare)

    p = sub.add_parser("train", help="train + evaluate a job",
                       description="Train with TorchRec-sharded items + DeepSpeed dense, select on "
                                   "validation, evaluate test once on the full catalog. Outputs go "
                                   "to runs/<name>/ (metrics.json, loss.png, tensorboard/, train.log).")
    job_args(p)
    p.add_argument("--nproc-per-node", type=int, default=2, help="ranks on this node (default 2)")
    p.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic torchrun (default 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (static rendezvous)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="recsys-dist", help="rendezvous job id")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed", "local"], default="torchrun",
                   help="torchrun (default), the deepspeed launcher (--hostfile), or local "
                        "(one in-process rank, for debugging)")
    p.add_argument("--hostfile", default=None,
                   help="deepspeed launcher: MPI-style hostfile ('host slots=N' per line; slots = ranks on that host)")
    p.add_argument("--no-ssh", action="store_true",
                   help="deepspeed launcher: start this node's ranks only (run the same command on every node "
                        "with its --node-rank; needs --hostfile and --master-addr), instead of ssh/pdsh")
    p.add_argument("--master-addr", default=None, help="deepspeed launcher: address of node 0")
    p.add_argument("--master-port", type=int, default=None, help="deepspeed launcher: port on node 0 (default 29500)")
    p.set_defaults(func=commands.train)

    p = sub.add_parser("demo", help="the main job: DiffuRec vs SASRec on ML-1M, 2 CPU ranks",
                       description="Prepare ML-1M, train DiffuRec and SASRec on 2 ranks with the same "
                                   "harness, and print one table of full-catalog HR/NDCG@5/10/20/50 "
                                   "with the popularity ranker. Writes runs/demo/summary.md.")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["diffurec", "sasrec"])
    p.add_argument("--dataset-config", default="ml1m", help="config prefix: configs/<prefix>_<model>.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every model's job")
    p.set_defaults(func=commands.demo)

    p = sub.add_parser("compare", help="train every model on every dataset, one table",
                       description="Run configs/<dataset>_<model>.yaml for each pair on N ranks and "
                                   "write runs/compare/compare.md: full-catalog test HR/NDCG@10/20/50 "
                                   "of the validation-selected state, train time, eval time per 1k users.")
    p.add_argument("--datasets", nargs="+", default=["zhihu", "beauty"])
    p.add_argument("--models", nargs="+",
                   default=["sasrec", "gru4rec", "diffurec", "dreamrec", "dreamrec-gce", "areal", "areal-gce", "dimerec"])
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="reuse runs/<name>/metrics.json when present")
    p.add_argument("--readme", action="store_true", help="also replace the table between the compare markers of docs/results.md")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every job")
    p.set_defaults(func=commands.compare)

    p = sub.add_parser("reproduce", help="one reproduction table: every row over training seeds",
                       description=reproduce_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce_cli.add_arguments(p)
    p.set_defaults(func=reproduce_cli.run)

    p = sub.add_parser("retest", help="test a finished run's selected state again under other eval.* settings",
                       description=retest_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    retest_cli.add_arguments(p)
    p.set_defaults(func=retest_cli.run)

    p = sub.add_parser("plan", help="capacity planner: shard the item table on N simulated GPUs",
                       description=plan_cli.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_cli.add_arguments(p)
    p.set_defaults(func=plan_cli.run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key.sub=value`` overrides may stand anywhere after the command.

    argparse fills a ``nargs="*"`` positional once, at its first chance, so overrides after an
    option (``reproduce ml1m --rows a -- train.lr=1e-3``, ``train --config c --nproc-per-node 1
    model.dim=32``) would be refused as unrecognized; they are appended to the command's
    overrides in order instead. Anything else left over is still a usage error.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # bad job config (file, field, type, override): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2  # argparse's status for a usage error


if __name__ == "__main__":
    sys.exit(main())
