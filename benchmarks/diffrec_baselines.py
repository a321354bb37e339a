"""EASE and the popularity ranker on DiffRec's own ML-1M splits, beside the official DiffRec.

Issue "DiffRec family": a reproducibility study (2025) found DiffRec-style models beaten by
tuned simple baselines. This puts two of them on exactly DiffRec's data and protocol:

* **popularity**: every item scored by its number of training interactions (no parameters);
* **EASE** (Steck, WWW 2019; ``recsys_dist.models.ease.fit_ease``): closed-form item-item
  weights ``B = I - P diag(1/diag(P))``, ``P = (X^T X + lambda I)^-1``, ``diag(B) = 0``, scores
  ``X B`` with ``X`` the binary user x item train matrix. ``lambda`` is chosen on validation
  Recall@20 over a grid, then the test split is evaluated once with it.

Data: ``<data-root>/ml-1m_{clean,noisy}/{train,valid,test}_list.npy`` ([user, item] int64 pairs,
0-based raw ids, from the official YiyanXu/DiffRec repository). Items are shifted by +1 so that
id 0 is padding (this package's convention); users keep their ids. The model input for both
validation and test is the user's train row, as in the official ``main.py``.

Evaluation: the project's exact multi-target evaluator (``recsys_dist.eval.rank_target_sets``
with ``queries`` = the users' rows of ``X`` (b, N) and ``item_block`` = ``B.T`` (N, N); for
popularity ``queries`` = ones (b, 1) and ``item_block`` = the counts (N, 1)), full ranking of
every item except the masked ones: train items for validation, train + valid items for test.
Recall@K / NDCG@K as DiffRec's ``computeTopNAccuracy`` defines them (binary relevance, IDCG over
min(K, |held-out|) positions); ties under the evaluator's rule (default "expected": the mean
over a random order of tied items; DiffRec's ``torch.topk`` breaks them arbitrarily).
Conventions: our means are over users *with* held-out items (users without are skipped and
counted); DiffRec divides by all users, i.e. ours x users / (users + skipped). Both are
reported (on these splits every user has valid and test items, so they coincide).

Runs in one process (world size 1), float64 scores, in a few minutes on two CPU cores:

    PYTHONPATH=. python benchmarks/diffrec_baselines.py
    PYTHONPATH=. python benchmarks/diffrec_baselines.py --splits clean --lams 100 500 1000

Prints a markdown table (values in %) and writes it to ``<out>/diffrec_baselines.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recsys_dist.distributed import row_partition  # noqa: E402
from recsys_dist.eval import MultiMetricAccumulator, popularity_block, rank_target_sets  # noqa: E402
from recsys_dist.models.ease import ease_from_gram, popularity_scores  # noqa: E402

DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "datasets" / "ml-1m" / "raw" / "diffrec"
DEFAULT_LAMS = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
DEFAULT_KS = (10, 20, 50, 100)
SELECT_METRIC = "Recall@20"

# Official DiffRec test figures (%), transcribed by hand from ../shared/reference.md, section
# "DiffRec family (YiyanXu/DiffRec @ d35a6c6), official code on ML-1M, 2026-12-01, CPU"
# (official code and hyperparameters, validation-selected, test once, mean over all users).
# The T-DiffRec row is not an official ML-1M setting (DiffRec's clean setting, default w_min /
# w_max; reference.md gives R@10, R@20, N@10, N@20 only).
OFFICIAL: dict[str, list[tuple[str, dict[str, float]]]] = {
    "clean": [
        ("DiffRec (official code)", {
            "Recall@10": 10.07, "Recall@20": 16.97, "Recall@50": 31.58, "Recall@100": 45.83,
            "NDCG@10": 8.62, "NDCG@20": 10.94, "NDCG@50": 15.80, "NDCG@100": 20.19}),
        ("L-DiffRec, 2 clusters (official code)", {
            "Recall@10": 9.13, "Recall@20": 15.87, "Recall@50": 29.92, "Recall@100": 45.24,
            "NDCG@10": 7.99, "NDCG@20": 10.30, "NDCG@50": 15.04, "NDCG@100": 19.72}),
        ("T-DiffRec, DiffRec's clean setting (official code, not an official recipe)", {
            "Recall@10": 12.31, "Recall@20": 19.81, "NDCG@10": 10.52, "NDCG@20": 13.08}),
    ],
    "noisy": [
        ("DiffRec (official code)", {
            "Recall@10": 6.27, "Recall@20": 12.15, "Recall@50": 24.89, "Recall@100": 38.53,
            "NDCG@10": 4.61, "NDCG@20": 6.80, "NDCG@50": 11.01, "NDCG@100": 15.11}),
    ],
}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def pad_lists(pairs: np.ndarray, num_users: int) -> torch.Tensor:
    """``(num_users, max_len)`` long: row ``u`` holds user ``u``'s item ids (file order), padded
    with 0. ``pairs``: ``(n, 2)`` [user, item] with items already shifted (>= 1)."""
    users = pairs[:, 0].astype(np.int64)
    items = pairs[:, 1].astype(np.int64)
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    counts = np.bincount(users, minlength=num_users)
    width = int(counts.max()) if counts.size else 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(users.size) - starts[users]
    out = np.zeros((num_users, max(width, 1)), dtype=np.int64)
    out[users, slot] = items
    return torch.from_numpy(out)


def load_split(split_dir: Path) -> dict:
    """Train / valid / test of one DiffRec split, items shifted +1 (0 = padding)."""
    raw = {name: np.load(split_dir / f"{name}_list.npy", allow_pickle=False)
           for name in ("train", "valid", "test")}
    for name, a in raw.items():
        if a.ndim != 2 or a.shape[1] != 2 or a.size == 0 or a.min() < 0:
            raise ValueError(f"{split_dir}/{name}_list.npy: expected non-empty (n, 2) ids >= 0")
    num_users = int(max(a[:, 0].max() for a in raw.values())) + 1
    num_rows = int(max(a[:, 1].max() for a in raw.values())) + 2  # + padding row 0
    shifted = {n: np.stack([a[:, 0], a[:, 1] + 1], axis=1) for n, a in raw.items()}
    X = torch.zeros(num_users, num_rows, dtype=torch.float64)
    tr = torch.from_numpy(shifted["train"].astype(np.int64))
    X[tr[:, 0], tr[:, 1]] = 1.0  # binary, as DiffRec's csr train matrix
    lists = {n: pad_lists(a, num_users) for n, a in shifted.items()}
    return {
        "X": X, "num_users": num_users, "num_rows": num_rows,
        "train": lists["train"], "valid": lists["valid"], "test": lists["test"],
        "train_valid": torch.cat([lists["train"], lists["valid"]], dim=1),
        "sizes": {n: int(a.shape[0]) for n, a in raw.items()},
    }


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def evaluate(queries: torch.Tensor, item_rows: torch.Tensor, targets: torch.Tensor,
             masked: torch.Tensor, num_rows: int, ks=DEFAULT_KS, ties: str = "expected",
             batch_size: int = 2048) -> dict[str, float]:
    """Metrics of every user (world size 1): ``queries`` (U, d), ``item_rows`` (num_rows, d),
    i.e. score of item ``j`` for user ``u`` = ``queries[u] . item_rows[j]``. The item block is
    the rank's row block of ``item_rows`` (the whole table here)."""
    (lo, hi), = row_partition(num_rows, 1)
    block = item_rows[lo:hi]
    acc = MultiMetricAccumulator(ks=ks, ties=ties)
    for u0 in range(0, queries.shape[0], batch_size):
        sl = slice(u0, u0 + batch_size)
        # The accumulator recomputes the metrics from the integer counts under its own ks, so
        # the per-call metrics are asked for at one cheap cutoff only (they are not used).
        acc.update(rank_target_sets(queries[sl], targets[sl], block, lo, num_rows,
                                    masked_ids=masked[sl], ks=(1,), ties=ties))
    m = acc.compute()
    scale = m["num_users"] / (m["num_users"] + m["num_skipped_users"]) if m["num_users"] else 0.0
    for name in list(m):
        if "@" in name:
            m[f"all_users:{name}"] = m[name] * scale  # DiffRec's convention: / all users
    return m


