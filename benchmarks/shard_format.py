"""Shard bytes and build time, ``seq-v1`` (one tar sample per (prefix, target)) vs ``seq-v2``
(per-user records in checksummed blocks), in the same job.

What and how: builds ML-1M (every training prefix, as the v1 default stored them: 981,491
train samples at max_len 50) and a 10M-item synthetic catalog (20k users) with this tree
(v2) and with a checkout of the last v1 commit (``--v1-tree``, e.g. a ``git worktree`` at
``e4a9c30``; its own CLI ``python -m shards build|synth``, run as a subprocess), each into a
fresh folder, timing the whole command (``--force``, so nothing is reused). Then reads the
v2 ML-1M train split once through ``SequenceDataset`` (batch 256, max_len 50, shuffle) and
reports samples/s. Writes ``benchmarks/out/shard_format.{md,json}``::

    git worktree add /tmp/v1tree e4a9c30
    PYTHONPATH=. python benchmarks/shard_format.py --v1-tree /tmp/v1tree
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info

REPO = Path(__file__).resolve().parent.parent


def _du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _run(cmd: list, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=cwd))
    return time.perf_counter() - t0


def _read_rate(url: str) -> dict:
    from shards.dataset import SequenceDataset

    ds = SequenceDataset(url, "train", 256, max_len=50, shuffle=True, seed=0, drop_last=True)
    t0 = time.perf_counter()
    n = sum(int(b["target"].numel()) for b in ds)
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": round(dt, 2), "samples_per_s": round(n / dt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v1-tree", required=True, help="a checkout of the last seq-v1 commit (e4a9c30)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--synth-items", type=int, default=10_000_000)
    ap.add_argument("--synth-users", type=int, default=20_000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="shard-format-")
    py = sys.executable
    info = machine_info()
    rows = []
    jobs = [
        ("ML-1M (every prefix)", "v1", [py, "-m", "shards", "build", "--dataset", "ml-1m", "--max-len", "50",
                                        "--force"], args.v1_tree),
        ("ML-1M (every prefix)", "v2", [py, "-m", "shards", "build", "--source", str(REPO / "configs/datasets/ml1m.yaml"),
                                        "--force"], str(REPO)),
        (f"synthetic {args.synth_items:,} items x {args.synth_users:,} users", "v1",
         [py, "-m", "shards", "synth", "--num-items", str(args.synth_items), "--num-users", str(args.synth_users),
          "--max-len", "20", "--no-progress", "--force"], args.v1_tree),
        (f"synthetic {args.synth_items:,} items x {args.synth_users:,} users", "v2",
         [py, "-m", "shards", "synth", "--num-items", str(args.synth_items), "--num-users", str(args.synth_users),
          "--no-progress", "--force"], str(REPO)),
    ]
    for i, (data, fmt, cmd, cwd) in enumerate(jobs):
        out = os.path.join(work, f"{i}-{fmt}")
        secs = _run(cmd + ["--out", out], cwd)
        m = json.loads(Path(out, "manifest.json").read_text())
        shard_bytes = sum(f.stat().st_size for f in Path(out).iterdir() if ".tar" in f.name)
        tars = sum(1 for f in Path(out).iterdir() if ".tar" in f.name)
        rows.append({"data": data, "format": fmt, "build_s": round(secs, 1), "shard_bytes": shard_bytes,
                     "all_bytes": _du(out), "shards": tars, "out": out,
                     "compress": bool(m.get("build", {}).get("compress"))})
        print(rows[-1], flush=True)
    rate = _read_rate(rows[1]["out"])
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; "
             f"`PYTHONPATH=. python benchmarks/shard_format.py --v1-tree <checkout of e4a9c30>`", "",
             "| data | format | shard files | shard MiB | folder MiB | build s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['format']}{' (gzip)' if r['compress'] else ''} | {r['shards']} | "
                     f"{r['shard_bytes'] / 2**20:.1f} | {r['all_bytes'] / 2**20:.1f} | {r['build_s']} |")
    lines += ["", f"v2 ML-1M train split read once through SequenceDataset (batch 256, max_len 50, shuffle, 1 "
              f"process): {rate['samples']:,} samples in {rate['seconds']} s = {rate['samples_per_s']:,} samples/s."]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "shard_format.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "shard_format.json").write_text(json.dumps({"machine": info, "rows": rows, "read": rate}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
