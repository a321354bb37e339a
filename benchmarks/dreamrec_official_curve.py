"""DreamRec learning curves on Zhihu: the official refined DreamRec code against recsys-dist's
DreamRec in its official form, at equal epochs, on the same data.

    git --git-dir=/work/.mirror/baiyimeng+DreamRec/repo archive HEAD -- dreamrec.py sasrec.py utils.py \\
        run_dreamrec.py | tar -x -C /tmp/official-dreamrec     # baiyimeng/DreamRec @ f77206d, outside this repo
    PYTHONPATH=. python benchmarks/dreamrec_official_curve.py --official /tmp/official-dreamrec
    PYTHONPATH=. python benchmarks/dreamrec_official_curve.py --official /tmp/official-dreamrec \\
        --epochs 1 --eval-every 1                               # a smoke run of both sides
    PYTHONPATH=. python benchmarks/dreamrec_official_curve.py --ours-only --epochs 30

Official side (``--official DIR``; nothing of it is copied into this repository): its modules
``utils``, ``dreamrec`` (with ``sasrec``) and ``run_dreamrec`` are imported from DIR (by
``benchmarks/_official.py``, which ``train_eval_throughput.py`` shares), and the body
of ``run_dreamrec.py``'s ``__main__`` is replayed in this process on CPU, 1 process x 2 threads
(``torch.set_num_threads(2)``): its own argument defaults (batch 256, lr 1e-3, AdamW eps 1e-8,
wd 0, hidden 64, 2 blocks, 1 head, dropout 0.1, uncon_ratio 0.1, cfg_scale 2, T 1000 linear,
seed 2025; 20 DDIM steps, eta 0 at eval), ``setup_seed``, ``RecDataset``, ``DreamRec``,
``utils.train`` once per epoch and ``utils.evaluate`` (HR/NDCG@10/20 over every row of a split,
the last partial batch kept) on validation and test every ``--eval-every`` epochs and at the last.
Only ``utils.train`` is timed (data loading included, evaluation excluded).
What differs from running ``python run_dreamrec.py --data zhihu`` (dreamrec.py, sasrec.py and
utils.py are used unmodified):

- data: no pickle is loaded. ``run_dreamrec.py:46-55`` reads ``data/zhihu/*.df`` with
  pandas' pickle reader; here the same rows come from the plain conversions in
  ``../shared/datasets/zhihu/raw/dreamrec/`` (``*_data.tsv.gz``: seq, len_seq, next, in the
  pickles' row order; ``data_statis.json``) and are handed to the official ``RecDataset`` as an
  object with the ``to_numpy()`` it calls. pandas is not needed: while ``run_dreamrec`` is
  imported (only for ``parse_args()``'s defaults) ``pandas`` is a stub whose ``read_pickle`` raises;
- device: CPU always (the script's ``CUDA_VISIBLE_DEVICES`` / ``cuda:0`` lines are skipped);
- ``DataLoader(..., num_workers=4)`` (run_dreamrec.py:61-63) becomes ``--official-workers``
  (default 0: one process, as ../shared/reference.md measured it);
- evaluation every ``--eval-every`` epochs instead of every 10, and no early stop unless
  ``--patience N`` (its rule: N evaluations without a strictly better val HR@20, default 5; it
  cannot end a 30-epoch run at 5 epochs apart anyway; ``--epochs 1000 --eval-every 10 --patience 5``
  is the official run to its stopping point, ours then gets ``train.patience=5``), and each evaluation
  runs inside ``torch.random.fork_rng`` seeded with ``--eval-seed``: the training stream is the
  same whatever ``--eval-every`` is, and every point of the curve uses the same eval noise
  (the official code's evaluation is stochastic: fresh Gaussian x_T, dreamrec.py:125);
- recorded per evaluated epoch: cumulative training wall seconds, val and test HR@20 / NDCG@20 (and
  @10), the last batch's loss (what ``utils.train`` returns). The official run reports the test of
  the val-HR@20-selected model; here that is the test of the best-val row.

Ours: ``python -m launcher train --config configs/zhihu_dreamrec.yaml train.max_epochs=N
train.eval_every_epochs=E train.patience=P name=dreamrec-curve-ours output_dir=<out>/runs
checkpoint.enabled=false eval.test_seeds=1`` in a subprocess (2 ranks x ``--ours-threads``
OMP threads, default 1: 2 threads in all, like the official side). Its metrics.json gives the
``validation`` records (epoch, train_seconds, HR@20, NDCG@20 over every val row) and the test of
the state it selects (on val NDCG@10, its default select metric). train_seconds excludes
validation and start-up.

Epochs and samples: an official epoch is every train row once (61,641, 241 batches of 256, the
last partial); ours is the per-rank batch plan of the train split (drop_last on each rank: 240
steps x 128 x 2 ranks = 61,440 rows). Both counts are recorded and the table shows train rows
seen at each epoch, so the curves can be read at equal samples too. Random ranker: HR@20 =
20 / 4,838 = 0.41 %.

Timings: run it on an otherwise idle machine. With other processes holding the 2 cores, the
official side's 2 OpenMP threads slow down far more than 2x (measured here with load ~6 on 2
cores: 239 s an epoch at 2 threads, 68 s at ``--official-threads 1``, same metrics bit for bit);
the json and md record how many cores other processes kept busy during each side.

Writes ``<out>/dreamrec_official_curve.{md,png,json}`` (default out: benchmarks/out;
``dreamrec_official_curve-seed<N>.*`` with ``--seed N``, which seeds both sides' training;
``-patience<P>`` appended with ``--patience P``). With ``--ours-only`` / ``--official-only`` the
other side is taken from the previous json when that was run with the same ``--epochs`` /
``--eval-every`` / ``--patience`` (the md says when each side ran).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _official
from _official import (REPO, Frame, dreamrec_args, dreamrec_model_and_optimizer, import_dreamrec,  # noqa: E402
                       load_split, zhihu_dir)

RUN_NAME = "dreamrec-curve-ours"
RANDOM_HR20 = 100 * 20 / 4838


# ---------------------------------------------------------------------------------------------
# official side (the loading code lives in _official.py, shared with train_eval_throughput.py)

def run_official(args) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from _common import LoadProbe

    torch.set_num_threads(args.official_threads)
    utils, dreamrec, run_script = import_dreamrec(args.official)
    # the official defaults; --seed: the official script's own --seed (default 2025)
    oargs = dreamrec_args(run_script, args.data_dir, args.seed)
    print(f"[official] args: {oargs}", flush=True)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")

    utils.setup_seed(oargs.seed)
    device = torch.device("cpu")
    splits = {s: utils.RecDataset(Frame(load_split(args.data_dir, s))) for s in ("train", "val", "test")}
    w = args.official_workers
    train_dl = DataLoader(splits["train"], oargs.batch_size, True, num_workers=w)
    val_dl = DataLoader(splits["val"], oargs.batch_size, False, num_workers=w)
    test_dl = DataLoader(splits["test"], oargs.batch_size, False, num_workers=w)

    model, optimizer = dreamrec_model_and_optimizer(dreamrec, oargs, device)

    def evaluate(dl):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.eval_seed)
            t0 = time.perf_counter()
            m = utils.evaluate(model, dl, device, [10, 20])
            return {k: float(v) for k, v in m.items()}, time.perf_counter() - t0

    rows, train_s, eval_s, since_best, stopped_at = [], 0.0, 0.0, 0, None
    with LoadProbe() as probe:
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            loss = utils.train(model, train_dl, device, optimizer)
            dt = time.perf_counter() - t0
            train_s += dt
            line = f"[official] epoch {epoch:3d}  train {dt:6.1f}s (total {train_s:7.1f}s)  last-batch loss {loss['loss']:.4f}"
            if epoch % args.eval_every == 0 or epoch == args.epochs:
                val, vs = evaluate(val_dl)
                test, ts = evaluate(test_dl)
                eval_s += vs + ts
                rows.append({"epoch": epoch, "train_seconds": train_s, "train_rows_seen": epoch * len(splits["train"]),
                             "last_batch_loss": loss["loss"], "val": val, "test": test,
                             "val_eval_seconds": vs, "test_eval_seconds": ts})
                line += (f"  val HR@20 {100 * val['HR@20']:.2f} NDCG@20 {100 * val['NDCG@20']:.2f}"
                         f"  test HR@20 {100 * test['HR@20']:.2f} NDCG@20 {100 * test['NDCG@20']:.2f}"
                         f"  (eval {vs + ts:.1f}s)")
                # run_dreamrec.py's stopping rule: --patience evaluations without a strictly better val HR@20
                best_before = max((r["val"]["HR@20"] for r in rows[:-1]), default=0.0)  # its best_metric = 0.0
                since_best = 0 if val["HR@20"] > best_before else since_best + 1
            print(line, flush=True)
            if args.patience and since_best >= args.patience:
                stopped_at = epoch
                print(f"[official] early stop at epoch {epoch}: {since_best} evaluations without a better val HR@20",
                      flush=True)
                break
    best = max(rows, key=lambda r: r["val"]["HR@20"])
    n_train = len(splits["train"])
    return {"side": "official", "code": str(Path(args.official).resolve()), "args": vars(oargs),
            "threads": args.official_threads, "dataloader_workers": w, "eval_seed": args.eval_seed,
            "train_rows_per_epoch": n_train, "steps_per_epoch": math.ceil(n_train / oargs.batch_size),
            "rows": rows, "train_seconds": train_s, "eval_seconds": eval_s, "wall_seconds": probe.wall,
            "stopped_early_at_epoch": stopped_at,
            "other_cores_busy": probe.other,
            "selected": {"epoch": best["epoch"], "by": "val HR@20", "val": best["val"], "test": best["test"]},
            "ran_at": started_at}  # when the side started


# ---------------------------------------------------------------------------------------------
# our side

def run_ours(args) -> dict:
    from _common import LoadProbe

    runs = Path(args.out).resolve() / "runs"
    run_dir = runs / RUN_NAME
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale metrics.json must not be read as this run's
    cmd = [sys.executable, "-m", "launcher", "train", "--config", "configs/zhihu_dreamrec.yaml",
           f"train.max_epochs={args.epochs}", f"train.eval_every_epochs={args.eval_every}", f"train.patience={args.patience}",
           f"name={RUN_NAME}", f"output_dir={runs}", "checkpoint.enabled=false", "eval.test_seeds=1",
           "eval.select_metric=HR@20"]  # the official code selects on validation HR@20 (run_dreamrec.py)
    if args.seed is not None:
        cmd.append(f"train.seed={args.seed}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.ours_threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print("[ours] + " + " ".join(cmd), flush=True)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    with LoadProbe() as probe:
        code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if code != 0:
        raise SystemExit(f"[ours] launcher train exited {code}; see {run_dir / 'train.log'}")
    m = json.loads((run_dir / "metrics.json").read_text())
    batch, world, spe = int(m["config"]["train"]["batch_size"]), int(m["world_size"]), int(m["steps_per_epoch"])
    rows = []
    for step, v in m["validation"]:
        rows.append({"epoch": float(v["epoch"]), "step": int(step), "train_seconds": float(v["train_seconds"]),
                     "train_rows_seen": int(step) * batch * world,
                     "val": {k: float(v[k]) for k in ("HR@10", "HR@20", "NDCG@10", "NDCG@20")},
                     "val_eval_seconds": float(v.get("seconds", float("nan")))})
        print(f"[ours] epoch {rows[-1]['epoch']:5.1f}  train {rows[-1]['train_seconds']:7.1f}s  val HR@20 "
              f"{100 * v['HR@20']:.2f} NDCG@20 {100 * v['NDCG@20']:.2f}", flush=True)
    return {"side": "ours", "command": " ".join(cmd), "metrics_json": str(run_dir / "metrics.json"),
            "ranks": world, "threads_per_rank": args.ours_threads, "batch_per_rank": batch,
            "steps_per_epoch": spe, "train_rows_per_epoch": spe * batch * world, "rows": rows,
            "train_seconds": float(m["train_seconds"]), "wall_seconds": probe.wall, "other_cores_busy": probe.other,
            "selected": {"step": m["selected_step"], "epoch": m["selected_step"] / spe, "by": f"val {m['select_metric']}",
                         "test": {k: float(m["test"][k]) for k in ("HR@10", "HR@20", "NDCG@10", "NDCG@20")},
                         "test_seeds": m["test_seeds"]},
            "seconds_per_step": m.get("seconds_per_step"), "protocol": m.get("protocol"),
            "stopped_early": bool(m.get("stopped_early")), "epochs": float(m.get("epochs", 0.0)),
            "ran_at": started_at}  # when the side started


# ---------------------------------------------------------------------------------------------
# report

def result_stem(seed: int | None, patience: int = 0) -> str:
    """Output file stem: ``dreamrec_official_curve`` (each side's default seed: official 2025, ours 0)
    or ``dreamrec_official_curve-seed<N>`` (both sides trained with seed N); ``-patience<P>`` is
    appended for runs with early stopping (to the official stopping point)."""
    return ("dreamrec_official_curve" + ("" if seed is None else f"-seed{seed}")
            + (f"-patience{patience}" if patience else ""))


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def write_report(result: dict, out: Path) -> str:
    off, ours = result.get("official"), result.get("ours")
    info = result["machine"]
    by_epoch: dict[float, dict] = {}
    for side in ("official", "ours"):
        for r in (result.get(side) or {}).get("rows", []):
            by_epoch.setdefault(round(r["epoch"], 3), {})[side] = r
    lines = [f"DreamRec on Zhihu, official code (baiyimeng/DreamRec @ f77206d) vs recsys-dist "
             f"(configs/zhihu_dreamrec.yaml, dreamrec_form official), {result['epochs']} epochs, "
             f"metrics in % over every val / test row (random HR@20 {RANDOM_HR20:.2f}); training seed "
             f"{'official 2025, ours 0' if result.get('seed') is None else result['seed']}.", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB, torch {info['torch']}.", ""]
    if off:
        lines.append(f"- official: 1 process x {off['threads']} threads, DataLoader workers {off['dataloader_workers']}, "
                     f"{off['train_rows_per_epoch']:,} train rows ({off['steps_per_epoch']} steps of "
                     f"{off['args']['batch_size']}) an epoch; eval seed {off['eval_seed']}; ran {off['ran_at']} "
                     f"(load average at start {off.get('machine', info)['loadavg_at_start'][0]:.2f}); "
                     f"other processes kept {off['other_cores_busy']:.2f} cores busy meanwhile.")
    if ours:
        lines.append(f"- ours: {ours['ranks']} ranks x {ours['threads_per_rank']} thread(s), "
                     f"{ours['train_rows_per_epoch']:,} train rows ({ours['steps_per_epoch']} steps of "
                     f"{ours['batch_per_rank']} x {ours['ranks']}) an epoch; ran {ours['ran_at']} "
                     f"(load average at start {ours.get('machine', info)['loadavg_at_start'][0]:.2f}); "
                     f"other processes kept {ours['other_cores_busy']:.2f} cores busy meanwhile.")
    lines += ["", "| epoch | official rows seen | official val HR@20 | official test HR@20 | official test NDCG@20 "
              "| official train s | ours rows seen | ours val HR@20 | ours val NDCG@20 | ours train s |",
              "|---:|" + "---:|" * 9]
    for e in sorted(by_epoch):
        o, u = by_epoch[e].get("official"), by_epoch[e].get("ours")
        lines.append(f"| {e:g} | " + " | ".join([
            f"{o['train_rows_seen']:,}" if o else "", pct(o["val"]["HR@20"]) if o else "",
            pct(o["test"]["HR@20"]) if o else "", pct(o["test"]["NDCG@20"]) if o else "",
            f"{o['train_seconds']:.0f}" if o else "",
            f"{u['train_rows_seen']:,}" if u else "", pct(u["val"]["HR@20"]) if u else "",
            pct(u["val"]["NDCG@20"]) if u else "", f"{u['train_seconds']:.0f}" if u else ""]) + " |")
    lines.append("")
    if off:
        s = off["selected"]
        if off.get("stopped_early_at_epoch"):
            lines.append(f"Official: early stop at epoch {off['stopped_early_at_epoch']} ({result['patience']} "
                         f"evaluations without a better val HR@20).")
        lines.append(f"Official, selected on val HR@20 (epoch {s['epoch']}): test HR@20 {pct(s['test']['HR@20'])}, "
                     f"NDCG@20 {pct(s['test']['NDCG@20'])}; training {off['train_seconds']:.0f} s, "
                     f"evaluations {off['eval_seconds']:.0f} s.")
    if ours:
        s = ours["selected"]
        if ours.get("stopped_early"):
            lines.append(f"Ours: early stop at epoch {ours['epochs']:g} ({result['patience']} validations without a "
                         f"better val HR@20).")
        lines.append(f"Ours, selected on {s['by']} (epoch {s['epoch']:g}): test HR@20 {pct(s['test']['HR@20'])}, "
                     f"NDCG@20 {pct(s['test']['NDCG@20'])} ({len(s['test_seeds'])} eval seed); training "
                     f"{ours['train_seconds']:.0f} s, whole launcher run {ours['wall_seconds']:.0f} s.")
    lines += ["", "Train s: cumulative wall seconds of training only (evaluation and start-up excluded). "
              "Both evaluations are stochastic (one eval-noise draw per point)."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result_stem(result.get('seed'), result.get('patience', 0))}.md").write_text(text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for side, label, marker in (("official", "official (baiyimeng @ f77206d)", "o"), ("ours", "recsys-dist", "s")):
        rows = (result.get(side) or {}).get("rows", [])
        if rows:
            axes[0].plot([r["epoch"] for r in rows], [100 * r["val"]["HR@20"] for r in rows], marker=marker, label=label)
            axes[1].plot([r["train_rows_seen"] / 1e3 for r in rows], [100 * r["val"]["HR@20"] for r in rows],
                         marker=marker, label=label)
    for ax, xl in zip(axes, ("epoch", "train rows seen (thousands)")):
        ax.axhline(RANDOM_HR20, color="grey", linestyle=":", label=f"random ({RANDOM_HR20:.2f})")
        ax.set_xlabel(xl)
        ax.set_ylabel("val HR@20 (%)")
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
        ax.legend()
    fig.suptitle("DreamRec on Zhihu: validation HR@20")
    fig.tight_layout()
    fig.savefig(out / f"{result_stem(result.get('seed'), result.get('patience', 0))}.png", dpi=120)
    plt.close(fig)
    return text


def zhihu_popularity(results: Path = REPO / "docs" / "results" / "zhihu.json") -> dict | None:
    """The popularity ranker's test metrics (fractions) on ours' Zhihu test split, as the
    ``reproduce zhihu`` table measured them (its runs' ``popularity_test``); None without it."""
    if not results.exists():
        return None
    for runs in json.loads(results.read_text()).values():
        for run in runs:
            if run.get("popularity_test"):
                return run["popularity_test"]
    return None


def write_seed_summary(out: Path, patience: int, popularity: dict | None = None) -> str:
    """Mean and sample sd over the training seeds already run with ``--patience P`` (every
    ``dreamrec_official_curve[-seed<N>]-patience<P>.json`` in ``out``), each side at its own
    val-selected epoch; written to ``dreamrec_official_curve-patience<P>-seeds.md``.
    popularity: the popularity ranker's test metrics (fractions, :func:`zhihu_popularity`),
    quoted in the header when given."""
    import statistics

    from launcher.reproduce import mean_sd

    runs = []
    for path in sorted(out.glob(f"dreamrec_official_curve*-patience{patience}.json")):
        result = json.loads(path.read_text())
        if result.get("patience") != patience:
            continue
        for side in ("official", "ours"):
            r = result.get(side)
            if not r:
                continue
            seed = result.get("seed")
            order = -1 if seed is None else seed  # each side's default seed first, then --seed N in order
            seed = seed if seed is not None else (r["args"]["seed"] if side == "official" else 0)
            sel = r["selected"]
            # epochs trained: the early stop, else the whole budget
            if side == "official":
                early = r.get("stopped_early_at_epoch") is not None
                trained = r["stopped_early_at_epoch"] if early else r["rows"][-1]["epoch"]
            else:
                early, trained = bool(r.get("stopped_early")), r["epochs"]
            runs.append({"side": side, "seed": seed, "order": order, "file": path.name, "trained": trained, "early": early,
                         "epoch": sel["epoch"],
                         "hr": 100 * sel["test"]["HR@20"], "ndcg": 100 * sel["test"]["NDCG@20"],
                         "train_s": r["train_seconds"], "ran_at": r["ran_at"]})
    if not runs:
        raise SystemExit(f"no dreamrec_official_curve*-patience{patience}.json in {out}: run the sides first")
    lines = [f"DreamRec on Zhihu to the official stopping point (patience {patience} evaluations), every training "
             "seed run so far: test HR@20 / NDCG@20 (%) at each run's val-selected epoch; mean and sample sd over "
             f"seeds. Written by `PYTHONPATH=. python benchmarks/dreamrec_official_curve.py --summary --patience {patience}` "
             f"from the json of each run (random HR@20 {RANDOM_HR20:.2f}"
             + (f"; popularity {100 * popularity['HR@20']:.2f} / {100 * popularity['NDCG@20']:.2f} on ours' "
                "test split, from docs/results/zhihu.json" if popularity else "") + ").", "",
             "| side | seed | epochs trained | selected epoch | test HR@20 | test NDCG@20 | training s | ran | from |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(runs, key=lambda r: (r["side"], r["order"])):
        trained = f"{r['trained']:g}" + ("" if r["early"] else " (no early stop)")
        lines.append(f"| {r['side']} | {r['seed']} | {trained} | {r['epoch']:g} "
                     f"| {r['hr']:.2f} | {r['ndcg']:.2f} | {r['train_s']:.0f} | {r['ran_at']} | {r['file']} |")
    lines += ["", "| side | seeds | test HR@20 | test NDCG@20 | epochs trained (mean) | training s (mean) |",
              "|---|---:|---:|---:|---:|---:|"]
    for side in ("official", "ours"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue

        def ms(key: str) -> str:
            mean, sd = mean_sd([r[key] for r in rs])  # the reproduction tables' mean and sample sd
            return f"{mean:.2f}" + ("" if sd is None else f" ± {sd:.2f}")
        lines.append(f"| {side} | {len(rs)} | {ms('hr')} | {ms('ndcg')} | {statistics.fmean(r['trained'] for r in rs):.0f} "
                     f"| {statistics.fmean(r['train_s'] for r in rs):.0f} |")
    lines += ["", "Ran: when the side started. "
              "The official code's default seed is 2025; ours 0 (the runs without --seed)."]
    text = "\n".join(lines) + "\n"
    (out / f"dreamrec_official_curve-patience{patience}-seeds.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=None,
                        help="folder with the official code (dreamrec.py, sasrec.py, utils.py, run_dreamrec.py), "
                             "outside this repository; required unless --ours-only")
    parser.add_argument("--epochs", type=int, default=30, help="epochs on each side (default 30)")
    parser.add_argument("--eval-every", type=int, default=5, help="validate (and, official, test) every N epochs "
                                                                  "and at the last (default 5)")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--ours-only", action="store_true", help="run only recsys-dist")
    side.add_argument("--official-only", action="store_true", help="run only the official code")
    parser.add_argument("--official-threads", type=int, default=2, help="torch threads of the official run (default 2)")
    parser.add_argument("--official-workers", type=int, default=0,
                        help="DataLoader workers of the official run (its script: 4; default 0, one process)")
    parser.add_argument("--ours-threads", type=int, default=1, help="OMP threads per rank of ours (default 1, 2 ranks)")
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed of both sides (default: each side's own, official 2025, ours 0); "
                             "outputs go to dreamrec_official_curve-seed<N>.*")
    parser.add_argument("--patience", type=int, default=0,
                        help="stop a side after N evaluations without a strictly better val HR@20 (the official "
                             "rule; its defaults: --epochs 1000 --eval-every 10 --patience 5); 0: no early stop")
    parser.add_argument("--eval-seed", type=int, default=2025, help="torch seed of every official evaluation")
    parser.add_argument("--data-dir", default=None,
                        help="Zhihu DreamRec files (default $RECSYS_DATA_DIR or ../shared/datasets, + zhihu/raw/dreamrec)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    parser.add_argument("--summary", action="store_true",
                        help="train nothing: summarize every seed already run with --patience P over seeds "
                             "(writes dreamrec_official_curve-patience<P>-seeds.md)")
    args = parser.parse_args()
    if args.summary:
        if args.patience < 1:
            parser.error("--summary needs --patience P (the runs to the stopping point)")
        print(write_seed_summary(Path(args.out), args.patience, zhihu_popularity()))
        return
    if args.epochs < 1 or args.eval_every < 1 or args.patience < 0:
        parser.error("--epochs and --eval-every must be >= 1, --patience >= 0")
    if not args.ours_only and not args.official:
        parser.error("--official DIR is required (or --ours-only)")
    root = Path(args.data_dir) if args.data_dir else Path(os.environ.get("RECSYS_DATA_DIR", REPO.parent / "shared" / "datasets"))
    args.data_dir = zhihu_dir(root)

    from _common import machine_info

    info = machine_info()
    print(f"machine: {info}", flush=True)
    out = Path(args.out)
    result = {"epochs": args.epochs, "eval_every": args.eval_every, "patience": args.patience, "machine": info,
              "seed": args.seed}
    prev_path = out / f"{result_stem(args.seed, args.patience)}.json"
    if (args.ours_only or args.official_only) and prev_path.exists():
        prev = json.loads(prev_path.read_text())
        keep = "official" if args.ours_only else "ours"
        if (prev.get("epochs"), prev.get("eval_every"), prev.get("patience", 0), bool(prev.get(keep))) == \
                (args.epochs, args.eval_every, args.patience, True):
            result[keep] = prev[keep]
            print(f"[{keep}] kept from {prev_path} (ran {prev[keep]['ran_at']})", flush=True)
    if not args.ours_only:
        result["official"] = dict(run_official(args), machine=info)
    if not args.official_only:
        result["ours"] = dict(run_ours(args), machine=info)
    text = write_report(result, out)
    prev_path.write_text(json.dumps(result, indent=2, default=str))
    print(text)
    print(f"wrote {out / result_stem(args.seed, args.patience)}.md, .png, .json")


if __name__ == "__main__":
    main()