def run_split(split_dir: Path, lams=DEFAULT_LAMS, ks=DEFAULT_KS, ties: str = "expected",
              batch_size: int = 2048, log=print) -> dict:
    """Popularity and lambda-tuned EASE on one split: validation of every candidate, test of
    the selected one (and of popularity). Returns a dict of metrics and timings."""
    ks = tuple(sorted(set(ks) | {20}))
    t0 = time.perf_counter()
    d = load_split(split_dir)
    X, num_rows = d["X"], d["num_rows"]
    log(f"[{split_dir.name}] {d['num_users']} users, {num_rows - 1} items, "
        f"train/valid/test {d['sizes']['train']}/{d['sizes']['valid']}/{d['sizes']['test']}")

    counts = popularity_scores(X)
    ones = torch.ones(X.shape[0], 1, dtype=torch.float64)
    pop_rows = popularity_block(counts, 0, num_rows, torch.float64)
    pop_valid = evaluate(ones, pop_rows, d["valid"], d["train"], num_rows, ks, ties, batch_size)
    pop_test = evaluate(ones, pop_rows, d["test"], d["train_valid"], num_rows, ks, ties, batch_size)

    G = X.T @ X
    sweep = []
    for lam in lams:
        t1 = time.perf_counter()
        B = ease_from_gram(G, lam)
        m = evaluate(X, B.T, d["valid"], d["train"], num_rows, (20,), ties, batch_size)
        sweep.append((float(lam), m))
        log(f"[{split_dir.name}] lambda {lam:g}: valid {SELECT_METRIC} "
            f"{100 * m[SELECT_METRIC]:.2f}  ({time.perf_counter() - t1:.1f} s)")
    best_lam, _ = max(sweep, key=lambda lm: lm[1][SELECT_METRIC])  # first on ties
    B = ease_from_gram(G, best_lam)
    best_valid = evaluate(X, B.T, d["valid"], d["train"], num_rows, ks, ties, batch_size)
    ease_test = evaluate(X, B.T, d["test"], d["train_valid"], num_rows, ks, ties, batch_size)
    edge = best_lam in (min(lams), max(lams)) and len(lams) > 1
    return {
        "split": split_dir.name, "num_users": d["num_users"], "num_items": num_rows - 1,
        "sizes": d["sizes"], "popularity": {"valid": pop_valid, "test": pop_test},
        "ease": {"lambda": best_lam, "valid": best_valid, "test": ease_test,
                 "sweep": [(lam, m[SELECT_METRIC]) for lam, m in sweep],
                 "lambda_at_grid_edge": edge},
        "wall_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _cells(m: dict[str, float], names: list[str], prefix: str = "") -> str:
    return " | ".join(f"{100 * m[prefix + n]:.2f}" if (prefix + n) in m else "-" for n in names)


def markdown(results: list[dict], ks, ties: str) -> str:
    names = [f"Recall@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    head = "| split | model | lambda | convention | " + " | ".join(
        n.replace("Recall", "R").replace("NDCG", "N") for n in names) + " | users (skipped) |"
    lines = [head, "|" + "---|" * 4 + "---:|" * (len(names) + 1)]
    for r in results:
        split = r["split"]
        for label, lam, m in (("popularity", "-", r["popularity"]["test"]),
                              ("EASE", f"{r['ease']['lambda']:g}", r["ease"]["test"])):
            users = f"{m['num_users']} ({m['num_skipped_users']})"
            lines.append(f"| {split} | {label} | {lam} | ours (users with targets) | "
                         f"{_cells(m, names)} | {users} |")
            lines.append(f"| {split} | {label} | {lam} | DiffRec's (all users) | "
                         f"{_cells(m, names, 'all_users:')} | {users} |")
        key = split.removeprefix("ml-1m_")
        for label, vals in OFFICIAL.get(key, []):
            vals = {n: v / 100 for n, v in vals.items()}
            lines.append(f"| {split} | {label} | - | DiffRec's (all users) | "
                         f"{_cells(vals, names)} | {r['num_users']} (0) |")
    out = ["Test split, values in %. Ties: " + ties + "; lambda selected on validation "
           + SELECT_METRIC + " (train items masked); test masks train + valid items.", "",
           "\n".join(lines), "", "Validation " + SELECT_METRIC + " (%) per lambda:", ""]
    for r in results:
        sweep = ", ".join(f"{lam:g}: {100 * v:.2f}" for lam, v in r["ease"]["sweep"])
        pv = 100 * r["popularity"]["valid"][SELECT_METRIC]
        edge = " (selected lambda at the edge of the grid!)" if r["ease"]["lambda_at_grid_edge"] else ""
        out.append(f"- {r['split']}: EASE {sweep}; popularity {pv:.2f}{edge}; "
                   f"wall {r['wall_s']:.0f} s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                   help="folder holding ml-1m_<split>/{train,valid,test}_list.npy (default: %(default)s)")
    p.add_argument("--splits", nargs="+", default=["clean", "noisy"],
                   help="split names; folder ml-1m_<name> (default: clean noisy)")
    p.add_argument("--lams", nargs="+", type=float, default=list(DEFAULT_LAMS),
                   help="EASE lambda grid (default: %(default)s)")
    p.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS),
                   help="cutoffs (default: %(default)s; 20 is always computed for selection)")
    p.add_argument("--ties", default="expected", choices=["expected", "optimistic", "pessimistic"])
    p.add_argument("--batch-size", type=int, default=2048, help="users per evaluator call")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"),
                   help="write diffrec_baselines.md here (default: %(default)s); '' = don't")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_split(args.data_root / f"ml-1m_{s}", args.lams, args.ks, args.ties, args.batch_size)
               for s in args.splits]
    report = markdown(results, sorted(set(args.ks)), args.ties)
    title = "# EASE and popularity on DiffRec's ML-1M splits (benchmarks/diffrec_baselines.py)\n\n"
    info = (f"\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, one process, "
            f"float64 scores, {time.strftime('%Y-%m-%d %H:%M')}.\n")
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diffrec_baselines.md").write_text(title + report + info)
        print(f"wrote {out / 'diffrec_baselines.md'}")


if __name__ == "__main__":
    main()
