"""Command line: ``python -m shards {build,synth,verify,info} ...``."""

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
from .synthetic import DEFAULT_CHUNK_USERS, DEFAULT_COMPRESS_LEVEL, SynthConfig, synth_shards


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _probability(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
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

    d = SynthConfig()
    y = sub.add_parser(
        "synth",
        help="generate a synthetic dataset (Zipf popularity, interest clusters, drifting users)",
        description=(
            "Generate leave-one-out train/val/test shards, item_counts.npy and manifest.json (same layout as "
            "`build`) from a seeded generative process: Zipf item popularity over a permuted catalog, items in "
            "interest clusters, users whose next item comes from their current (drifting) interest. Streams "
            "users in chunks (memory independent of the user count; ~20-30 bytes per catalog item), byte-identical "
            "output for identical arguments, skips the work when an identical build exists at --out. "
            "See shards/synthetic.py for the process."
        ),
    )
    y.add_argument("--out", required=True, help="output directory or fsspec URL")
    y.add_argument("--num-items", type=_positive, default=d.num_items, help="catalog size (default: %(default)s)")
    y.add_argument("--num-users", type=_positive, default=d.num_users, help="users (default: %(default)s)")
    y.add_argument("--min-seq-len", type=_positive, default=d.min_seq_len,
                   help="shortest user sequence, >= 3 (default: %(default)s)")
    y.add_argument("--max-seq-len", type=_positive, default=d.max_seq_len,
                   help="longest user sequence; lengths are log-uniform in between (default: %(default)s)")
    y.add_argument("--max-len", type=_positive, default=50, help="keep the last N history items (default: %(default)s)")
    y.add_argument("--train-prefixes-per-user", type=_positive, default=None,
                   help="keep only each user's last K training prefixes (default: all)")
    y.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha,
                   help="popularity exponent: rank r has weight (r + offset)^-alpha (default: %(default)s)")
    y.add_argument("--zipf-offset", type=float, default=d.zipf_offset,
                   help="Zipf-Mandelbrot offset b >= 0, flattens the head (default: %(default)s)")
    y.add_argument("--num-interests", type=_positive, default=d.num_interests,
                   help="interest clusters of the catalog (default: %(default)s)")
    y.add_argument("--interests-per-user", type=_positive, default=d.interests_per_user,
                   help="clusters each user holds (default: %(default)s)")
    y.add_argument("--drift", type=_probability, default=d.drift,
                   help="per-step probability that the current interest is re-drawn (default: %(default)s)")
    y.add_argument("--p-new-interest", type=_probability, default=d.p_new_interest,
                   help="probability that a re-draw is a cluster outside the user's set (default: %(default)s)")
    y.add_argument("--p-popular", type=_probability, default=d.p_popular,
                   help="per-step probability of a globally popular (Zipf) item (default: %(default)s)")
    y.add_argument("--samples-per-shard", type=_positive, default=20000, help="samples per tar shard (default: %(default)s)")
    y.add_argument("--chunk-users", type=_positive, default=DEFAULT_CHUNK_USERS,
                   help="users generated (and train samples shuffled) together; part of the output (default: %(default)s)")
    y.add_argument("--seed", type=int, default=d.seed, help="seed of everything (default: %(default)s)")
    y.add_argument("--compress", action="store_true", help="gzip the shards (.tar.gz)")
    y.add_argument("--compress-level", type=int, choices=range(1, 10), default=DEFAULT_COMPRESS_LEVEL,
                   metavar="1..9", help="gzip level with --compress (default: %(default)s)")
    y.add_argument("--force", action="store_true", help="regenerate even if an identical build exists")
    y.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars on a terminal)")

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
        elif args.cmd == "synth":
            t0 = time.time()
            m = synth_shards(
                out=args.out,
                num_items=args.num_items,
                num_users=args.num_users,
                min_seq_len=args.min_seq_len,
                max_seq_len=args.max_seq_len,
                max_len=args.max_len,
                zipf_alpha=args.zipf_alpha,
                zipf_offset=args.zipf_offset,
                num_interests=args.num_interests,
                interests_per_user=args.interests_per_user,
                drift=args.drift,
                p_new_interest=args.p_new_interest,
                p_popular=args.p_popular,
                seed=args.seed,
                train_prefixes_per_user=args.train_prefixes_per_user,
                samples_per_shard=args.samples_per_shard,
                compress=args.compress,
                force=args.force,
                progress=False if args.no_progress else None,
                chunk_users=args.chunk_users,
                compress_level=args.compress_level,
            )
            print(summarize(m))
            print(f"output: {args.out} ({time.time() - t0:.1f} s)")
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
