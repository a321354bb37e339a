"""Worker entry point, one process per rank: ``torchrun ... -m recsys_dist.train --config X k=v``.

Use ``python -m launcher train`` to get the launch (torchrun / deepspeed / single process) done
for you; this module is what each rank runs.
"""

from __future__ import annotations

import argparse
import json

from recsys_dist.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_dist.train",
                                     description="Train + evaluate one job on this rank.")
    parser.add_argument("--config", help="YAML job config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK (env) is what is used
    args = parser.parse_args(argv)
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is a hung rank?
    cfg = load_config(args.config, args.overrides)
    if cfg.model.name == "diffrec":  # per-user interaction sets, N-wide layers in the item table
        from recsys_dist.train.diffrec_job import fit
    else:
        from recsys_dist.train.trainer import fit
    result = fit(cfg)
    from recsys_dist.distributed import rank_and_world, shutdown
    if rank_and_world()[0] == 0:
        print(json.dumps({"test": result["test"], "popularity_test": result["popularity_test"]}))
    shutdown()
    return 0


if __name__ == "__main__":
    from recsys_dist.distributed import exit_without_finalization
    exit_without_finalization(main())
