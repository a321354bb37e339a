"""Data-loader throughput (local files and S3) against the rate the trainer consumes samples.

What and how: samples/s that ``shards.dataset.SequenceDataset`` delivers through a ``DataLoader``
(``batch_size=None``, batch 256, shuffle on as in training, ``num_workers`` 0, 1, 2) on the
train split of a synthetic ``seq-v2`` shard set (1M items, 50k users, read with max_len 20; generated with
``shards.synthetic.synth_shards`` unless ``--shards`` names an existing one), read from local
files and from a real S3-protocol server: moto's ``ThreadedMotoServer`` on 127.0.0.1, started
by this script in a child process (``--s3-server thread`` keeps it in this process), the shards
uploaded with s3fs, ``AWS_ENDPOINT_URL`` and dummy credentials set in ``os.environ`` before
any reader exists. After the first ``--warmup-batches`` batches (shuffle buffer fill, worker
start) ``--batches`` batches are timed. In the same job the trainer's consumption rate is
measured on 1 rank (gloo, ``--trainer-threads`` intra-op threads): the real training step
(``ShardedItemTable`` + ``build_model`` + DeepSpeed engine + ``train_step``) of the default
model configs (``configs/models/{sasrec,diffurec}.yaml``, d 64, batch 256) on batches read
beforehand, for the default full-catalog CE and for sampled softmax (1024 negatives): samples/s
consumed = steps/s x 256. Finally the fastest trainer is fed live by the DataLoader (loader and
trainer share the 2 cores, as in a real job). Every timing records the CPU time other
processes used meanwhile (from ``/proc/stat`` minus this job's own processes) and is redone
(``--retries``) when that exceeds ``--max-other-load`` cores. Prints a markdown table and writes
``benchmarks/out/loader_throughput.{md,json,png}``. Takes about 4.5 minutes (+40 s to generate
the shards the first time)::

    PYTHONPATH=. python benchmarks/loader_throughput.py
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import time
import warnings
from itertools import islice
from pathlib import Path

import torch

from _common import LoadProbe, machine_info  # benchmarks/_common.py (the script's folder is on sys.path)

BATCH = 256


# --------------------------------------------------------------------------- machine / load


def measured(fn, args, what: str) -> dict:
    """Run ``fn()`` -> dict until no other process used more than ``--max-other-load`` cores
    (at most ``1 + --retries`` times); keep the least disturbed run."""
    best = None
    for attempt in range(1 + args.retries):
        with LoadProbe() as p:
            r = fn()
        r.update(other_cores=round(p.other, 2), loadavg_1m=round(p.loadavg, 2), attempt=attempt + 1)
        if best is None or r["other_cores"] < best["other_cores"]:
            best = r
        if p.other <= args.max_other_load:
            break
        print(f"  [{what}: other processes used {p.other:.2f} cores during the run; re-measuring]", flush=True)
    return best


# --------------------------------------------------------------------------- S3 server


def _serve_moto(queue, stop) -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    queue.put(server.get_host_and_port())
    stop.wait()
    server.stop()


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 at a free port, in a child process (``mode="process"``,
    so that the in-process reader of ``num_workers=0`` does not share its GIL with the server) or in a
    thread of this process; points the standard AWS variables at it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        if mode == "process":
            ctx = mp.get_context("spawn")
            q, self.stop = ctx.Queue(), ctx.Event()
            self.proc = ctx.Process(target=_serve_moto, args=(q, self.stop), daemon=True)
            self.proc.start()
            host, port = q.get(timeout=120)
        else:
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            from moto.server import ThreadedMotoServer
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(k, None)
        os.environ.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                          AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                          AWS_EC2_METADATA_DISABLED="true")

    def close(self) -> None:
        if self.mode == "process":
            self.stop.set()
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
        else:
            self.server.stop()


def upload(local_dir: str, bucket: str, prefix: str) -> tuple[str, float, int]:
    import boto3
    import fsspec
    from shards.storage import storage_options
    boto3.client("s3").create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/{prefix}"
    fs = fsspec.filesystem("s3", **storage_options(url))
    t0 = time.perf_counter()
    names = sorted(os.listdir(local_dir))
    for name in names:
        fs.put_file(os.path.join(local_dir, name), f"{bucket}/{prefix}/{name}")
    nbytes = sum(os.path.getsize(os.path.join(local_dir, n)) for n in names)
    return url, time.perf_counter() - t0, nbytes


# --------------------------------------------------------------------------- measurements


MAX_LEN = 20  # set from --max-len in main()


def loader(url: str, workers: int, shuffle_seed: int = 0):
    from torch.utils.data import DataLoader
    from shards.dataset import SequenceDataset
    rd = SequenceDataset(url, "train", BATCH, max_len=MAX_LEN, shuffle=True, seed=shuffle_seed, drop_last=True)
    return DataLoader(rd, batch_size=None, num_workers=workers, persistent_workers=False)


def time_loader(url: str, workers: int, warmup: int, batches: int) -> dict:
    it = iter(loader(url, workers))
    t_start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(int(next(it)["target"].shape[0]) for _ in range(batches))
    dt = time.perf_counter() - t0
    del it
    return {"samples_per_s": n / dt, "timed_samples": n, "seconds": dt, "startup_s": t0 - t_start}


def make_trainer(name: str, manifest: dict, device):
    from recsys_dist.config import load_config
    from recsys_dist.models import build_model
    from recsys_dist.distributed import seed_everything
    from recsys_dist.train.engine import build_engine
    cfg = load_config(f"configs/models/{name}.yaml", [f"train.batch_size={BATCH}",
                                                      f"data.max_len={MAX_LEN}"])
    seed_everything(0)
    return cfg, build_engine(build_model(cfg.model, cfg.data.max_len), cfg.train, device)


def time_trainer(engine, table, batches, warmup: int, loss: str, step0: int) -> dict:
    from recsys_dist.train.catalog_loss import build_catalog_loss
    from recsys_dist.train.step import train_step
    catalog_loss = build_catalog_loss(loss, table, engine.module)
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        train_step(engine, table, b["history"], b["target"], step0 + i, 0, catalog_loss)
        times.append(time.perf_counter() - t)
    timed = times[warmup:]
    return {"s_per_step": sum(timed) / len(timed), "samples_per_s": BATCH * len(timed) / sum(timed),
            "steps": len(timed), "step_times": [round(t, 3) for t in times]}


def time_live(engine, table, url: str, workers: int, warmup: int, steps: int, loss: str) -> dict:
    """The trainer fed by a live DataLoader: data waits included, loader and trainer share the CPU."""
    from recsys_dist.train.catalog_loss import build_catalog_loss
    from recsys_dist.train.step import train_step
    catalog_loss = build_catalog_loss(loss, table, engine.module)
    it = iter(loader(url, workers, shuffle_seed=1))
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0, wait = time.perf_counter(), 0.0
        tw = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - tw
        train_step(engine, table, b["history"], b["target"], 10_000 + i, 0, catalog_loss)
    dt = time.perf_counter() - t0
    del it
    return {"samples_per_s": steps * BATCH / dt, "s_per_step": dt / steps, "data_wait_frac": wait / dt}


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None,
                   help="existing shard directory to read (default: generate one into --workdir)")
    p.add_argument("--workdir", default="/tmp/recsys-dist-bench/synth-1M-u50k-v2",
                   help="where the synthetic shards are generated (reused when identical; default: %(default)s)")
    p.add_argument("--num-items", type=int, default=1_000_000)
    p.add_argument("--num-users", type=int, default=50_000)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="DataLoader num_workers values")
    p.add_argument("--batches", type=int, default=100, help="timed batches per loader setting (default: %(default)s)")
    p.add_argument("--warmup-batches", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved rounds over the loader settings (default: %(default)s)")
    p.add_argument("--s3-server", choices=["process", "thread"], default="process",
                   help="run moto's ThreadedMotoServer in a child process (default) or in this process")
    p.add_argument("--models", nargs="+", default=["sasrec", "diffurec"])
    p.add_argument("--losses", nargs="+", default=["full_ce", "sampled_softmax"],
                   choices=["full_ce", "sampled_softmax"])
    p.add_argument("--steps-full-ce", type=int, default=4, help="timed full-CE steps per model (~7 s each at 1M items)")
    p.add_argument("--steps-sampled", type=int, default=20, help="timed sampled-softmax steps per model")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed steps before each trainer timing")
    p.add_argument("--trainer-threads", type=int, default=2, help="intra-op threads of the 1-rank trainer")
    p.add_argument("--live-workers", nargs="*", type=int, default=[0, 1, 2],
                   help="num_workers values for the live loader->trainer run (empty: skip)")
    p.add_argument("--live-steps", type=int, default=20)
    p.add_argument("--max-other-load", type=float, default=0.3,
                   help="re-measure when other processes used more cores than this (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--out", default="benchmarks/out", help="output folder (default: %(default)s)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    t_job = time.perf_counter()
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['loadavg_at_start']}",
          flush=True)

    # ---- shards ------------------------------------------------------------------------
    from shards.format import load_manifest
    global MAX_LEN
    MAX_LEN = args.max_len
    local = args.shards
    if local is None:
        from shards.synthetic import synth_shards
        t0 = time.perf_counter()
        synth_shards(args.workdir, num_items=args.num_items, num_users=args.num_users, progress=False)
        local = args.workdir
        print(f"shards: {local} ({time.perf_counter() - t0:.1f} s, reused when already built)", flush=True)
    local = str(Path(local).resolve())
    manifest = load_manifest(local)
    nblocks = sum(len(s["blocks"]) for s in manifest["shards"])
    data_desc = (f"{manifest['dataset']} (seq-v2): {manifest['num_items']:,} items, {manifest['num_users']:,} users, "
                 f"read with max_len {MAX_LEN}, train {manifest['num_samples']['train']:,} samples from "
                 f"{nblocks} blocks in {len(manifest['shards'])} shards "
                 f"({sum(s['bytes'] for s in manifest['shards']) / 2**20:.1f} MiB"
                 f"{', gzip' if manifest['build'].get('compress') else ''})")
    print(data_desc, flush=True)

    server = None
    urls = {"local": local}
    try:
        if "s3" in args.sources:
            server = S3Server(args.s3_server)
            urls["s3"], up_s, up_bytes = upload(local, "recsys-bench", "synth")
            print(f"S3: moto at {server.endpoint} ({args.s3_server}); uploaded {up_bytes / 2**20:.1f} MiB "
                  f"in {up_s:.1f} s", flush=True)

        # ---- loader alone --------------------------------------------------------------
        runs: dict = {}
        for rep in range(args.repeats):  # interleaved rounds: slow drifts hit every setting alike
            for source in args.sources:
                for w in args.workers:
                    r = measured(lambda: time_loader(urls[source], w, args.warmup_batches, args.batches), args,
                                 f"{source} w{w}")
                    runs.setdefault((source, w), []).append(r)
                    print(f"  loader {source:5s} workers {w} (round {rep + 1}): {r['samples_per_s']:8.0f} samples/s "
                          f"(other load {r['other_cores']:.2f} cores)", flush=True)
        loader_rows = []
        for (source, w), rs in runs.items():
            sps = [r["samples_per_s"] for r in rs]
            loader_rows.append({"source": source, "workers": w, "samples_per_s": sum(sps) / len(sps),
                                "min": min(sps), "max": max(sps), "other_cores": max(r["other_cores"] for r in rs),
                                "runs": rs})

        # ---- trainer on 1 rank -----------------------------------------------------------
        from recsys_dist.sparse import ShardedItemTable
        from recsys_dist.config import SparseConfig
        from recsys_dist.distributed import init_distributed
        torch.set_num_threads(args.trainer_threads)
        device = torch.device("cpu")
        init_distributed(device)
        t0 = time.perf_counter()
        table = ShardedItemTable.create(int(manifest["num_items"]) + 1, 64, SparseConfig(), device, BATCH, 0)
        print(f"item table {manifest['num_items'] + 1:,} x 64 created in {time.perf_counter() - t0:.1f} s", flush=True)
        need = args.train_warmup + max(args.steps_full_ce, args.steps_sampled)
        batches = list(islice(iter(loader(local, 0)), need))
        train_rows, engines = [], {}
        step0 = 0
        for name in args.models:
            cfg, engine = make_trainer(name, manifest, device)
            assert cfg.model.dim == 64, cfg.model.dim
            for loss in args.losses:
                steps = args.steps_full_ce if loss == "full_ce" else args.steps_sampled
                bs = batches[:args.train_warmup + steps]
                r = measured(lambda: time_trainer(engine, table, bs, args.train_warmup, loss, step0), args,
                             f"{name} {loss}")
                step0 += 100
                r.update(model=name, loss=loss, blocks=getattr(cfg.model, "num_blocks", None),
                         heads=getattr(cfg.model, "num_heads", None))
                train_rows.append(r)
                print(f"  trainer {name:8s} {loss:15s}: {r['s_per_step']:.3f} s/step = {r['samples_per_s']:7.0f} "
                      f"samples/s (other load {r['other_cores']:.2f} cores)", flush=True)
            engines[name] = engine

        # ---- live: the fastest trainer fed by the DataLoader -----------------------------
        live_rows = []
        fastest = max(train_rows, key=lambda r: r["samples_per_s"])
        for source in args.sources:
            for w in args.live_workers:
                r = measured(lambda: time_live(engines[fastest["model"]], table, urls[source], w,
                                               args.train_warmup, args.live_steps, fastest["loss"]),
                             args, f"live {source} w{w}")
                r.update(source=source, workers=w, model=fastest["model"], loss=fastest["loss"])
                live_rows.append(r)
                print(f"  live {source:5s} workers {w} -> {fastest['model']} {fastest['loss']}: "
                      f"{r['samples_per_s']:7.0f} samples/s, waiting for data {100 * r['data_wait_frac']:.0f}% "
                      f"(other load {r['other_cores']:.2f} cores)", flush=True)
    finally:
        if server is not None:
            server.close()

    # ---- report ----------------------------------------------------------------------------
    best = {loss: max((r for r in train_rows if r["loss"] == loss), key=lambda r: r["samples_per_s"])
            for loss in args.losses}
    lines = [f"Machine: {info['cpu']} ({', '.join(info['cpu_flags'])}), {info['cores']} cores, "
             f"{info['mem_gib']} GiB, torch {info['torch']}, Python {info['python']}, {info['date']}; "
             f"load average at start {info['loadavg_at_start'][0]:.2f}.",
             f"Data: {data_desc}. Batch {BATCH}, shuffle on (windows of 8 blocks), {args.batches} timed batches after "
             f"{args.warmup_batches} warm-up batches. S3: moto ThreadedMotoServer on 127.0.0.1 "
             f"({'separate process' if args.s3_server == 'process' else 'thread of the reading process'}, "
             "same 2 cores), read through s3fs.",
             f"Trainer: 1 rank, {args.trainer_threads} threads, d 64, batch {BATCH}, models "
             f"{', '.join(args.models)} from configs/models/*.yaml; consumption = steps/s x {BATCH} on "
             "batches read beforehand. 'other load' = cores other processes kept busy during the timing.", "",
             "| source | workers | loader samples/s (min-max) | x full-CE trainer | x sampled-softmax trainer "
             "| other load |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in loader_rows:
        ratios = [f"{r['samples_per_s'] / best[loss]['samples_per_s']:.1f}x" if loss in best else "-"
                  for loss in ("full_ce", "sampled_softmax")]
        lines.append(f"| {r['source']} | {r['workers']} | {r['samples_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) "
                     f"| {ratios[0]} | {ratios[1]} | {r['other_cores']:.2f} |")
    lines += ["", f"Loader: mean of {args.repeats} interleaved rounds. Ratios = loader samples/s / samples/s the "
              "fastest model of that loss consumes (the most demanding consumer).", "",
              "| trainer (1 rank) | loss | s/step | samples/s consumed | other load |", "|---|---|---:|---:|---:|"]
    for r in train_rows:
        lines.append(f"| {r['model']} ({r['blocks']} blocks x {r['heads']} heads) | {r['loss']} | "
                     f"{r['s_per_step']:.3f} | {r['samples_per_s']:,.0f} | {r['other_cores']:.2f} |")
    if live_rows:
        lines += ["", f"Live: {fastest['model']} / {fastest['loss']} fed by the DataLoader (loader and trainer "
                  "share the 2 cores; data wait = share of the wall time spent in `next(loader)`).", "",
                  "| source | workers | samples/s trained | vs trainer alone | data wait | other load |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in live_rows:
            lines.append(f"| {r['source']} | {r['workers']} | {r['samples_per_s']:,.0f} | "
                         f"{r['samples_per_s'] / fastest['samples_per_s']:.2f} | {100 * r['data_wait_frac']:.0f}% | "
                         f"{r['other_cores']:.2f} |")
    total_s = time.perf_counter() - t_job
    lines += ["", f"Total run time {total_s:.0f} s; load average at the end {os.getloadavg()[0]:.2f}."]
    text = "\n".join(lines)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_throughput.md").write_text("# Data-loader throughput vs trainer consumption\n\n"
                                              "`PYTHONPATH=. python benchmarks/loader_throughput.py`\n\n" + text + "\n")
    (out / "loader_throughput.json").write_text(json.dumps(
        {"machine": info, "data": data_desc, "args": vars(args), "loader": loader_rows, "trainer": train_rows,
         "live": live_rows, "total_s": total_s}, indent=1))
    _plot(loader_rows, train_rows, live_rows, out / "loader_throughput.png")
    print(f"\nwrote {out}/loader_throughput.{{md,json,png}}")


def _plot(loader_rows, train_rows, live_rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.8))
    labels = [f"{r['source']}\nw={r['workers']}" for r in loader_rows]
    x = list(range(len(labels)))
    ax.bar(x, [r["samples_per_s"] for r in loader_rows], 0.6, color="tab:blue", label="loader alone (mean, min-max)",
           yerr=[[r["samples_per_s"] - r["min"] for r in loader_rows],
                 [r["max"] - r["samples_per_s"] for r in loader_rows]],
           capsize=3)
    if live_rows:
        pos = {(r["source"], r["workers"]): i for i, r in enumerate(loader_rows)}
        lx = [pos[(r["source"], r["workers"])] for r in live_rows if (r["source"], r["workers"]) in pos]
        ly = [r["samples_per_s"] for r in live_rows if (r["source"], r["workers"]) in pos]
        ax.scatter(lx, ly, marker="D", color="tab:green", zorder=3,
                   label=f"trainer fed live ({live_rows[0]['model']}, {live_rows[0]['loss']})")
    colors = iter(["tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:gray", "tab:olive"])
    for r in train_rows:
        ax.axhline(r["samples_per_s"], color=next(colors), ls="--" if r["loss"] == "full_ce" else ":", lw=1.2,
                   label=f"trainer alone: {r['model']}, {r['loss']}")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(r["samples_per_s"] for r in train_rows) / 3)
    ax.set_ylabel("samples/s")
    ax.set_title("data loader vs trainer consumption (batch 256, 1 rank, 2 cores)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
