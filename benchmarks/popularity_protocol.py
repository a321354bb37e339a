"""The popularity ranker under the old and the new evaluation protocol, side by side.

What changed (issue "Honest numbers"): ties with the target used to count for it (optimistic),
now the default is the expected rank under a random order of ties; history masking used to
cover only the model's input window (the last ``max_len`` items), now the user's whole seen set.
The popularity ranker (train-split counts, many ties) shows both effects most clearly.

    PYTHONPATH=. python benchmarks/popularity_protocol.py            # ml1m beauty zhihu
    PYTHONPATH=. python benchmarks/popularity_protocol.py --datasets ml1m --out benchmarks/out

One process, no training: builds (or finds) each dataset's shards with its job config, then
ranks every test user with the project's evaluator. Prints a markdown table (% values).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [  # (label, ties, mask, masked set)
    ("old: optimistic ties, no mask", "optimistic", False, None),
    ("new default: expected ties, no mask", "expected", False, None),
    ("old mask: input window (last max_len), optimistic", "optimistic", True, "history"),
    ("new mask: whole seen set, optimistic", "optimistic", True, "seen"),
    ("new mask: whole seen set, expected ties", "expected", True, "seen"),
]


def popularity_rows(dataset: str) -> list[tuple[str, dict[str, float]]]:
    from recsys_dist.config import load_config
    from recsys_dist.train.data import ensure_shards, load_item_counts, make_loader
    from recsys_dist.train.validate import evaluate_popularity

    cfg = load_config(Path("configs/datasets") / f"{dataset}.yaml")
    manifest = ensure_shards(cfg, 0)
    counts = load_item_counts(cfg, manifest)
    num_rows = int(manifest["num_items"]) + 1
    out = []
    for label, ties, mask, which in ROWS:
        cfg.eval.ties, cfg.eval.mask_history = ties, mask
        loader, _ = make_loader(cfg, manifest, "test", 0, 1, False, cfg.eval.batch_size)
        batches = loader if which != "history" else ({k: v for k, v in b.items() if k != "seen"} for b in loader)
        out.append((label, evaluate_popularity(counts, num_rows, batches, cfg.eval, 0, 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml1m", "beauty", "zhihu"])
    p.add_argument("--out", default=None, help="also write popularity_protocol.{md,json} here")
    args = p.parse_args()
    lines = ["| dataset | protocol | HR@5 | HR@10 | HR@20 | HR@50 | NDCG@10 | users |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    dump = {}
    for ds in args.datasets:
        for label, m in popularity_rows(ds):
            dump.setdefault(ds, {})[label] = m
            lines.append(f"| {ds} | {label} | " + " | ".join(f"{100 * m[k]:.2f}" for k in
                         ("HR@5", "HR@10", "HR@20", "HR@50", "NDCG@10")) + f" | {m['num_users']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "popularity_protocol.md").write_text(table + "\n")
        Path(args.out, "popularity_protocol.json").write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
