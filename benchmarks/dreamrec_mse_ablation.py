"""Why MSE-only DreamRec stays near random on Zhihu here: the table optimizer and the
architecture details, one process, one table, no sharding.

    PYTHONPATH=. python benchmarks/dreamrec_mse_ablation.py              # the 4 rows in docs/results.md, ~14 min on 2 cores
    PYTHONPATH=. python benchmarks/dreamrec_mse_ablation.py --variants shipped --epochs 5

Every variant trains ``recsys_dist.models.DreamRec`` with the papers' loss (x0 MSE only, no
negatives, CFG p_u 0.1) on Zhihu's train split for ``--epochs`` epochs at batch 256, with the item
table a plain ``nn.Embedding`` initialised N(0, 1) as DreamRec's code does, so that any torch
optimizer can move it (the sharded CPU path offers only fbgemm's fused (row-wise) Adagrad and
SGD). Validation HR@20 / NDCG@20 over every val row, full catalog, 20 DDIM steps with w 2, one
fixed sampling seed. Variants:

- ``shipped``: what ``configs/zhihu_dreamrec.yaml`` trains: dense AdamW lr 1e-3 betas (0.9, 0.98),
  table row-wise Adagrad lr 0.002;
- ``adam``: Adam lr 1e-3 on everything (table included);
- ``adam5e-3``: Adam lr 5e-3 on everything;
- ``official-arch``: ``adam5e-3`` plus DreamRec code's architecture details that ours does not
  share: history embeddings not scaled by sqrt(d), N(0, 1) positional embeddings, a single
  linear layer as the denoiser.

Prints a markdown table of val HR@20 per evaluated epoch and the mean table row norm, and
saves ``benchmarks/out/dreamrec_mse_ablation.{md,png}``. This is a diagnosis, not the trainer:
``python -m launcher train`` is the supported path.
"""

from __future__ import annotations

import argparse
import math
import time
import types
from pathlib import Path

import torch
from torch import nn

VARIANTS = ("shipped", "adam", "adam5e-3", "official-arch")
SEQ_SIZE = 10  # DreamRec's history length


def padded(records, split: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded histories (rows, max_len) long (0 = pad) and targets (rows,) of one split,
    made by the shard reader's own sample rule (shards.samples) from the session records."""
    import numpy as np

    from shards.format import Block
    from shards.samples import block_samples, collate

    blk = Block("all", np.arange(records.num_records), records.offsets, records.items, records.bounds)
    rec, j = block_samples(blk, split, 0, None)
    b = collate([(blk, rec, j)], max_len, False)
    return b["history"], b["target"]


def build(variant: str, num_items: int, max_len: int, dim: int):
    """(model, table, optimizers) of ``variant``; draws from the global torch RNG in a fixed order."""
    from recsys_dist.models.dreamrec import DreamRec

    model = DreamRec(dim, max_len, 1, 1, 0.1, 0.1, 1000, "linear", 0.1, 2.0, 20, 0.0)
    if variant == "official-arch":
        def unscaled_guidance(self, hist, mask):
            x = self.drop(hist + self.pos.weight[-hist.shape[1]:][None]) * mask[..., None]
            return self.encoder(x, mask)[:, -1]
        model.guidance = types.MethodType(unscaled_guidance, model)
        nn.init.normal_(model.pos.weight, std=1.0)
        model.denoiser = nn.Sequential(nn.Linear(3 * dim, dim))
    table = nn.Embedding(num_items + 1, dim)
    nn.init.normal_(table.weight, std=1.0)
    with torch.no_grad():
        table.weight[0] = 0
    everything = list(model.parameters()) + list(table.parameters())
    if variant == "shipped":
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0),
                RowWiseAdagrad(table.parameters(), lr=0.002)]
    elif variant == "adam":
        opts = [torch.optim.Adam(everything, lr=1e-3)]
    elif variant in ("adam5e-3", "official-arch"):
        opts = [torch.optim.Adam(everything, lr=5e-3)]
    else:
        raise ValueError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    return model, table, opts


