"""GPU smoke run: one CUDA GPU, under 8 minutes, one markdown table with the device's name.

    bash benchmarks/gpu_smoke.sh            # = PYTHONPATH=. python benchmarks/gpu_smoke.py

Four checks, each in this process or a child it starts, each recorded even when a later one
fails:

1. install: torch's CUDA build and the device; fbgemm-gpu's CUDA ops load (TorchRec's TBE
   kernels); NCCL is available; the pinned versions of torchrec and deepspeed.
2. train + evaluate: ``python -m launcher train --nproc-per-node 1`` of DiffuRec on ML-1M
   (``configs/ml1m_diffurec.yaml``, NCCL process group, CUDA TBE kernels, bf16 under DeepSpeed)
   for ``--train-steps`` steps, then its full-catalog test once (1 eval seed): s/step,
   samples/s, test HR@10 / NDCG@10, eval users/s.
3. exact ranking against the bf16 GEMM peak measured in the same process: ``torch.mm`` of
   (512 x 64) @ (64 x 10M) bf16 into a preallocated output (best of 5, CUDA events), then the
   evaluator (``recsys_dist.eval.ranking.rank_targets``, as validation calls it) on 512 bf16
   queries against 10M + 1 bf16 rows: queries/s, achieved TFLOP/s = 2 N d q/s, % of the peak.
4. a 10M-item table: ``ShardedItemTable`` (row-wise, fused row-wise Adagrad, CUDA kernel) of
   10M + 1 rows x 64 on the GPU; one lookup + backward of a 512 x 50 batch of ids, timed over
   20 steps after 3 warm-up steps.

Writes ``benchmarks/out/gpu_smoke.md`` (and ``.json``). On a machine without CUDA it stops at
check 1 and says so (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def check_install() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if not out["cuda_available"]:
        return out
    out["device"] = torch.cuda.get_device_name(0)
    out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    out["nccl"] = torch.distributed.is_nccl_available()
    out["bf16"] = torch.cuda.is_bf16_supported()
    import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm
    import torchrec
    import deepspeed
    out["fbgemm_gpu"] = getattr(fbgemm_gpu, "__version__", "?")
    out["fbgemm_cuda_ops"] = hasattr(torch.ops.fbgemm, "split_embedding_codegen_lookup_rowwise_adagrad_function") or \
        hasattr(torch.ops.fbgemm, "asynchronous_complete_cumsum")
    out["torchrec"], out["deepspeed"] = torchrec.__version__, deepspeed.__version__
    return out


def train_eval(steps: int, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "launcher", "train", "--nproc-per-node", "1", "--config", "configs/ml1m_diffurec.yaml",
           f"train.max_steps={steps}", "train.eval_every=0", "eval.test_seeds=1", "eval.val_max_users=1000",
           "checkpoint.enabled=false", "train.device=cuda", f"output_dir={out_dir}", "name=gpu-smoke-diffurec"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                       timeout=420)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"launcher train exited {p.returncode}: {p.stderr[-1500:]}")
    m = json.loads((out_dir / "gpu-smoke-diffurec" / "metrics.json").read_text())
    return {"steps": m["steps"], "seconds_per_step": m["seconds_per_step"], "samples_per_second": m["samples_per_second"],
            "test_HR@10": m["test"]["HR@10"], "test_NDCG@10": m["test"]["NDCG@10"],
            "eval_users_per_s": m["test"]["num_users"] / m["test"]["seconds"], "device": m["device"], "wall_s": wall}


def ranking_vs_peak(items: int, dim: int, queries: int) -> dict:
    import torch
    from recsys_dist.eval.ranking import rank_targets

    dev = torch.device("cuda")
    q = torch.randn(queries, dim, device=dev, dtype=torch.bfloat16)
    rows = torch.randn(items + 1, dim, device=dev, dtype=torch.bfloat16)
    rows[0] = 0
    out = torch.empty(queries, items + 1, device=dev, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.mm(q, rows.t(), out=out)
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    peak = 2 * (items + 1) * dim * queries / best
    del out
    targets = torch.randint(1, items + 1, (queries,), device=dev)
    rank_targets(q, targets, rows, 0, items + 1)  # warm-up
    torch.cuda.synchronize()
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < 5.0 and calls < 20:
        rank_targets(q, targets, rows, 0, items + 1)
        calls += 1
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / calls
    achieved = 2 * (items + 1) * dim * queries / dt
    return {"items": items, "dim": dim, "queries": queries, "peak_tflops": peak / 1e12,
            "ranking_tflops": achieved / 1e12, "percent_of_peak": 100 * achieved / peak, "queries_per_s": queries / dt}


def table_step(items: int, dim: int, batch: int, length: int) -> dict:
    import torch
    from recsys_dist.config import SparseConfig
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import init_distributed

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    init_distributed(dev)
    table = ShardedItemTable.create(items + 1, dim, SparseConfig(), dev, batch, seed=0)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(23):
        ids = torch.randint(1, items + 1, (batch * length,), generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (emb,) = table.lookup([ids])
        emb.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return {"items": items, "dim": dim, "ids_per_step": batch * length, "ms_per_step": 1e3 * sum(times) / len(times),
            "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--items", type=int, default=10_000_000)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t0 = time.perf_counter()
    checks = [("install", check_install), ("train_eval", lambda: train_eval(args.train_steps, out / "gpu-smoke-runs")),
              ("ranking_vs_bf16_peak", lambda: ranking_vs_peak(args.items, 64, 512)),
              ("table_10m", lambda: table_step(args.items, 64, 512, 50))]
    for name, fn in checks:
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - every check is reported
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(name, json.dumps(result[name], default=str)[:500], flush=True)
        if name == "install" and not result[name].get("cuda_available"):
            break
    result["wall_s"] = time.perf_counter() - t0
    inst = result["install"]
    lines = [f"GPU smoke run on {inst.get('device', 'no CUDA device')} (torch {inst['torch']}, CUDA {inst['cuda_build']}), "
             f"{result['started']}, {result['wall_s']:.0f} s in all. Command: `bash benchmarks/gpu_smoke.sh`.", "",
             "| check | result |", "|---|---|"]
    for name, _ in checks:
        r = result.get(name)
        if r is None:
            lines.append(f"| {name} | not run |")
        elif "error" in r:
            lines.append(f"| {name} | FAILED: {r['error'][:200]} |")
        else:
            lines.append(f"| {name} | " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in r.items()) + " |")
    (out / "gpu_smoke.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_smoke.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n".join(lines))
    sys.exit(0 if inst.get("cuda_available") and not any("error" in (result.get(n) or {}) for n, _ in checks) else 1)


if __name__ == "__main__":
    main()
