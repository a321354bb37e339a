"""Training and full-catalog evaluation throughput, each model at its official code's configuration.

Run on 2 ranks (what docs/benchmarks.md reports):

    torchrun --standalone --nproc-per-node 2 benchmarks/train_eval_throughput.py

Each model is timed in the same job (DiffuRec and SASRec on ML-1M at the official DiffuRec
configuration: d 128, 4 blocks x 4 heads, max_len 50, global batch 512, T 32; DreamRec on Zhihu
at the official DreamRec configuration: d 64, global batch 256, T 1000 linear, 20 DDIM steps
with classifier-free guidance at eval, = ``configs/zhihu_dreamrec.yaml``): training samples/s over
``--steps`` steps (after ``--warmup``), and evaluation users/s for reverse diffusion + exact
full-catalog ranking over ``--eval-users`` test users. The official code's figures on the same
kind of machine (``../shared/reference.md``) are printed side by side; they cannot be re-run
here (no network), so they are quoted, not re-measured, and no ratio is printed: a figure from
another machine is not a baseline. Prints a markdown table on rank 0
and saves ``benchmarks/out/train_eval_throughput.{md,png}``.
"""

from __future__ import annotations

import argparse
import os
import time
from itertools import islice
from pathlib import Path

import torch

# the official figures (../shared/reference.md), 2 cores, torch 2.13 CPU, 2 threads, and the
# configuration each was measured at (config file + overrides, global batch)
OFFICIAL_DIFFUREC = ["model.dim=128", "model.num_blocks=4", "model.num_heads=4"]
REFERENCE = {
    "diffurec": {"label": "official DiffuRec @ f6f70c9", "train": 112.0, "eval": 17.7,
                 "config": "configs/ml1m_diffurec.yaml", "overrides": OFFICIAL_DIFFUREC, "global_batch": 512,
                 "setting": "ML-1M, d 128, 4x4 blocks, max_len 50, T 32"},
    "sasrec": {"label": "RecBole 1.2.1 SASRec (max_len 200, d 64, 2 blocks)", "train": 124.0, "eval": 910.0,
               "config": "configs/ml1m_sasrec.yaml", "overrides": OFFICIAL_DIFFUREC, "global_batch": 512,
               "setting": "ML-1M, d 128, 4x4 blocks, max_len 50"},
    # eval: reference.md gives ~3,700-4,000 users/s; the lower end is quoted
    "dreamrec": {"label": "official DreamRec @ f77206d", "train": 3717.0, "eval": 3700.0,
                 "config": "configs/zhihu_dreamrec.yaml", "overrides": [], "global_batch": 256,
                 "setting": "Zhihu, d 64, T 1000, 20 DDIM steps x 2 (CFG)",
                 "steps": 200, "eval_users": 8192},  # ~0.03 s a step: more steps, every test row
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REFERENCE), choices=list(REFERENCE))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20; DreamRec 200)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=None,
                        help="samples per step over all ranks (default: each model's official batch, 512 or 256)")
    parser.add_argument("--eval-users", type=int, default=None,
                        help="test users timed (default: 1024; DreamRec every Zhihu test row)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every model")
    args = parser.parse_args()

    from recsys_dist.config import load_config
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import init_distributed, pick_device, seed_everything
    from recsys_dist.train.engine import build_engine
    from recsys_dist.train.data import ensure_shards, make_loader
    from recsys_dist.train.report import setup_logging
    from recsys_dist.train.step import train_step
    from recsys_dist.train.validate import evaluate_model

    device = pick_device("auto")
    rank, world = init_distributed(device)
    setup_logging(rank)
    rows = []
    for name in args.models:
        ref = REFERENCE[name]
        global_batch = args.global_batch or ref["global_batch"]
        steps, eval_users = args.steps or ref.get("steps", 20), args.eval_users or ref.get("eval_users", 1024)
        cfg = load_config(ref["config"], [*ref["overrides"], f"train.batch_size={global_batch // world}",
                                          *args.overrides])
        seed_everything(0)
        manifest = ensure_shards(cfg, rank)
        table = ShardedItemTable.create(int(manifest["num_items"]) + 1, cfg.model.dim, cfg.sparse, device,
                                        cfg.train.batch_size, 0)
        engine = build_engine(build_model(cfg.model, cfg.data.max_len), cfg.train, device)
        loader, _ = make_loader(cfg, manifest, "train", rank, world, True, cfg.train.batch_size)
        batches = list(islice(iter(loader), args.warmup + steps))
        for step, b in enumerate(batches):
            if step == args.warmup:
                torch.distributed.barrier()
                t0 = time.perf_counter()
            train_step(engine, table, b["history"].to(device), b["target"].to(device), step, 0)
        torch.distributed.barrier()
        # the samples actually processed: an epoch may hold fewer than warmup + steps batches
        timed = len(batches) - args.warmup
        if timed < steps and rank == 0:
            print(f"{name}: the train split gives {len(batches)} batches a rank; timed {timed} steps, not {steps}")
        train_sps = timed * global_batch / (time.perf_counter() - t0)
        steps = timed
        cfg.eval.batch_size = 256
        test, _ = make_loader(cfg, manifest, "test", rank, world, False, cfg.eval.batch_size)
        users = ({k: v[b["user"] < eval_users] for k, v in b.items()} for b in test)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        metrics = evaluate_model(engine.module, table, users, cfg.eval, cfg.data.max_len)
        eval_ups = metrics["num_users"] / (time.perf_counter() - t0)
        rows.append((name, train_sps, eval_ups, ref, global_batch, steps, metrics["num_users"]))
        del engine, table
    if rank == 0:
        lines = [f"{os.cpu_count()} CPU cores, {world} ranks x 1 thread, torch {torch.__version__}; "
                 f"timed steps after {args.warmup} warm-up steps",
                 "", "No ratio was measured: the official code did not run in this job. The quoted figures come "
                 "from another machine of the same kind (../shared/reference.md), and machines of one kind differ "
                 "2-3x in speed, so they are context, not a baseline.",
                 "", "| model | setting | global batch | timed steps | test users | recsys-dist train seq/s | "
                 "quoted train seq/s (other machine) | recsys-dist eval users/s | quoted eval users/s (other machine) "
                 "| quoted code |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, tr, ev, ref, gb, st, nu in rows:
            lines.append(f"| {name} | {ref['setting']} | {gb} | {st} | {nu} | {tr:.0f} | {ref['train']:.0f} | "
                         f"{ev:.0f} | {ref['eval']:.0f} | {ref['label']} |")
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
        ax.bar([i + 0.2 for i in x], [r[3][key] for r in rows], 0.4, label="quoted (other machine)")
        ax.set_xticks(list(x), names)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
