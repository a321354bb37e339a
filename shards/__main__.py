"""Command line: ``python -m shards {build,verify,info} ...``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import List, Optional

from .build import build_shards, summarize
from .reader import load_manifest, verify_shards
from .schema import ShardError
from .sources import DATA_DIR_ENV, DATASETS, SESSION_DATASETS, dataset_names


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shards",
        description="Build and check WebDataset shards of sequential-recommendation samples (recsys-dist/seq-v1).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser(
        "build",
        help="build train/val/test shards from a raw dataset",
        description=(
            f"Leave-one-out datasets ({', '.join(sorted(DATASETS))}): read a DiffuRec-format interactions TSV, "
            "apply an iterated k-core filter, re-index items to 1..N (0 = pad), and write leave-one-out samples. "
            f"Session-split datasets ({', '.join(sorted(SESSION_DATASETS))}): read the DreamRec "
            "train/val/test_data.tsv.gz files as given (no re-splitting, no filter; kuairec and yoochoose lack "
            "their train file), item ids raw+1, one sample per row (user = row index, empty history for a "
            "session's first interaction). Writes WebDataset tar shards plus manifest.json; skips the work when "
            "an identical build already exists at --out."
        ),
    )
    b.add_argument("--dataset", required=True, choices=dataset_names(), help="dataset name")
    b.add_argument("--data-dir", default=None, help=f"dataset root (default: ${DATA_DIR_ENV} or <repo>/../shared/datasets)")
    b.add_argument("--out", default=None, help="output directory or fsspec URL (default: shards_out/<dataset>)")
    b.add_argument("--max-len", type=_positive, default=None,
                   help="keep the last N history items (default: 50 leave-one-out, 10 session split)")
    b.add_argument("--train-prefixes-per-user", type=_positive, default=None,
                   help="keep only each user's last K training prefixes (default: all; leave-one-out only)")
    b.add_argument("--samples-per-shard", type=_positive, default=20000, help="samples per tar shard (default: %(default)s)")
    b.add_argument("--min-count", type=int, default=None,
                   help="k-core threshold for both items and users (default: 5; leave-one-out only)")
    b.add_argument("--min-item-count", type=int, default=None, help="item threshold (overrides --min-count)")
    b.add_argument("--min-user-count", type=int, default=None, help="user threshold (overrides --min-count)")
    b.add_argument("--max-users", type=_positive, default=None,
                   help="keep only the first N users after filtering (session split: same as --max-rows)")
    b.add_argument("--max-rows", type=_positive, default=None,
                   help="session split only: keep the first N rows of every split file")
    b.add_argument("--seed", type=int, default=0, help="seed of the one-off train shuffle (default: %(default)s)")
    b.add_argument("--compress", action="store_true", help="gzip the shards (.tar.gz)")
    b.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")

    v = sub.add_parser("verify", help="check sizes and sha256 of all shards against the manifest")
    v.add_argument("manifest", help="manifest.json URL or its directory")

    i = sub.add_parser("info", help="print the summary of a manifest")
    i.add_argument("manifest", help="manifest.json URL or its directory")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "build":
            out = args.out or f"shards_out/{args.dataset}"
            t0 = time.time()
            m = build_shards(
                dataset=args.dataset,
                out=out,
                data_dir=args.data_dir,
                max_len=args.max_len,
                train_prefixes_per_user=args.train_prefixes_per_user,
                samples_per_shard=args.samples_per_shard,
                min_item_count=args.min_item_count if args.min_item_count is not None else args.min_count,
                min_user_count=args.min_user_count if args.min_user_count is not None else args.min_count,
                seed=args.seed,
                max_users=args.max_users,
                max_rows=args.max_rows,
                compress=args.compress,
                force=args.force,
            )
            print(summarize(m))
            print(f"output: {out} ({time.time() - t0:.1f} s)")
        elif args.cmd == "verify":
            r = verify_shards(args.manifest)
            print(f"ok: {r['checked']} shard(s), {r['bytes']} bytes")
        elif args.cmd == "info":
            print(summarize(load_manifest(args.manifest)))
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