@torch.no_grad()
def evaluate(model, table: nn.Embedding, hist: torch.Tensor, target: torch.Tensor, k: int = 20) -> tuple[float, float]:
    """Full-catalog HR@k, NDCG@k in %, by the project's evaluator (one process, the whole table)."""
    from recsys_dist.eval import MetricAccumulator, rank_targets

    model.eval()
    gen = torch.Generator().manual_seed(123)
    acc = MetricAccumulator((k,))
    for i in range(0, len(hist), 1024):
        h, t = hist[i:i + 1024], target[i:i + 1024]
        mask = h > 0
        x0 = model.infer(table(h) * mask[..., None], mask, model.draw_eval_noise(len(h), h.shape[1], gen))
        acc.update(rank_targets(x0, t, table.weight, 0, table.num_embeddings, ks=(k,)))
    model.train()
    metrics = acc.compute()
    return 100 * metrics[f"HR@{k}"], 100 * metrics[f"NDCG@{k}"]


def run(variant: str, data, epochs: int, eval_every: int, seed: int, batch: int) -> list[dict]:
    torch.manual_seed(seed)
    htr, ttr = padded(data, "train", SEQ_SIZE)
    hva, tva = padded(data, "valid", SEQ_SIZE)
    model, table, opts = build(variant, data.num_items, SEQ_SIZE, 64)
    gen = torch.Generator().manual_seed(seed)
    rows, t0 = [], time.time()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(htr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            h, t = htr[idx], ttr[idx]
            mask = h > 0
            loss = model(table(h) * mask[..., None], mask, table(t), model.draw_noise(len(h), h.shape[1], gen))
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            with torch.no_grad():
                table.weight[0] = 0
            total += loss.item()
        if epoch % eval_every == 0 or epoch == epochs:
            hr, nd = evaluate(model, table, hva, tva)
            rows.append({"variant": variant, "epoch": epoch, "loss": total / math.ceil(len(perm) / batch),
                         "hr20": hr, "ndcg20": nd, "norm": float(table.weight[1:].detach().norm(dim=1).mean()),
                         "seconds": time.time() - t0})
            print(f"{variant:14s} epoch {epoch:3d}  loss {rows[-1]['loss']:.4f}  val HR@20 {hr:.2f}  "
                  f"NDCG@20 {nd:.2f}  row norm {rows[-1]['norm']:.3f}  {rows[-1]['seconds']:.0f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="dataset root (default: $RECSYS_DATA_DIR or ../shared/datasets)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()

    from recsys_dist.config import load_config
    from shards.source import load_records
    from _common import machine_info  # benchmarks/_common.py (the script's folder is on sys.path)

    data = load_records(load_config(str(Path(__file__).parent.parent / "configs/datasets/zhihu.yaml")).data.source,
                        args.data_dir)
    rows = [r for v in args.variants for r in run(v, data, args.epochs, args.eval_every, args.seed, args.batch_size)]
    epochs = sorted({r["epoch"] for r in rows})
    info = machine_info()
    lines = [f"MSE-only DreamRec on Zhihu, val HR@20 % (random 0.41) by epoch; {info['cpu']}, {info['cores']} cores, "
             f"torch {info['torch']}, seed {args.seed}", "",
             "| variant | " + " | ".join(f"ep {e}" for e in epochs) + " | row norm at end | s |",
             "|---|" + "---:|" * (len(epochs) + 2)]
    for v in args.variants:
        mine = {r["epoch"]: r for r in rows if r["variant"] == v}
        last = mine[max(mine)]
        lines.append(f"| {v} | " + " | ".join(f"{mine[e]['hr20']:.2f}" if e in mine else "" for e in epochs)
                     + f" | {last['norm']:.2f} | {last['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dreamrec_mse_ablation.md").write_text(table + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in args.variants:
        mine = [r for r in rows if r["variant"] == v]
        ax.plot([r["epoch"] for r in mine], [r["hr20"] for r in mine], marker="o", label=v)
    ax.axhline(0.41, color="grey", linestyle=":", label="random (0.41)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val HR@20 (%)")
    ax.set_title("MSE-only DreamRec, Zhihu")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dreamrec_mse_ablation.png", dpi=120)


if __name__ == "__main__":
    main()
