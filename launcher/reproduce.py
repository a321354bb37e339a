"""``python -m launcher reproduce TABLE``: one reproduction table, every row over training seeds.

A table is ``configs/reproduce/<TABLE>.yaml``::

    seeds: [0, 1, 2]                 # training seeds (train.seed); each run is its own job
    rows:
      - name: diffurec               # row label and job-name part
        config: configs/beauty_diffurec.yaml
        overrides: [train.max_epochs=10, train.eval_every_epochs=1, train.patience=3]
        paper: {HR@10: 7.91, NDCG@10: 4.75}     # the paper's figures (%), its own protocol
        official: {HR@10: 7.0}                  # the official code's, measured on this machine (%)
        target: HR@10 >= 7.9                    # free text: what this row must reach
        retests:                                # optional: each run's selected state tested again
          hstu-candidates: [eval.mask_history=true, eval.mask_scope=input]   # label: eval.* overrides
    columns: [HR@10, NDCG@10, HR@20, NDCG@20]  # optional: the metrics shown (default these)

Every (row, seed) runs as ``repro-<TABLE>-<row>-s<seed>`` on N local ranks (torchrun), selected on
validation, tested once (per eval-noise seed for generative models). The table reports, per row,
the mean and sample standard deviation over the training seeds of the test metrics, the
popularity ranker on the same users, wall time, and the command; the curves of all runs go to
one PNG. Outputs: ``runs/reproduce/<TABLE>.md``, ``<TABLE>.json``, ``<TABLE>_curves.png``.

A row's ``retests`` test each finished run's validation-selected state again under other eval
settings (``launcher/retest.py``: trains nothing, writes ``runs/<job>-<label>/``), for a number to
put beside a paper whose protocol differs in evaluation only. The table shows each as its own
line, ``<row> [<label>]``, with the popularity ranker under the same settings; the run's
``metrics.json`` in ``<TABLE>.json`` carries them under ``retests``.

A run of some rows or seeds (``--rows``, ``--seeds``) keeps every other (row, seed) from the previous
results (``runs/reproduce/<TABLE>.json``, or ``--merge-from`` e.g. a committed
``docs/results/<TABLE>.json``), so a table is filled row by row and seed by seed across sessions;
a (row, seed) run now replaces its earlier run, one that fails now keeps it, and the md names every
run kept. ``--no-merge`` writes only the runs of now.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from launcher.commands import RUN_MAY_DIFFER, reusable_run
from recsys_dist.config import REPO_ROOT, ConfigError, load_config

COLUMNS = ["HR@10", "NDCG@10", "HR@20", "NDCG@20"]


@dataclass
class Row:
    """One row of a reproduction table (see the module docstring)."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)
    official: dict[str, float] = field(default_factory=dict)
    target: str = ""
    retests: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Table:
    name: str
    seeds: list[int]
    rows: list[Row]
    columns: list[str] = field(default_factory=lambda: list(COLUMNS))

    @classmethod
    def load(cls, name: str) -> "Table":
        path = REPO_ROOT / "configs" / "reproduce" / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError(f"no reproduction table {name!r}: {path} not found (known: {', '.join(known)})")
        data = yaml.safe_load(path.read_text()) or {}
        try:
            rows = [Row(**r) for r in data["rows"]]
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: malformed table ({exc}); see launcher/reproduce.py") from None
        for row in rows:
            retests = row.retests
            if not (isinstance(retests, dict) and all(
                    isinstance(label, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", label)
                    and isinstance(ov, list) and all(isinstance(o, str) for o in ov) for label, ov in retests.items())):
                raise ConfigError(f"{path}: row {row.name!r}: retests must map a label ([A-Za-z0-9_.-]) to a "
                                  f"list of eval.key=value, got {retests!r}")
        return cls(name, [int(s) for s in data.get("seeds", [0, 1, 2])], rows,
                   [str(c) for c in data.get("columns", COLUMNS)])


def job_overrides(table: Table, row: Row, seed: int, extra: list[str]) -> list[str]:
    return [*row.overrides, f"train.seed={seed}", f"name=repro-{table.name}-{row.name}-s{seed}", *extra]


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd; the sd is None for one value (one seed has no spread)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def mean_sd_cell(values: list[float]) -> str:
    """``mean ± sd`` in percent; the value alone for one seed (``mean_sd``)."""
    m, sd = mean_sd(values)
    return f"{100 * m:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def command_line(args) -> str:
    """The ``reproduce`` command as it was typed (its options that change what runs), for the
    table's footer: a reader reruns exactly this."""
    parts = ["python -m launcher reproduce", args.table]
    if args.rows:
        parts += ["--rows", *args.rows]
    if args.seeds:
        parts += ["--seeds", *map(str, args.seeds)]
    if args.nproc_per_node != 2:
        parts += ["--nproc-per-node", str(args.nproc_per_node)]
    for flag in ("reuse", "no_merge"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.merge_from:
        parts += ["--merge-from", args.merge_from]
    return " ".join([*parts, *args.overrides])


def summarize(table: Table, results: dict[str, list[dict[str, Any]]], command: str) -> str:
    """Markdown table: mean ± sd (%) over training seeds, popularity (one row per dataset),
    the paper's and the official code's figures, target, epochs, time; ``command`` is the
    footer's (``command_line``)."""
    cols = table.columns
    head = ("| row | " + " | ".join(cols) + " | paper | official code | target | seeds | epochs | train min (mean) |")
    lines = [head, "|---|" + "---:|" * len(cols) + "---|---|---|---:|---:|---:|"]
    popularity: dict[tuple[str, tuple[str, ...]], tuple[str, dict]] = {}  # (dataset, retest overrides) -> (label, test)
    for row in table.rows:
        runs = results.get(row.name, [])
        if not runs:
            lines.append(f"| {row.name} | " + " | ".join("not run" for _ in cols) + f" | | | {row.target} | 0 | | |")
            continue
        cells = [mean_sd_cell([r["test"][c] for r in runs]) for c in cols]
        paper = ", ".join(f"{k} {v}" for k, v in row.paper.items())
        official = ", ".join(f"{k} {v}" for k, v in row.official.items())
        epochs = statistics.fmean(r.get("epochs", float("nan")) for r in runs)
        minutes = statistics.fmean(r.get("train_seconds", 0.0) for r in runs) / 60
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {paper} | {official} | {row.target} | "
                     f"{len(runs)} ({', '.join(str(run_seed(r)) for r in runs)}) | "
                     f"{epochs:.1f} | {minutes:.1f} |")
        dataset = runs[0].get("dataset", "")
        popularity.setdefault((dataset, ()), ("", runs[0]["popularity_test"]))
        for label, overrides in row.retests.items():
            retested = [r for r in runs if r.get("retests", {}).get(label, {}).get("overrides") == overrides]
            missing = [run_seed(r) for r in runs if r not in retested]
            where = ((f"{row.target}; " if row.target else "") + f"this line: the row's state{'s' if len(retested) > 1 else ''} tested with "
                     f"{' '.join(overrides)}" + (f"; not retested: seed {', '.join(map(str, missing))}" if missing else ""))
            if not retested:
                lines.append(f"| {row.name} [{label}] | " + " | ".join("not run" for _ in cols) + f" | | | {where} | 0 | | |")
                continue
            cells = [mean_sd_cell([r["retests"][label]["test"][c] for r in retested]) for c in cols]
            lines.append(f"| {row.name} [{label}] | " + " | ".join(cells) + f" | {paper} | {official} | {where} | "
                         f"{len(retested)} ({', '.join(str(run_seed(r)) for r in retested)}) | | |")
            popularity.setdefault((dataset, tuple(overrides)), (label, retested[0]["retests"][label]["popularity_test"]))
    datasets = {d for d, _ in popularity}
    for (dataset, overrides), (label, pop) in popularity.items():
        name = "popularity" + (f" ({dataset})" if len(datasets) > 1 else "") + (f" [{label}]" if overrides else "")
        lines.append(f"| {name} | " + " | ".join(f"{100 * pop[c]:.2f}" for c in cols) + " | | | | | | |")
    lines += ["", f"Command: `{command}` (per row: `configs/reproduce/{table.name}.yaml`; seeds {table.seeds}). "
                  "Metrics in %, mean ± sample sd over training seeds (the seeds column: how many, and which; one seed: its value, no spread); full catalog, validation-selected, "
                  "test once, ties by expected rank."]
    return "\n".join(lines)


def read_results(source, required: bool = False) -> dict[str, list[dict[str, Any]]]:
    """A ``<TABLE>.json`` this command wrote ({row: [metrics, ...]}); {} when ``source`` is None or
    missing, unless ``required`` (an explicit ``--merge-from``): then a missing file is an error.
    Read before anything trains, so a broken file fails the command before hours of training."""
    if source is None or not source.exists():
        if required:
            raise ConfigError(f"--merge-from {source}: no such file")
        return {}
    try:
        previous = json.loads(source.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a {row: [runs]} object")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: not a reproduction results file ({exc}); pass --no-merge") from None
    return previous


def run_seed(metrics: dict[str, Any]) -> int:
    """The training seed a run's ``metrics.json`` was trained with."""
    return int(metrics.get("config", {}).get("train", {}).get("seed", 0))


def kept_results(table: Table, ran: dict[str, set[int]], previous: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The previous results (``read_results``) to keep: every run of a table row whose seed has no
    result now (``ran``: row -> the seeds that produced one now; a seed that failed now keeps its
    earlier run). Rows no longer in the table are dropped."""
    names = {r.name for r in table.rows}
    kept = {name: [m for m in runs if run_seed(m) not in ran.get(name, set())]
            for name, runs in previous.items() if name in names}
    return {name: runs for name, runs in kept.items() if runs}


def merge_results(table: Table, now: dict[str, list[dict[str, Any]]],
                  kept: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per table row (in table order), the runs of now and the kept ones, ordered by seed."""
    merged = {r.name: sorted([*now.get(r.name, []), *kept.get(r.name, [])], key=run_seed) for r in table.rows}
    return {name: runs for name, runs in merged.items() if runs}


def stale_runs(table: Table, kept: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per kept run whose stored config differs from what its row would train now
    (the table's yaml or the row's config edited since): such numbers are flagged, not hidden."""
    from recsys_dist.train.checkpoint import config_mismatch

    lines = []
    for row in table.rows:
        for m in kept.get(row.name, []):
            seed = run_seed(m)
            try:
                now = load_config(REPO_ROOT / row.config, job_overrides(table, row, seed, [])).to_dict()
            except ConfigError as exc:  # the row's config is broken today: say so, keep the table
                lines.append(f"{row.name} seed {seed}: its config does not load now ({exc})")
                continue
            diffs = config_mismatch(m["config"], now, RUN_MAY_DIFFER, ("stored", "now"))
            diffs += [f"retest {label}: stored {' '.join(r['overrides'])} != now {' '.join(row.retests[label])}"
                      for label, r in m.get("retests", {}).items()
                      if label in row.retests and r["overrides"] != row.retests[label]]
            if diffs:
                lines.append(f"{row.name} seed {seed}: " + "; ".join(diffs))
    return lines


def set_aside(run_dir: Path) -> Path | None:
    """A *finished* run trained again starts fresh: its ``runs/<job>/`` (whose last checkpoint
    the job would otherwise resume and continue, whatever the row asks now) is renamed to
    ``<job>.replaced-<time>``, so nothing already written is lost. An unfinished run (no
    ``metrics.json``: interrupted) stays, and the job resumes it under the trainer's own rules.
    Returns the new name, or None when nothing was moved."""
    if not (run_dir / "metrics.json").exists():
        return None
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    return aside


def same_retest(retest_dir: Path, run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``retest_dir`` holds a finished retest of the finished run in ``run_dir`` (the same
    ``metrics.json``, by digest) with ``overrides``: ``--reuse`` then reads it rather than
    testing again."""
    from launcher.retest import metrics_digest

    if not (retest_dir / "metrics.json").exists() or not (retest_dir / "retest.json").exists():
        return False
    record = json.loads((retest_dir / "retest.json").read_text())
    return record.get("overrides") == overrides and record.get("run_metrics_sha256") == metrics_digest(run_dir)


def retest_run(row: Row, run_dir: Path, metrics: dict[str, Any], reuse: bool, nproc: int) -> int:
    """Test the finished run in ``run_dir`` again under each of ``row.retests`` (``launcher/retest.py``)
    into ``metrics["retests"][label]`` (its overrides, test, popularity test, the retest's run name).
    The retest's folder is ``<run>-<label>`` beside the run's. With ``reuse``, a retest already
    written for this very run (``same_retest``) is read, not run; a retest run again sets its
    earlier folder aside (``set_aside``). Returns how many failed; a failure is reported and the
    table still written (the seed is then listed as not retested)."""
    from launcher import retest
    from launcher.commands import run_job

    failed = 0
    for label, overrides in row.retests.items():
        name = f"{run_dir.name}-{label}"
        out = run_dir.parent / name
        try:
            if not (reuse and same_retest(out, run_dir, overrides)):
                print(f"[reproduce] {row.name}: retest {label} of {run_dir.name} ({' '.join(overrides)})",
                      file=sys.stderr, flush=True)
                set_aside(out)
                config_path, world = retest.prepare(run_dir, overrides, name)
                if world != nproc:
                    print(f"[reproduce] {run_dir.name} ran on {world} ranks: its retest runs on {world}", file=sys.stderr)
                if run_job(str(config_path), [], world) != 0:
                    raise RuntimeError(f"the job failed (its log: {out / 'train.log'})")
            retested = json.loads((out / "metrics.json").read_text())
            metrics.setdefault("retests", {})[label] = {"overrides": list(overrides), "run": name,
                                                        "test": retested["test"],
                                                        "popularity_test": retested["popularity_test"]}
        except (ConfigError, RuntimeError, OSError, KeyError, ValueError) as exc:
            print(f"[reproduce] {row.name} retest {label} of {run_dir.name} failed: {exc}", file=sys.stderr)
            failed += 1
    return failed


def run(args) -> int:
    from launcher.commands import run_job
    from launcher.retest import check_overrides, check_retestable
    from recsys_dist.train.report import plot_learning_curves

    table = Table.load(args.table)
    if args.seeds:
        table.seeds = [int(s) for s in args.seeds]
    rows = [r for r in table.rows if not args.rows or r.name in args.rows]
    unknown = set(args.rows or []) - {r.name for r in table.rows}
    if unknown:
        raise ConfigError(f"table {table.name!r} has no row(s) {sorted(unknown)} (rows: {[r.name for r in table.rows]})")
    for row in rows:  # every config and retest loads before anything trains
        for seed in table.seeds:
            job = job_overrides(table, row, seed, args.overrides)
            cfg = load_config(REPO_ROOT / row.config, job)
            for label, overrides in row.retests.items():
                try:
                    check_retestable(cfg, "its job")
                    check_overrides(overrides)
                    load_config(REPO_ROOT / row.config, [*job, *overrides])  # type-checks the values
                except ConfigError as exc:
                    raise ConfigError(f"table {table.name!r} row {row.name!r} retest {label!r}: {exc}") from None
    # read now, not after the runs: a config edited while they train must not stop the table's writing
    metric = load_config(REPO_ROOT / rows[0].config, rows[0].overrides).eval.select_metric
    out = REPO_ROOT / "runs" / "reproduce"
    source = None if args.no_merge else Path(args.merge_from) if args.merge_from else out / f"{table.name}.json"
    previous = read_results(source, required=bool(args.merge_from) and not args.no_merge)
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    curves = []
    failed = reused = retests_failed = 0
    for row in rows:
        for seed in table.seeds:
            overrides = job_overrides(table, row, seed, args.overrides)
            cfg = load_config(REPO_ROOT / row.config, overrides)
            path = cfg.run_dir() / "metrics.json"
            trained = not (args.reuse and reusable_run(path, cfg))
            if trained:
                print(f"[reproduce] {table.name}: {row.name} seed {seed}", file=sys.stderr, flush=True)
                if (aside := set_aside(cfg.run_dir())) is not None:
                    print(f"[reproduce] the finished {cfg.run_dir().name} moved to {aside.name}: this run starts fresh",
                          file=sys.stderr, flush=True)
                if cfg.checkpoint.url is not None:  # checkpoints elsewhere: each job its own fresh folder there
                    stamp = time.strftime("%Y%m%d-%H%M%S")
                    overrides = [*overrides, f"checkpoint.url={cfg.checkpoint.url.rstrip('/')}/{cfg.name}-{stamp}"]
                if run_job(str(REPO_ROOT / row.config), overrides, args.nproc_per_node) != 0:
                    print(f"[reproduce] {row.name} seed {seed} failed", file=sys.stderr)
                    failed += 1
                    continue
            else:
                reused += 1
            m = json.loads(path.read_text())
            retests_failed += retest_run(row, cfg.run_dir(), m, args.reuse and not trained, args.nproc_per_node)
            results.setdefault(row.name, []).append(m)
            curves.append((row.name, seed, [tuple(v) for v in m["validation"]]))
    kept = kept_results(table, {name: {run_seed(m) for m in runs} for name, runs in results.items()}, previous)
    for name, runs in kept.items():
        curves += [(name, run_seed(m), [tuple(v) for v in m["validation"]]) for m in runs]
    order = [r.name for r in table.rows]  # curves in table order, whichever ran now
    curves.sort(key=lambda c: (order.index(c[0]) if c[0] in order else len(order), c[1]))
    results = merge_results(table, results, kept)
    shown = [r for r in table.rows if r in rows or r.name in kept]
    text = summarize(Table(table.name, table.seeds, shown, table.columns), results, command_line(args))
    text += f" Wall time of this command: {(time.perf_counter() - t0) / 60:.1f} min (rows run: " \
            f"{', '.join(r.name for r in rows)}" + (f"; {reused} finished run(s) reused, not trained now: their "
                                                    "time is the table's train min" if reused else "") + ")."
    if failed:
        text += f" **{failed} run(s) failed now** (an earlier run of the same seed, if any, is shown)."
    if retests_failed:
        text += (f" **{retests_failed} retest(s) failed now** (their runs are shown; each retest line names "
                 "the seeds it holds).")
    if kept:
        shown_source = source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else source
        text += (f" Runs kept from {shown_source}: "
                 + ", ".join(f"{name} seed{'s' if len(runs) > 1 else ''} {', '.join(str(run_seed(m)) for m in runs)}"
                             for name, runs in kept.items())
                 + " (their overrides as stored in each run's config, not this command's).")
        stale = stale_runs(table, kept)
        if stale:
            text += " **Kept runs whose config differs from their row's today:** " + " | ".join(stale) + "."
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{table.name}.md").write_text(text + "\n")
    (out / f"{table.name}.json").write_text(json.dumps(results, indent=1, default=str))
    plot_learning_curves(curves, out / f"{table.name}_curves.png", metric)
    print("\n" + text)
    return 1 if failed or retests_failed else 0


def add_arguments(p) -> None:
    p.add_argument("table", help="configs/reproduce/<table>.yaml, e.g. beauty")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows")
    p.add_argument("--seeds", nargs="+", default=None, help="training seeds (default: the table's)")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="reuse runs/<job>/metrics.json when present and trained with the row's config now "
                        "(otherwise, and without --reuse, the run starts fresh; an earlier run dir is renamed aside)")
    p.add_argument("--merge-from", default=None, metavar="JSON",
                   help="keep the rows not run now from this results file (default runs/reproduce/<table>.json)")
    p.add_argument("--no-merge", action="store_true", help="write only the rows run now")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every job (after --)")
