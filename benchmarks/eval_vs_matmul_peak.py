"""Full-catalog evaluation throughput of the evaluator's scoring path vs the measured fp32 matmul peak.

What and how: first the machine's fp32 GEMM peak is measured in this process with
``torch.set_num_threads(--threads)`` (2): ``torch.mm`` of (4096 x d) @ (d x 200000) into a
preallocated ``out=`` (d 64 and 128, best of ``--peak-reps``; a plain ``mm`` that allocates its
output is timed too). Then, for N = 1M and 10M items (``num_rows = N + 1``, d 64, fp32) on 1 rank
(``--threads`` threads) and on 2 ranks (spawned gloo processes, ``--threads / 2`` = 1 thread each;
each rank holds and scores its own ``row_partition`` half of the rows), random query vectors and
random targets are ranked with the evaluator's function
``recsys_dist.eval.ranking.rank_targets`` called exactly as ``recsys_dist/train/validate.py``
calls it (``ks`` (5, 10, 20, 50), ``item_chunk`` 65536, no history masking, ``topk`` 0),
``--queries`` (512) queries per call in total (split over the ranks; every rank scores all
gathered queries against its rows), repeated until ``--min-seconds``. Reported: queries/s,
achieved GFLOP/s = 2 N d queries/s, and % of the peak measured with the same total thread count
(the 2-thread peak for both 1 x 2 and 2 x 1 threads; 2 ranks also measure their concurrent
1-thread peaks). Each configuration also times one pass of bare chunked matmuls at the
evaluator's shapes (into a reused ``out=`` and into fresh outputs) and records which counting
path ran (one pass without top-K, ``recsys_dist/eval/onepass.py``; two passes with it). An
extra run with ``topk`` 50 at 1M shows the cost of top-K selection. Prints a markdown table and writes
``benchmarks/out/eval_vs_matmul_peak.{md,json,png}``. Takes about 4 minutes and up to ~7 GB RAM::

    PYTHONPATH=. python benchmarks/eval_vs_matmul_peak.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import traceback
from pathlib import Path

from _common import LoadProbe, busy_cpu_s, collect_results, machine_info  # benchmarks/_common.py (the script's folder is on sys.path)

PEAK_M, PEAK_N = 4096, 200_000
KS = (5, 10, 20, 50)


# --------------------------------------------------------------------------- machine / load


def gemm_peak(d: int, reps: int, plain_reps: int = 0, m: int = PEAK_M, n: int = PEAK_N, barrier=None) -> dict:
    """GFLOP/s of (m x d) @ (d x n) into a preallocated output (best and median of ``reps``) and,
    with ``plain_reps``, of a plain ``mm`` that allocates its output each time."""
    import torch
    g = torch.Generator().manual_seed(d)
    a, b = torch.randn(m, d, generator=g), torch.randn(d, n, generator=g)
    out = torch.empty(m, n)
    flop = 2.0 * m * n * d
    torch.mm(a, b, out=out)  # warm-up: thread pool, first touch of ``out``
    rates = []
    for _ in range(reps):
        if barrier is not None:
            barrier()
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(flop / (time.perf_counter() - t) / 1e9)
    del out
    plain = []
    for _ in range(plain_reps):
        t = time.perf_counter()
        c = torch.mm(a, b)
        plain.append(flop / (time.perf_counter() - t) / 1e9)
        del c
    return {"d": d, "best": max(rates), "median": statistics.median(rates), "rates": rates,
            "plain_best": max(plain) if plain else None, "plain_rates": plain}


# --------------------------------------------------------------------------- one rank


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _targets(rank: int, b: int, num_rows: int, seed: int):
    import torch
    return torch.randint(1, num_rows, (b,), generator=torch.Generator().manual_seed(seed * 1000 + rank))


def _rank(rank: int, world: int, port: int, spec: dict, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(spec["threads"]))
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(spec["threads"])
        from recsys_dist.distributed import row_partition
        from recsys_dist.eval.ranking import rank_targets

        dist.init_process_group("gloo")
        res: dict = {"rank": rank, "threads": torch.get_num_threads()}
        if spec["rank_peak"]:  # every rank's 1-thread GEMM peak while the other rank runs its own
            res["peak"] = gemm_peak(spec["dim"], spec["peak_reps"], barrier=dist.barrier)
        num_rows, d, q_total, chunk = spec["items"] + 1, spec["dim"], spec["queries"], spec["item_chunk"]
        lo, hi = row_partition(num_rows, world)[rank]
        g = torch.Generator().manual_seed(10 + rank)
        block = torch.randn(hi - lo, d, generator=g)
        sizes = [q_total // world + (1 if r < q_total % world else 0) for r in range(world)]
        queries = torch.randn(sizes[rank], d, generator=g)
        targets = _targets(rank, sizes[rank], num_rows, 1)

        def call(q, t):
            return rank_targets(q, t, block, lo, num_rows, ks=KS, topk=spec["topk"], item_chunk=chunk)

        from recsys_dist.eval import onepass
        call(queries, targets)  # warm-up: thread pool, allocator, the compiled count kernel
        paths0 = dict(onepass.CALLS)
        calls, total = 0, 0.0
        busy0, own0 = busy_cpu_s(), os.times()
        while calls < 1 or (total < spec["min_seconds"] and calls < spec["max_calls"]):
            dist.barrier()
            t = time.perf_counter()
            r = call(queries, targets)
            dist.barrier()
            total += time.perf_counter() - t
            calls += 1
        own1 = os.times()
        res.update(calls=calls, seconds=total, num_users=r.num_users,
                   busy_cpu_s=busy_cpu_s() - busy0,
                   own_cpu_s=(own1.user + own1.system) - (own0.user + own0.system))

        res["paths"] = {k: onepass.CALLS[k] - paths0[k] for k in paths0}
        res["path"] = "one pass" if res["paths"]["one_pass"] else "two passes"

        # -- one pass of bare chunked matmuls at the evaluator's shapes (all gathered queries)
        q_all = torch.randn(q_total, d, generator=g)
        buf = torch.empty(q_total, chunk)
        for name in ("mm_out", "mm_fresh"):
            dist.barrier()
            t = time.perf_counter()
            for c0 in range(0, hi - lo, chunk):
                c1 = min(c0 + chunk, hi - lo)
                if name == "mm_out" and c1 - c0 == chunk:
                    torch.mm(q_all, block[c0:c1].T, out=buf)
                else:
                    s = q_all @ block[c0:c1].T  # what ranking._scores does: a fresh (B, chunk) output
                    del s
            dist.barrier()
            res[name + "_s"] = time.perf_counter() - t
        del buf

        queue.put((rank, "ok", res))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_config(spec: dict, world: int, timeout_s: float = 1200) -> list[dict]:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    return collect_results(procs, queue, world, timeout_s)


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", nargs="+", type=int, default=[1_000_000, 10_000_000], help="catalog sizes")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="world sizes")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="total intra-op threads, split over the ranks")
    p.add_argument("--queries", type=int, default=512, help="queries per rank_targets call, all ranks together")
    p.add_argument("--item-chunk", type=int, default=65536, help="as eval.item_chunk (default: %(default)s)")
    p.add_argument("--min-seconds", type=float, default=5.0, help="repeat calls until this much time is timed")
    p.add_argument("--max-calls", type=int, default=10)
    p.add_argument("--topk", type=int, default=50, help="extra runs with this top-K (0: none)")
    p.add_argument("--topk-items", nargs="*", type=int, default=[1_000_000], help="catalog sizes of the top-K runs")
    p.add_argument("--peak-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--peak-reps", type=int, default=3)
    p.add_argument("--max-other-load", type=float, default=0.3,
                   help="re-measure when other processes used more cores than this (default: %(default)s)")
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--out", default="benchmarks/out", help="output folder (default: %(default)s)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: re-render the tables and plot from a JSON this script wrote")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        out_dir = args.out
        args = argparse.Namespace(**{**saved["args"], "out": out_dir, "from_json": args.from_json})
        peaks = {int(k): v for k, v in saved["peaks"].items()}
        report(saved["machine"], peaks, saved["rows"], args, saved["total_s"], saved.get("load_end", float("nan")))
        return
    import torch
    t_job = time.perf_counter()
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['loadavg_at_start']}",
          flush=True)

    # ---- peak ---------------------------------------------------------------------------
    torch.set_num_threads(args.threads)
    peaks = {}
    for d in args.peak_dims:
        for attempt in range(1 + args.retries):
            with LoadProbe() as lp:
                pk = gemm_peak(d, args.peak_reps, plain_reps=2)
            pk["other_cores"] = round(lp.other, 2)
            if lp.other <= args.max_other_load:
                break
            print(f"  [peak d {d}: other processes used {lp.other:.2f} cores; re-measuring]", flush=True)
        peaks[d] = pk
        print(f"  fp32 GEMM peak, {args.threads} threads, ({PEAK_M}x{d})@({d}x{PEAK_N}): into out= best "
              f"{pk['best']:.1f} GFLOP/s (median {pk['median']:.1f}), plain mm {pk['plain_best']:.1f} GFLOP/s "
              f"(other load {pk['other_cores']:.2f} cores)", flush=True)
    if args.dim not in peaks:
        peaks[args.dim] = gemm_peak(args.dim, args.peak_reps, plain_reps=2)
    peak = peaks[args.dim]["best"]

    # ---- evaluator ------------------------------------------------------------------------
    configs = [(n, w, 0) for n in args.items for w in args.ranks]
    if args.topk > 0:
        configs += [(n, w, args.topk) for n in args.topk_items for w in args.ranks]
    rows, rank_peak_done = [], set()
    for items, world, topk in configs:
        if args.threads % world:
            raise SystemExit(f"--threads {args.threads} is not divisible by {world} ranks")
        spec = {"items": items, "dim": args.dim, "threads": args.threads // world, "queries": args.queries,
                "item_chunk": args.item_chunk, "topk": topk, "min_seconds": args.min_seconds,
                "max_calls": args.max_calls, "peak_reps": args.peak_reps,
                "rank_peak": world > 1 and world not in rank_peak_done}
        for attempt in range(1 + args.retries):
            with LoadProbe() as lp:
                per_rank = run_config(spec, world)
            # other processes' CPU during the timed calls only (ranks report machine busy and own CPU)
            r0 = per_rank[0]
            own = sum(r["own_cpu_s"] for r in per_rank)
            other = max(0.0, r0["busy_cpu_s"] - own) / r0["seconds"] if r0["seconds"] > 0 else 0.0
            if other <= args.max_other_load:
                break
            print(f"  [{items:,} items x {world}: other processes used {other:.2f} cores; re-measuring]", flush=True)
        if spec["rank_peak"]:
            rank_peak_done.add(world)
        secs = max(r["seconds"] for r in per_rank)
        calls = per_rank[0]["calls"]
        qps = args.queries * calls / secs
        gflops = 2.0 * items * args.dim * qps / 1e9
        t_call = secs / calls
        mm_out = max(r["mm_out_s"] for r in per_rank)
        mm_fresh = max(r["mm_fresh_s"] for r in per_rank)
        row = {"items": items, "ranks": world, "threads_per_rank": args.threads // world, "topk": topk,
               "queries_per_call": args.queries, "calls": calls, "seconds": secs, "queries_per_s": qps,
               "gflops": gflops, "pct_peak": 100 * gflops / peak, "t_call": t_call,
               "mm_out_s": mm_out, "mm_fresh_s": mm_fresh,
               "mm_out_gflops": 2.0 * items * args.dim * args.queries / mm_out / 1e9,
               "mm_fresh_gflops": 2.0 * items * args.dim * args.queries / mm_fresh / 1e9,
               "path": per_rank[0]["path"], "pct_bare_mm": 100 * gflops / (2.0 * items * args.dim * args.queries / mm_out / 1e9),
               "other_cores": round(other, 2), "loadavg_1m": os.getloadavg()[0], "per_rank": per_rank}
        if spec["rank_peak"]:
            row["rank_peaks"] = [r["peak"]["best"] for r in per_rank]
        rows.append(row)
        print(f"  {items:>10,} items x {world} rank(s) x {args.threads // world} thread(s), topk {topk}: "
              f"{qps:8.1f} queries/s = {gflops:5.1f} GFLOP/s = {row['pct_peak']:4.1f}% of peak; bare chunked mm "
              f"{row['mm_out_gflops']:.1f} (out=) / {row['mm_fresh_gflops']:.1f} (fresh) GFLOP/s; {row['path']} "
              f"(other load {other:.2f} cores)", flush=True)

    report(info, peaks, rows, args, time.perf_counter() - t_job, os.getloadavg()[0])


def report(info: dict, peaks: dict, rows: list, args, total_s: float, load_end: float) -> None:
    """Print the tables and write the .md, .json and .png (also used by ``--from-json``)."""
    pk = peaks[args.dim]
    peak = pk["best"]
    rank_peak_rows = [r for r in rows if "rank_peaks" in r]
    lines = [f"Machine: {info['cpu']} ({', '.join(info['cpu_flags'])}), {info['cores']} cores, {info['mem_gib']} GiB, "
             f"torch {info['torch']}, Python {info['python']}, {info['date']}; load average at start "
             f"{info['loadavg_at_start'][0]:.2f}.", "",
             f"fp32 GEMM peak, {args.threads} threads, measured in this job (best of {args.peak_reps}):", "",
             "| shape | into preallocated `out=` GFLOP/s (median) | plain `mm` GFLOP/s | other load |",
             "|---|---:|---:|---:|"]
    for d, q in peaks.items():
        lines.append(f"| ({PEAK_M}x{d})@({d}x{PEAK_N}) | {q['best']:.1f} ({q['median']:.1f}) | "
                     f"{q['plain_best']:.1f} | {q.get('other_cores', 0):.2f} |")
    for r in rank_peak_rows:
        lines.append(f"| ({PEAK_M}x{args.dim})@({args.dim}x{PEAK_N}), {r['ranks']} ranks x 1 thread at once | "
                     f"{' + '.join(f'{x:.1f}' for x in r['rank_peaks'])} = {sum(r['rank_peaks']):.1f} | | |")
    if 128 in peaks:
        lines += ["", f"For comparison, `../shared/reference.md` quotes 66 GFLOP/s (plain `mm`) and 88 GFLOP/s (into a "
                  f"preallocated output) for (4096x128)@(128x200000) on 2 threads; this run measured "
                  f"{peaks[128]['plain_best']:.0f} and {peaks[128]['best']:.0f}."]
    lines += ["", f"Evaluator: `rank_targets` as `validate.py` calls it (ks {KS}, item_chunk {args.item_chunk}, no "
              f"history masking), d {args.dim} fp32, random queries and targets, {args.queries} queries per call in "
              "total (split over the ranks; each rank scores all of them against its own rows), "
              f"{args.threads} threads "
              f"in total: 1 rank x {args.threads} threads or 2 ranks x {args.threads // 2} thread. GFLOP/s = 2 N d "
              f"queries/s; % of peak against the {args.threads}-thread `out=` peak at d {args.dim} "
              f"({peak:.1f} GFLOP/s) in every row. 'bare mm' = one pass of the same chunked matmuls alone, into a "
              "reused output (`out=`) or a fresh one; 'path': the one-pass count (no top-K: what validation runs, "
              "`recsys_dist/eval/onepass.py`) or the two-pass one (top-K).", "",
              "| items | ranks x threads | top-K | path | queries/s | achieved GFLOP/s | % of peak | bare mm out= GFLOP/s "
              "| % of bare mm out= | bare mm fresh output GFLOP/s | other load |",
              "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['items']:,} | {r['ranks']} x {r['threads_per_rank']} | {r['topk'] or '-'} | "
                     f"{r.get('path', '-')} | {r['queries_per_s']:,.1f} | {r['gflops']:.1f} | {r['pct_peak']:.0f}% | "
                     f"{r['mm_out_gflops']:.1f} | {r.get('pct_bare_mm', float('nan')):.0f}% | "
                     f"{r['mm_fresh_gflops']:.1f} | {r['other_cores']:.2f} |")
    lines += ["", "How the one pass gets there: each target's score is computed by its owner first, with one "
              "small matmul of all gathered queries against its target rows (the chunks' kernel, so each element "
              "equals the chunk's value bit for bit, checked in the pass), one matmul per chunk writes into a "
              "reused buffer, and one fused compare-and-count kernel (torch.compile) reads each score once; the "
              "excluded items (target, padding, seen set) are taken out by index. The gap to the peak is the "
              "chunk shape's matmul efficiency, that count kernel and the input checks; the top-K rows still take "
              "two passes with a `torch.topk` per chunk."]
    lines += ["", f"Total run time {total_s:.0f} s; load average at the end {load_end:.2f}."]
    text = "\n".join(lines)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_vs_matmul_peak.md").write_text(
        "# Full-catalog evaluation vs the fp32 matmul peak\n\n"
        "`PYTHONPATH=. python benchmarks/eval_vs_matmul_peak.py`\n\n" + text + "\n")
    (out / "eval_vs_matmul_peak.json").write_text(json.dumps({"machine": info, "args": vars(args), "peaks": peaks,
                                                              "rows": rows, "total_s": total_s, "load_end": load_end},
                                                             indent=1))
    _plot(rows, peak, out / "eval_vs_matmul_peak.png", args)
    print(f"\nwrote {out}/eval_vs_matmul_peak.{{md,json,png}}")


def _plot(rows, peak: float, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 4))
    labels = [f"{r['items'] / 1e6:g}M\n{r['ranks']}x{r['threads_per_rank']}t"
              + (f"\ntop-{r['topk']}" if r["topk"] else "") for r in rows]
    x = list(range(len(rows)))
    ax.bar([i - 0.27 for i in x], [r["gflops"] for r in rows], 0.27, label="evaluator (rank_targets), achieved")
    ax.bar(x, [r["mm_fresh_gflops"] for r in rows], 0.27, label="bare chunked mm, fresh output")
    ax.bar([i + 0.27 for i in x], [r["mm_out_gflops"] for r in rows], 0.27, label="bare chunked mm, out=")
    ax.axhline(peak, color="k", ls="--", lw=1, label=f"peak: (4096x{args.dim})@({args.dim}x200000) out=, "
                                                      f"{args.threads} threads = {peak:.0f}")
    for i, r in enumerate(rows):
        ax.text(i - 0.27, r["gflops"], f"{r['pct_peak']:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("GFLOP/s (fp32)")
    ax.set_title(f"full-catalog scoring vs fp32 GEMM peak (d {args.dim}, {args.queries} queries/call, "
                 f"{args.threads} threads in total)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
