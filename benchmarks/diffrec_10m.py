"""L-DiffRec (or DiffRec) on a 10M-item synthetic catalog, 2 ranks: does the sharded placement
fit, and what does each rank hold?

    PYTHONPATH=. python benchmarks/diffrec_10m.py                       # L-DiffRec, 10M items, 2 ranks
    PYTHONPATH=. python benchmarks/diffrec_10m.py --variant diffrec     # DiffRec
    PYTHONPATH=. python benchmarks/diffrec_10m.py --items 1000000 --steps 3   # smaller

L-DiffRec (``configs/ml1m-diffrec_ldiffrec.yaml`` with ``diffrec.ae_dims=[width]``): the item
table holds each item's cluster-encoder weights (2 x its cluster's latent share) and its decoder
row (latent + bias); the diffusion runs on the latent. Items are clustered by k-means (2
clusters, at most 20 Lloyd iterations here) on random 4-d item embeddings.

A dense DiffRec at N = 10M needs its first and last layers as two 10M x h matrices (with
h = 64: 5.1 GB of fp32 weights, plus Adam's 10.2 GB of moments, on every data-parallel rank).
Here they are rows of the row-wise sharded item table (``recsys_dist/sparse/wide.py``): each of
W ranks holds N / W rows of [W_in | W_out | b_out] and their row-wise Adagrad state, and forms
only its N / W columns of x_t and x0_hat for the global batch.

The data are synthetic interaction sets (``--users`` users with 20 train, 2 validation and 2 test
items drawn uniformly from N; the last item is given to user 0 so the catalog spans N) written
in DiffRec's ``*_list.npy`` format and built into sets-v1 shards. The run trains ``--steps``
steps (``train.max_steps``; 1 validation at the end) with 5 diffusion steps, validates and
tests on every user (the reverse chain over all N columns, in batches of 8 users) and writes the
job's metrics.json, whose ``peak_rss_gib_per_rank`` is each rank's peak resident memory
(``getrusage``). Quality on random data is meaningless and not reported: this measures fit and
memory. Writes ``benchmarks/out/ldiffrec_10m.md`` (``diffrec_10m.md`` with ``--variant diffrec``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_data(folder: Path, items: int, users: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, k in (("train", 20), ("valid", 2), ("test", 2)):
        pairs = [[u, int(i)] for u in range(users) for i in rng.choice(items - 1, size=k, replace=False)]
        if split == "train":
            pairs.append([0, items - 1])  # the catalog spans all N items
        np.save(folder / f"{split}_list.npy", np.array(pairs, dtype=np.int64))
    np.save(folder / "item_emb.npy", rng.normal(size=(items, 4)).astype(np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=64,
                   help="DiffRec: diffrec.dims=[width]; L-DiffRec: diffrec.ae_dims=[width] (the latent) and dims=[width]")
    p.add_argument("--variant", choices=["l-diffrec", "diffrec"], default="l-diffrec")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--work", default="/tmp/recsys-dist-diffrec-10m", help="data, shards and run folder")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = p.parse_args()
    work = Path(args.work)
    data = work / f"data-{args.items}"
    if not (data / "item_emb.npy").exists() or np.load(data / "item_emb.npy", mmap_mode="r").shape[1] != 4:
        write_data(data, args.items, args.users)
    name = f"{args.variant}-{args.items}"
    config = "configs/ml1m-diffrec_ldiffrec.yaml" if args.variant == "l-diffrec" else "configs/ml1m-diffrec_diffrec.yaml"
    variant = ([f"diffrec.ae_dims=[{args.width}]", "diffrec.kmeans_max_iter=20"] if args.variant == "l-diffrec" else [])
    overrides = [f"data.data_dir={data}", f"data.shards_url={work}/shards-v2-{args.items}", f"output_dir={work}/runs",
                 "data.source={files: {train: train_list.npy, valid: valid_list.npy, test: test_list.npy}, format: pairs_npy, protocol: given}", "diffrec.item_emb=item_emb.npy",
                 f"name={name}", f"diffrec.dims=[{args.width}]", "diffrec.steps=5", *variant,
                 "sparse.sharding=row_wise", "sparse.optimizer=rowwise_adagrad", "sparse.lr=0.01",
                 "train.batch_size=4", "train.max_epochs=0", f"train.max_steps={args.steps}",
                 "eval.batch_size=8", "eval.ks=[10,20]", "train.log_every=1"]
    cmd = [sys.executable, "-m", "launcher", "train", "--nproc-per-node", str(args.nproc),
           "--config", config, *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    metrics = work / "runs" / name / "metrics.json"
    if code != 0 and not (metrics.exists() and metrics.stat().st_mtime > time.time() - wall):
        raise SystemExit(f"the run failed (exit {code})")
    m = json.loads(metrics.read_text())
    t = m["item_table"]
    table_gib = t["rows"] * t["dim"] * 4 / 2**30
    what = (f"L-DiffRec, 2 clusters, latent {args.width}" if args.variant == "l-diffrec" else f"DiffRec, dims [{args.width}]")
    lines = [f"{what}, {args.items:,} synthetic items, {args.nproc} ranks (row-wise sharded item table), "
             f"{args.users} users, {m['steps']} train steps + validation + test.", "",
             "| | value |", "|---|---:|",
             f"| item table rows x dim (first layer, last layer, bias, pad) | {t['rows']:,} x {t['dim']} |",
             f"| item table fp32 weights, all ranks | {table_gib:.2f} GiB |",
             f"| rows per rank (rank 0) | {t['rows_per_rank']:,} |",
             *[f"| peak RSS, rank {r} | {v:.2f} GiB |" for r, v in enumerate(m["peak_rss_gib_per_rank"])],
             f"| seconds per train step (global batch {4 * args.nproc}) | {m['seconds_per_step']:.2f} |",
             f"| test seconds ({m['test']['num_users']} users, 5 reverse steps) | {m['test']['seconds']:.1f} |",
             f"| whole command wall time | {wall:.0f} s |",
             *([f"| exit code (after metrics.json was written) | {code} |"] if code else []), "",
             f"A dense replica of the two N-wide layers alone would be {table_gib:.2f} GiB of fp32 weights per rank "
             f"({3 * table_gib:.2f} GiB with Adam's moments).",
             "", f"Command: `PYTHONPATH=. python benchmarks/diffrec_10m.py --variant {args.variant} --items {args.items} "
             f"--users {args.users} --steps {args.steps} --width {args.width} --nproc {args.nproc}`"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.variant.replace("-", "")
    md = f"{stem}_10m.md" if args.items == 10_000_000 else f"{stem}_{args.items}.md"
    (out / md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
