"""Training and full-catalog evaluation throughput, recsys-dist against the official code in the
same job, each model at its official code's configuration.

    git --git-dir=/work/.mirror/WHUIR+DiffuRec/repo archive HEAD -- src | tar -x -C /tmp/official-diffurec
    git --git-dir=/work/.mirror/baiyimeng+DreamRec/repo archive HEAD -- dreamrec.py sasrec.py utils.py \\
        run_dreamrec.py | tar -x -C /tmp/official-dreamrec     # outside this repo (mkdir -p them first)
    torchrun --standalone --nproc-per-node 2 benchmarks/train_eval_throughput.py \\
        --official-diffurec /tmp/official-diffurec --official-dreamrec /tmp/official-dreamrec
    torchrun --standalone --nproc-per-node 2 benchmarks/train_eval_throughput.py   # ours alone, no ratio

Models (``--models``): DiffuRec and SASRec on ML-1M at the official DiffuRec configuration
(d 128, 4 blocks x 4 heads, max_len 50, global batch 512, T 32), DreamRec on Zhihu at the
official DreamRec configuration (d 64, global batch 256, T 1000 linear, 20 DDIM steps with
classifier-free guidance at eval, = ``configs/zhihu_dreamrec.yaml``). SASRec has no official
code here (ours only). Figures: training samples/s over ``--steps`` steps after ``--warmup``
(the samples the timed steps actually processed, divided by their wall time), and evaluation
users/s (reverse diffusion + exact full-catalog scoring) over the same test rows on both sides
(``test_selection``): ML-1M, ``--eval-users`` users, the first equal share of each rank's test
records (user ids ascend with the raw id on both sides, so the official side scores the same
users; before 2026-12-02 the first ``--eval-users`` ids were taken, which all sat on rank 0:
ours' evaluation then ran on one of its two ranks); Zhihu, the first ``--eval-users`` test rows
in record-id order, completed to the last session's rows, which the official side reads as the
file's first rows (their targets are checked; by default every row, so both ranks are full).

How the two sides share the 2 cores: ``--repeats`` rounds of A then B for each official side;
models timed against the same official run (``diffurec`` and ``diffurec-ddim4``: same data and
official side, ours differ only in the sampler) share its rounds, A then each one's B, so the
official code runs once a round and every ratio stays paired in time (the per-round table
repeats that one official measurement on each such model's rows).

- A, the official side (WHUIR/DiffuRec @ f6f70c9 from ``--official-diffurec DIR``,
  baiyimeng/DreamRec @ f77206d from ``--official-dreamrec DIR``; imported from DIR at run
  time, unchanged, by ``benchmarks/_official.py``, which also holds the one runtime patch,
  ``np.int = int`` while DiffuRec's model is built): rank 0 alone, 1 process x
  ``--official-threads`` (default 2) torch threads, while rank 1 waits in
  ``torch.distributed.monitored_barrier`` (a blocking receive: it measured ~0.02 CPU-s over
  4 s here, and the table reports what it used). A fresh official model (its seed) per round;
  its train-loop body (DiffuRec: ``trainer.model_train``'s batch loop; DreamRec: its
  ``utils.train`` called on the batches) over warm-up + timed steps, then its test-loop body
  (DiffuRec: ``trainer.model_train``'s test loop, in eval mode: reverse diffusion, scores over
  the whole catalog, ``topk(100)``, ``hrs_and_ndcgs_k``; DreamRec: ``utils.evaluate``).
  Datasets are built once, before the first round, from the plain files in the data dir
  (DiffuRec: its ``dataset.pkl`` dict rebuilt from ``ml-1m/raw/diffurec/interactions.tsv.gz``,
  its ``Data_Train`` / ``Data_Test``; DreamRec: ``zhihu/raw/dreamrec/*_data.tsv.gz`` into its
  ``RecDataset``), at the official batch sizes (train and test: 512 DiffuRec, 256 DreamRec),
  DataLoader workers 0 (DiffuRec's default; DreamRec's script uses 4).
- B, ours: 2 ranks x 1 thread (torchrun), a fresh model per round, as ``recsys_dist.train``
  steps it; eval batch 256.

Both sides: the train batches are drawn from each side's own loader before the clock starts
(the official loader's cost per batch is reported separately); evaluation is timed with its
loader. Without an official path a model's row is ours alone and says no ratio was measured.
Prints markdown tables on rank 0 and saves ``benchmarks/out/<--out>.{md,png}`` (default
``train_eval_throughput``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
import traceback
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _official

OFFICIAL_DIFFUREC = ["model.dim=128", "model.num_blocks=4", "model.num_heads=4"]
MODELS = {
    "diffurec": {"config": "configs/ml1m_diffurec.yaml", "overrides": OFFICIAL_DIFFUREC, "global_batch": 512,
                 "setting": "ML-1M, d 128, 4x4 blocks, max_len 50, T 32", "official": "diffurec",
                 "code": "WHUIR/DiffuRec @ f6f70c9",
                 "quoted": "official DiffuRec: 112 train seq/s, 17.7 eval users/s (first table); "
                           "231-239 / 34.8-35.6 (its 2026-12-01 side-by-side session)"},
    # the same model and official side, ours sampling in 4 DDIM steps (model.sample_steps; quality
    # against S: benchmarks/diffurec_few_step.py); the official code samples its 32 steps
    "diffurec-ddim4": {"config": "configs/ml1m_diffurec.yaml", "overrides": [*OFFICIAL_DIFFUREC, "model.sample_steps=4"],
                       "global_batch": 512, "setting": "ML-1M, d 128, 4x4 blocks, max_len 50, T 32; ours: 4 DDIM steps",
                       "official": "diffurec", "code": "WHUIR/DiffuRec @ f6f70c9 (32 ancestral steps)",
                       "quoted": "as diffurec"},
    "sasrec": {"config": "configs/ml1m_sasrec.yaml", "overrides": OFFICIAL_DIFFUREC, "global_batch": 512,
               "setting": "ML-1M, d 128, 4x4 blocks, max_len 50", "official": None, "code": None,
               "quoted": "RecBole 1.2.1 SASRec at another config (max_len 200, d 64, 2 blocks): "
                         "124 train seq/s, 910 eval users/s"},
    "dreamrec": {"config": "configs/zhihu_dreamrec.yaml", "overrides": [], "global_batch": 256,
                 "setting": "Zhihu, d 64, T 1000, 20 DDIM steps x 2 (CFG)", "official": "dreamrec",
                 "code": "baiyimeng/DreamRec @ f77206d",
                 "quoted": "official DreamRec: 3,717 train seq/s, ~3,700-4,000 eval users/s (first table); "
                           "9,647-11,766 / 10,677-12,608 (its 2026-12-01 session)",
                 "steps": 200, "eval_users": 8192},  # ~0.03 s a step: more steps, every test row
}


# ---------------------------------------------------------------------------------------------
# CPU accounting of a phase

class Phase:
    """Wall time of a block, this process's CPU seconds and the machine's busy CPU seconds."""

    def __enter__(self):
        from _common import busy_cpu_s
        t = os.times()
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), t.user + t.system, busy_cpu_s()
        return self

    def __exit__(self, *exc):
        from _common import busy_cpu_s
        t = os.times()
        self.wall = time.perf_counter() - self.t0
        self.cpu = t.user + t.system - self.cpu0
        self.busy = busy_cpu_s() - self.busy0
        return False


def other_cores(phases: list) -> float:
    """Cores kept busy by processes other than the ranks during a phase (rank 0's window)."""
    return max(0.0, phases[0]["busy"] - sum(p["cpu"] for p in phases)) / max(phases[0]["wall"], 1e-9)


def gather_phase(ph: Phase) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, {"wall": ph.wall, "cpu": ph.cpu, "busy": ph.busy})
    return out


