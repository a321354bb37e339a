"""Training and full-catalog evaluation throughput at the official DiffuRec configuration.

Run on 2 ranks (what the README reports):

    torchrun --standalone --nproc-per-node 2 benchmarks/train_eval_throughput.py

Each model is timed in the same job on the same ML-1M shards: training samples/s over
``--steps`` steps (after ``--warmup``), and evaluation users/s for reverse diffusion + exact
full-catalog ranking over ``--eval-users`` test users. The official code's figures on the same
kind of machine (``../shared/reference.md``) are printed side by side; they cannot be re-run
here (no network), so they are quoted, not re-measured. Prints a markdown table on rank 0
and saves ``benchmarks/out/train_eval_throughput.{md,png}``.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import torch

# the official figures (../shared/reference.md), 2 cores, torch 2.13 CPU, 2 threads
REFERENCE = {
    "diffurec": {"label": "official DiffuRec @ f6f70c9", "train": 112.0, "eval": 17.7},
    "sasrec": {"label": "RecBole 1.2.1 SASRec (max_len 200, d 64, 2 blocks)", "train": 124.0, "eval": 910.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["diffurec", "sasrec"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=512, help="reference: 512")
    parser.add_argument("--eval-users", type=int, default=1024)
    parser.add_argument("overrides", nargs="*", help="config overrides for every model")
    args = parser.parse_args()

    from recsys_dist.config import load_config
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.train.distributed import init_distributed, pick_device, seed_everything
    from recsys_dist.train.engine import build_engine
    from recsys_dist.train.loop import make_loader, ensure_shards
    from recsys_dist.train.report import setup_logging
    from recsys_dist.train.step import train_step
    from recsys_dist.train.validate import evaluate_model

    device = pick_device("auto")
    rank, world = init_distributed(device)
    setup_logging(rank)
    rows = []
    for name in args.models:
        # the official DiffuRec ML-1M configuration: d 128, 4 blocks x 4 heads, max_len 50, T 32
        cfg = load_config(f"configs/ml1m_{name}.yaml", ["model.dim=128", "model.num_blocks=4", "model.num_heads=4",
                                                       f"train.batch_size={args.global_batch // world}",
                                                       *args.overrides])
        seed_everything(0)
        manifest = ensure_shards(cfg, rank)
        table = ShardedItemTable.create(int(manifest["num_items"]) + 1, cfg.model.dim, cfg.sparse, device,
                                        cfg.train.batch_size, 0)
        engine = build_engine(build_model(cfg.model, cfg.data.max_len), cfg.train, device)
        loader, _ = make_loader(cfg, manifest, "train", rank, world, True, cfg.train.batch_size)
        batches = list(islice(iter(loader), args.warmup + args.steps))
        for step, b in enumerate(batches):
            if step == args.warmup:
                torch.distributed.barrier()
                t0 = time.perf_counter()
            train_step(engine, table, b["history"].to(device), b["target"].to(device), step, 0)
        torch.distributed.barrier()
        train_sps = args.steps * args.global_batch / (time.perf_counter() - t0)
        cfg.eval.batch_size = 256
        test, _ = make_loader(cfg, manifest, "test", rank, world, False, cfg.eval.batch_size)
        users = ({k: v[b["user"] < args.eval_users] for k, v in b.items()} for b in test)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        metrics = evaluate_model(engine.module, table, users, cfg.eval, cfg.data.max_len)
        eval_ups = metrics["num_users"] / (time.perf_counter() - t0)
        ref = REFERENCE[name]
        rows.append((name, train_sps, eval_ups, ref))
        del engine, table
    if rank == 0:
        lines = [f"2 CPU cores, {world} ranks x 1 thread, torch {torch.__version__}; d 128, 4 blocks x 4 heads, "
                 f"max_len 50, global batch {args.global_batch}, DiffuRec T = 32 reverse steps",
                 "", "| model | recsys-dist train seq/s | reference train seq/s | speed-up | "
                 "recsys-dist eval users/s | reference eval users/s | speed-up | reference |",
                 "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, tr, ev, ref in rows:
            lines.append(f"| {name} | {tr:.0f} | {ref['train']:.0f} | {tr / ref['train']:.1f}x | {ev:.0f} | "
                         f"{ref['eval']:.0f} | {ev / ref['eval']:.1f}x | {ref['label']} |")
        text = "\n".join(lines)
        print(text)
        out = Path("benchmarks/out")
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_eval_throughput.md").write_text(text + "\n")
        _plot(rows, out / "train_eval_throughput.png")


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, idx, key, title in ((axes[0], 1, "train", "train samples/s"), (axes[1], 2, "eval", "eval users/s")):
        names = [r[0] for r in rows]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [r[idx] for r in rows], 0.4, label="recsys-dist")
        ax.bar([i + 0.2 for i in x], [r[3][key] for r in rows], 0.4, label="reference")
        ax.set_xticks(list(x), names)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