# ---------------------------------------------------------------------------------------------
# official side (rank 0 only)

class OfficialDiffuRec:
    """WHUIR/DiffuRec @ f6f70c9 on ML-1M at main.py's defaults (``--dataset ml-1m --device cpu``)."""

    def __init__(self, folder, data_root: Path, global_batch: int, warmup: int, steps: int, sel: dict):
        import _official as off

        self.off, self.warmup = off, warmup
        self.m = off.import_diffurec(folder)
        self.args = off.diffurec_args(folder, ["--dataset", "ml-1m", "--device", "cpu",
                                               "--batch_size", str(global_batch)])
        data = off.ml1m_sequences(data_root / "ml-1m" / "raw" / "diffurec" / "interactions.tsv.gz")
        self.args.item_num = len(data["smap"])  # main.py:148 item_num_create
        off.set_seeds(self.args.random_seed)  # main.py:141 fix_random_seed_as
        t0 = time.perf_counter()
        train = self.m.utils.Data_Train(data["train"], self.args)  # every prefix of every user
        loader = train.get_pytorch_dataloaders()
        self.split_s = time.perf_counter() - t0
        self.train_rows = len(loader.dataset)
        t0 = time.perf_counter()
        self.batches = list(islice(iter(loader), warmup + steps))
        self.loader_s_per_batch = (time.perf_counter() - t0) / max(len(self.batches), 1)
        del train, loader
        gc.collect()
        # the same users as ours: user idx = ascending raw user id on both sides, and ours keeps all 6,040
        ordered = sorted(data["test"])  # TestDataset's order: sorted user ids = ours' user ids
        users = [ordered[u] for u in sel["records"]]  # ours' chosen users, each rank's share
        sub = {k: {u: data[k][u] for u in users} for k in ("train", "val", "test")}
        self.test_loader = self.m.utils.Data_Test(sub["train"], sub["val"], sub["test"],
                                                  self.args).get_pytorch_dataloaders()
        self.num_items = self.args.item_num
        self.info = (f"{self.train_rows:,} train prefixes (Data_Train built in {self.split_s:.1f} s), "
                     f"{self.num_items:,} items, batch {self.args.batch_size}, its loader "
                     f"{self.loader_s_per_batch:.3f} s a batch (not in the timed steps)")

    def run(self) -> dict:
        device = torch.device("cpu")
        self.off.set_seeds(self.args.random_seed)
        model = self.off.build_diffurec(self.m, self.args, device)
        optimizer = self.m.trainer.optimizers(model, self.args)
        model.train()
        t0, samples = None, 0
        for i, b in enumerate(self.batches):
            if i == self.warmup:
                t0 = time.perf_counter()
            self.off.diffurec_train_step(model, optimizer, b, device)
            if i >= self.warmup:
                samples += int(b[0].shape[0])
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = self.off.diffurec_test_pass(self.m, model, self.test_loader, self.args.metric_ks, device)
        eval_s = time.perf_counter() - t0
        return {"train_samples": samples, "train_steps": len(self.batches) - self.warmup, "train_s": train_s,
                "eval_users": metrics["num_users"], "eval_s": eval_s, "threads": torch.get_num_threads()}


class OfficialDreamRec:
    """baiyimeng/DreamRec @ f77206d on Zhihu at run_dreamrec.py's defaults."""

    def __init__(self, folder, data_root: Path, global_batch: int, warmup: int, steps: int, sel: dict):
        from torch.utils.data import DataLoader
        import _official as off

        self.off, self.warmup = off, warmup
        self.utils, self.dreamrec, run_script = off.import_dreamrec(folder, "--official-dreamrec")
        data_dir = off.zhihu_dir(data_root)
        self.args = off.dreamrec_args(run_script, data_dir)
        self.args.batch_size = global_batch
        self.utils.setup_seed(self.args.seed)
        train = self.utils.RecDataset(off.Frame(off.load_split(data_dir, "train")))
        self.train_rows = len(train)
        t0 = time.perf_counter()
        self.batches = list(islice(iter(DataLoader(train, self.args.batch_size, True, num_workers=0)),
                                   warmup + steps))
        self.loader_s_per_batch = (time.perf_counter() - t0) / max(len(self.batches), 1)
        rows = off.load_split(data_dir, "test", sel["rows"])  # the file's first rows: ours' first test sessions
        same = sorted(int(t) + 1 for t in rows[:, 2]) == sel["targets"]  # ours: item = raw + 1
        test = self.utils.RecDataset(off.Frame(rows))
        self.test_loader = DataLoader(test, self.args.batch_size, False, num_workers=0)
        self.num_items = self.args.item_num
        self.info = (f"{self.train_rows:,} train rows, {self.num_items:,} items, batch {self.args.batch_size}, "
                     f"DataLoader workers 0 (its script: 4), its loader {self.loader_s_per_batch:.4f} s a batch "
                     f"(not in the timed steps); its first {len(rows):,} test rows, whose targets "
                     f"{'are' if same else 'are NOT'} those of the rows ours scores")

    def run(self) -> dict:
        device = torch.device("cpu")
        self.utils.setup_seed(self.args.seed)
        model, optimizer = self.off.dreamrec_model_and_optimizer(self.dreamrec, self.args, device)
        if self.warmup:
            self.utils.train(model, self.batches[:self.warmup], device, optimizer)
        timed = self.batches[self.warmup:]
        t0 = time.perf_counter()
        self.utils.train(model, timed, device, optimizer)  # its train(): the loop over the batches given
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.utils.evaluate(model, self.test_loader, device, [10, 20])
        eval_s = time.perf_counter() - t0
        return {"train_samples": sum(int(b[0].shape[0]) for b in timed), "train_steps": len(timed),
                "train_s": train_s, "eval_users": len(self.test_loader.dataset), "eval_s": eval_s,
                "threads": torch.get_num_threads()}


OFFICIAL = {"diffurec": OfficialDiffuRec, "dreamrec": OfficialDreamRec}


def on_rank0_alone(rank: int, threads: int, timeout_s: float, fn):
    """``fn()`` on rank 0 with ``threads`` torch threads while the other ranks wait in a
    monitored barrier; returns (fn's value on rank 0 / None elsewhere, the gathered phases).
    An exception on rank 0 ends every rank."""
    value, error = None, None
    with Phase() as ph:
        if rank == 0:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - re-raised on every rank below
                error = traceback.format_exc()
            finally:
                torch.set_num_threads(prev)
        torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    status = [error]
    torch.distributed.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise SystemExit(f"official side failed on rank 0:\n{status[0]}")
    return value, gather_phase(ph)


# ---------------------------------------------------------------------------------------------
# our side (every rank)

def ours_config(spec: dict, args, world: int, global_batch: int):
    from recsys_dist.config import load_config

    cfg = load_config(spec["config"], [*spec["overrides"], f"train.batch_size={global_batch // world}",
                                       *args.overrides])
    cfg.eval.batch_size = 256
    return cfg


def test_selection(spec: dict, args, rank: int, world: int, global_batch: int, eval_users: int) -> dict:
    """The test rows both sides score: ``records`` (ours' record ids, sorted), ``rows`` (how
    many test rows) and ``targets`` (their target ids, sorted).

    DiffuRec (ML-1M, one test row per user, user id = the official code's user index): the first
    ``eval_users / world`` users of *each rank's* share, so every rank scores as many users (the
    test records are split across ranks in blocks of ids: the first ``eval_users`` ids overall
    would all sit on rank 0, and the other rank would idle); the official side scores the same
    users. DreamRec (Zhihu, sessions of several rows, the official side reads the file's first
    rows): the first ``eval_users`` rows in record-id order, completed to the whole last record
    (by default every one of the 7,911 rows, so both ranks are full)."""
    from recsys_dist.train.data import ensure_shards, make_loader

    cfg = ours_config(spec, args, world, global_batch)
    manifest = ensure_shards(cfg, rank)
    test, _ = make_loader(cfg, manifest, "test", rank, world, False, cfg.eval.batch_size)
    mine = [(int(u), int(t)) for b in test for u, t in zip(b["user"].tolist(), b["target"].tolist())]
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    if not any(every):
        raise SystemExit(f"{spec['config']}: the test split is empty")
    if spec["official"] == "diffurec":
        share = -(-eval_users // world)
        chosen = sorted(p for part in every for p in sorted(part)[:share])
    else:
        pairs = sorted(p for part in every for p in part)
        cut = pairs[min(eval_users, len(pairs)) - 1][0] + 1
        chosen = [p for p in pairs if p[0] < cut]
    return {"records": sorted({u for u, _ in chosen}), "rows": len(chosen), "targets": sorted(t for _, t in chosen)}


def run_ours(name: str, spec: dict, args, rank: int, world: int, device, global_batch: int, steps: int,
             records: list[int]) -> dict:
    from recsys_dist.distributed import seed_everything
    from recsys_dist.models import build_model
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.train.data import ensure_shards, make_loader
    from recsys_dist.train.engine import build_engine
    from recsys_dist.train.step import train_step
    from recsys_dist.train.validate import evaluate_model

    cfg = ours_config(spec, args, world, global_batch)
    seed_everything(0)
    manifest = ensure_shards(cfg, rank)
    table = ShardedItemTable.create(int(manifest["num_items"]) + 1, cfg.model.dim, cfg.sparse, device,
                                    cfg.train.batch_size, 0)
    engine = build_engine(build_model(cfg.model, cfg.data.max_len), cfg.train, device)
    loader, _ = make_loader(cfg, manifest, "train", rank, world, True, cfg.train.batch_size)
    batches = list(islice(iter(loader), args.warmup + steps))
    with Phase() as ph:
        for step, b in enumerate(batches):
            if step == args.warmup:
                torch.distributed.barrier()
                t0 = time.perf_counter()
            train_step(engine, table, b["history"].to(device), b["target"].to(device), step, 0)
        torch.distributed.barrier()
        train_s = time.perf_counter() - t0
        # the samples actually processed, over all ranks: an epoch may hold fewer than warmup + steps batches
        counts = torch.tensor([sum(int(b["target"].shape[0]) for b in batches[args.warmup:]),
                               len(batches) - args.warmup])
        torch.distributed.all_reduce(counts)
        test, _ = make_loader(cfg, manifest, "test", rank, world, False, cfg.eval.batch_size)
        keep = torch.tensor(records, dtype=torch.long)
        users = ({k: v[torch.isin(b["user"], keep)] for k, v in b.items()} for b in test)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        metrics = evaluate_model(engine.module, table, users, cfg.eval, cfg.data.max_len)
        eval_s = time.perf_counter() - t0
    phases = gather_phase(ph)
    del engine, table
    gc.collect()
    return {"train_samples": int(counts[0]), "train_steps": int(counts[1]) // world, "train_s": train_s,
            "eval_users": int(metrics["num_users"]), "eval_s": eval_s, "num_items": int(manifest["num_items"]),
            "other_cores": other_cores(phases), "threads": torch.get_num_threads(), "ranks": world,
            "mask_history": bool(cfg.eval.mask_history)}


# ---------------------------------------------------------------------------------------------
# report

def rates(r: dict) -> tuple[float, float]:
    return r["train_samples"] / r["train_s"], r["eval_users"] / r["eval_s"]


def span(values, fmt="{:,.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if len(values) == 1 or fmt.format(lo) == fmt.format(hi) else \
        f"{fmt.format(lo)}-{fmt.format(hi)}"


def rate_fmt(values) -> str:
    return "{:,.1f}" if max(values) < 100 else "{:,.0f}"


def report(results: dict, args, info: dict, world: int) -> str:
    measured = any(row.get("official") for rows in results.values() for row in rows)
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB, torch {info['torch']}, "
             f"python {info['python']}; load average at start {info['loadavg_at_start'][0]:.2f}; {info['date']}.",
             f"Ours: {world} ranks x 1 thread. "
             + (f"Official: rank 0 alone, 1 process x {args.official_threads} threads, the other rank waiting in a "
                f"monitored barrier; {args.repeats} round(s) of official then ours per official side (models "
                f"timed against one official run share its rounds). " if measured else
                f"{args.repeats} round(s) per model. ")
             + f"{args.warmup} warm-up steps, then the timed steps.", ""]
    busiest = max(r[side]["other_cores"] for rows in results.values() for r in rows for side in ("official", "ours")
                  if r.get(side))
    if busiest > 0.25:
        lines += [f"**Not an idle machine**: other processes kept up to {busiest:.2f} cores busy during a phase "
                  "(see each round). Everything slows down, and a process of 2 OpenMP threads (the official side) "
                  "far more than 2 single-threaded ranks: these figures do not stand for an idle machine.", ""]
    if measured:
        lines += ["Ratio = ours / official, per round (paired); ranges are over the rounds.", "",
                  "| model | setting | official train seq/s | ours train seq/s | ratio | official eval users/s "
                  "| ours eval users/s | ratio | rounds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, rows in results.items():
            spec = MODELS[name]
            ot = [rates(r["official"])[0] for r in rows if r.get("official")]
            oe = [rates(r["official"])[1] for r in rows if r.get("official")]
            ut, ue = [rates(r["ours"])[0] for r in rows], [rates(r["ours"])[1] for r in rows]
            if ot:
                rt = [u / o for u, o in zip(ut, ot)]
                re_ = [u / o for u, o in zip(ue, oe)]
                lines.append(f"| {name} | {spec['setting']} | {span(ot, rate_fmt(ot))} | {span(ut, rate_fmt(ut))} | "
                             f"{span(rt, '{:.2f}x')} | {span(oe, rate_fmt(oe))} | {span(ue, rate_fmt(ue))} | "
                             f"{span(re_, '{:.2f}x')} | {len(rows)} |")
            else:
                why = "no official code here" if spec["official"] is None else \
                    f"not run (--official-{spec['official']} not given)"
                lines.append(f"| {name} | {spec['setting']} | {why} | {span(ut, rate_fmt(ut))} | | {why} | "
                             f"{span(ue, rate_fmt(ue))} | | {len(rows)} |")
    else:
        lines += ["No ratio was measured: the official code did not run in this job (pass --official-diffurec "
                  "and --official-dreamrec). Figures quoted elsewhere come from other machines (machines of one "
                  "kind differ 2-3x), so they are context, not a baseline.", "",
                  "| model | setting | ours train seq/s | ours eval users/s | rounds |",
                  "|---|---|---:|---:|---:|"]
        for name, rows in results.items():
            ut, ue = [rates(r["ours"])[0] for r in rows], [rates(r["ours"])[1] for r in rows]
            lines.append(f"| {name} | {MODELS[name]['setting']} | {span(ut, rate_fmt(ut))} | "
                         f"{span(ue, rate_fmt(ue))} | {len(rows)} |")
    lines += ["", "Each round (samples and users actually processed; other cores: CPU other processes kept busy "
              "during the phase; waiting rank: CPU-s rank 1 used while the official side ran):", "",
              "| model | round | side | timed steps | train samples | train s | train seq/s | test users | eval s "
              "| eval users/s | threads | other cores | waiting rank CPU-s |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        for i, row in enumerate(rows, 1):
            for side in ("official", "ours"):
                r = row.get(side)
                if not r:
                    continue
                tr, ev = rates(r)
                threads = f"{r['threads']}" if side == "official" else f"{r['ranks']} x {r['threads']}"
                wait = f"{r['waiting_cpu_s']:.2f}" if side == "official" else ""
                lines.append(f"| {name} | {i} | {side} | {r['train_steps']} | {r['train_samples']:,} | "
                             f"{r['train_s']:.2f} | {tr:,.1f} | {r['eval_users']:,} | {r['eval_s']:.2f} | "
                             f"{ev:,.1f} | {threads} | {r['other_cores']:.2f} | {wait} |")
    lines.append("")
    for name, rows in results.items():
        spec, off = MODELS[name], results[name][0].get("official_info")
        items = rows[0]["ours"]["num_items"]
        if off:
            lines.append(f"- {name}: official {spec['code']}: {off}; ours: {items:,} items.")
        else:
            lines.append(f"- {name}: ours {items:,} items; context only, quoted in ../shared/reference.md from "
                         f"other machines: {spec['quoted']}.")
    masked = sorted({name for name, rows in results.items() if rows[0]["ours"]["mask_history"]})
    lines.append("- Train: each side's batches drawn from its own loader before the clock starts; steps timed "
                 "with time.perf_counter. Eval: timed with its loader; ours ranks each target exactly against "
                 "every item (" + ("seen items excluded for " + ", ".join(masked) if masked else "no item excluded")
                 + "), the official code scores every item and takes top-k (DiffuRec: topk(100) and its "
                 "hrs_and_ndcgs_k's top-20 over CPU copies; DreamRec: topk(100)); eval batch 256 ours, the "
                 "official batch size theirs (DiffuRec 512, DreamRec 256).")
    if any(name in results for name in ("diffurec", "diffurec-ddim4", "sasrec")):
        lines.append("- ML-1M catalog: the official DiffuRec code ranks all 3,706 items (its dataset.pkl, no "
                     "k-core); ours applies the iterated 5-core of configs/datasets/ml1m.yaml (fewer items) and "
                     "trains on each user's last 40 prefixes (the official: every prefix); a step's cost does "
                     "not depend on which prefixes.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, idx, title in ((axes[0], 0, "train samples/s"), (axes[1], 1, "eval users/s")):
        for off, (side, label) in ((-0.2, ("official", "official code")), (0.2, ("ours", "recsys-dist"))):
            xs, mid, err = [], [], [[], []]
            for i, name in enumerate(names):
                vals = [rates(r[side])[idx] for r in results[name] if r.get(side)]
                if vals:
                    m = sum(vals) / len(vals)
                    xs.append(i + off)
                    mid.append(m)
                    err[0].append(m - min(vals))
                    err[1].append(max(vals) - m)
            if xs:
                ax.bar(xs, mid, 0.4, yerr=err, capsize=3, label=label)
        ax.set_xticks(list(range(len(names))), names)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def official_groups(args) -> list[list[str]]:
    """``args.models`` grouped (in order of each group's first model) by the official run they are timed against: the same official
    code at the same batch, steps and test rows (e.g. ``diffurec`` and ``diffurec-ddim4``: one
    official DiffuRec run a round for both). Models without official code stay alone."""
    groups: dict[tuple, list[str]] = {}
    for name in args.models:
        spec = MODELS[name]
        # ours' overrides may differ only in sampling (they share the official run and the test rows)
        data = [o for o in spec["overrides"] if not o.startswith(("model.sample_steps", "model.eta"))]
        key = (spec["official"], spec["config"], tuple(data), spec["global_batch"], spec.get("steps"),
               spec.get("eval_users"))
        groups.setdefault(key if spec["official"] else (name,), []).append(name)
    return list(groups.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20; DreamRec 200)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=None,
                        help="samples per step, ours over all ranks and the official side's batch "
                             "(default: each model's official batch, 512 or 256)")
    parser.add_argument("--eval-users", type=int, default=None,
                        help="test rows timed, completed to whole records (default: 1024; DreamRec 8192, "
                             "every one of Zhihu's 7,911)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of official then ours per model (default 2)")
    parser.add_argument("--official-diffurec", default=None, metavar="DIR",
                        help="a WHUIR/DiffuRec @ f6f70c9 checkout (or its src/) outside this repository")
    parser.add_argument("--official-dreamrec", default=None, metavar="DIR",
                        help="a baiyimeng/DreamRec @ f77206d checkout outside this repository")
    parser.add_argument("--official-threads", type=int, default=2, help="torch threads of the official side")
    parser.add_argument("--official-timeout", type=float, default=7200.0,
                        help="seconds the other ranks wait for one official phase (default 7200)")
    parser.add_argument("--data-dir", default=None,
                        help="raw data root of the official side (default $RECSYS_DATA_DIR or ../shared/datasets)")
    parser.add_argument("--out", default="train_eval_throughput",
                        help="output name under benchmarks/out/ (.md and .png; default train_eval_throughput)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every model (ours)")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error("--repeats and --steps must be >= 1, --warmup >= 0")

    import _official
    from _common import machine_info
    from shards.rawio import default_data_dir

    folders = {"diffurec": args.official_diffurec, "dreamrec": args.official_dreamrec}
    if folders["diffurec"]:
        _official.diffurec_src(folders["diffurec"])  # fail early, on every rank, on a wrong folder
    if folders["dreamrec"]:
        _official.checkout_dir(folders["dreamrec"], _official.DREAMREC_FILES, _official.DREAMREC_WHAT,
                               "--official-dreamrec")
    data_root = Path(args.data_dir or default_data_dir())

    from recsys_dist.distributed import init_distributed, pick_device
    from recsys_dist.train.report import setup_logging

    device = pick_device("auto")
    rank, world = init_distributed(device)
    setup_logging(rank)
    info = machine_info() if rank == 0 else None
    results = {}
    for group in official_groups(args):
        # models sharing one official side and setting (diffurec, diffurec-ddim4) share its rounds:
        # the official code runs once a round, then each of ours, so every ratio stays paired in time
        spec = MODELS[group[0]]
        global_batch = args.global_batch or spec["global_batch"]
        steps, eval_users = args.steps or spec.get("steps", 20), args.eval_users or spec.get("eval_users", 1024)
        folder = folders.get(spec["official"]) if spec["official"] else None
        official, official_info = None, None
        sel = test_selection(spec, args, rank, world, global_batch, eval_users)
        if folder:
            def prepare():
                return OFFICIAL[spec["official"]](folder, data_root, global_batch, args.warmup, steps, sel)
            official, _ = on_rank0_alone(rank, args.official_threads, args.official_timeout, prepare)
            official_info = official.info if rank == 0 else None
            if rank == 0:
                print(f"[official {spec['official']}] {official_info}", flush=True)
        for name in group:
            results[name] = []
        for rep in range(args.repeats):
            measured = None
            if folder:
                value, phases = on_rank0_alone(rank, args.official_threads, args.official_timeout,
                                               official.run if rank == 0 else None)
                if rank == 0:
                    measured = dict(value, other_cores=other_cores(phases),
                                    waiting_cpu_s=sum(p["cpu"] for p in phases[1:]))
                    tr, ev = rates(measured)
                    print(f"[official {spec['official']} round {rep + 1}] train {tr:,.1f} seq/s, "
                          f"eval {ev:,.1f} users/s", flush=True)
            for name in group:
                row = {"official_info": official_info}
                if measured is not None:
                    row["official"] = measured
                row["ours"] = run_ours(name, MODELS[name], args, rank, world, device, global_batch, steps,
                                       sel["records"])
                if rank == 0:
                    tr, ev = rates(row["ours"])
                    print(f"[ours {name} round {rep + 1}] train {tr:,.1f} seq/s, eval {ev:,.1f} users/s",
                          flush=True)
                results[name].append(row)
        del official
        gc.collect()
    if rank == 0:
        text = report(results, args, info, world)
        print(text)
        out = Path("benchmarks/out")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.out}.md").write_text(text + "\n")
        plot(results, out / f"{args.out}.png")


if __name__ == "__main__":
    main()
    from recsys_dist.distributed import exit_without_finalization, shutdown
    shutdown()  # a finished 2-rank DeepSpeed job: leave as the trainer does (docs/faults.md)
    exit_without_finalization(0)
