"""Command line: ``python -m shards {build,synth,verify,info} ...``.

``build`` reads a dataset's source description (a YAML file holding a ``SourceConfig``
mapping, bare or under ``data: source:``, e.g. ``configs/datasets/ml1m.yaml``); jobs
usually build through ``python -m launcher prepare --config <job.yaml>`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from typing import List, Optional

from .build import DEFAULT_BLOCKS_PER_SHARD, DEFAULT_RECORDS_PER_BLOCK, build_shards, summarize
from .format import ShardError, load_manifest
from .source import DATA_DIR_ENV, SourceConfig
from .synthetic import DEFAULT_CHUNK_USERS, SynthConfig, synth_shards
from .verify import verify_shards


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def _probability(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {s}")
    return v


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-prefixes-per-user", type=_positive, default=None,
                   help="train samples: each record's last K prefixes (default: all)")
    p.add_argument("--records-per-block", type=_positive, default=DEFAULT_RECORDS_PER_BLOCK,
                   help="records (users / sessions) per checksummed block (default: %(default)s)")
    p.add_argument("--blocks-per-shard", type=_positive, default=DEFAULT_BLOCKS_PER_SHARD,
                   help="blocks per tar shard (default: %(default)s)")
    p.add_argument("--compress", action="store_true", help="gzip the shards (.tar.gz)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m shards", description="Build, generate, verify and inspect "
                                 "recsys-dist/seq-v2 WebDataset shards.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build shards from a dataset's source description (YAML)")
    b.add_argument("--source", required=True, help="YAML file with the SourceConfig (bare or under data.source)")
    b.add_argument("--dataset", default=None, help="dataset name (default: data.dataset of the YAML, else its stem)")
    b.add_argument("--data-dir", default=None, help=f"where relative source paths resolve (default: ${DATA_DIR_ENV} "
                   "or <repo>/../shared/datasets)")
    b.add_argument("--out", required=True, help="output directory or fsspec URL")
    _layout_args(b)
    y = sub.add_parser("synth", help="generate a synthetic leave-one-out dataset of any size")
    d = SynthConfig()
    y.add_argument("--out", required=True, help="output directory or fsspec URL")
    for f in dataclasses.fields(SynthConfig):
        kind = _probability if f.name in ("drift", "p_new_interest", "p_popular") else type(getattr(d, f.name))
        y.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(d, f.name),
                       help="(default: %(default)s; see shards/synthetic.py)")
    y.add_argument("--chunk-users", type=_positive, default=DEFAULT_CHUNK_USERS,
                   help="users generated together (default: %(default)s)")
    y.add_argument("--no-progress", action="store_true", help="no progress bar")
    _layout_args(y)
    v = sub.add_parser("verify", help="read every block of every shard, checking checksums, counts and ids")
    v.add_argument("manifest", help="manifest.json URL or its directory")
    i = sub.add_parser("info", help="print the summary of a manifest")
    i.add_argument("manifest", help="manifest.json URL or its directory")
    return ap


def _source_from_yaml(path: str) -> tuple:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    data = doc.get("data", {}) if isinstance(doc, dict) and "data" in doc else {"source": doc}
    src = data.get("source")
    if not isinstance(src, dict):
        raise ValueError(f"{path}: no source mapping (expected data.source: {{path: ..., ...}} or a bare mapping)")
    known = {f.name for f in dataclasses.fields(SourceConfig)}
    unknown = sorted(set(src) - known)
    if unknown:
        raise ValueError(f"{path}: unknown source field(s) {unknown} (known: {sorted(known)})")
    if isinstance(src.get("temporal_ratio"), list):
        src["temporal_ratio"] = tuple(src["temporal_ratio"])
    return SourceConfig(**src), data.get("dataset")


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    layout = {}
    if args.cmd in ("build", "synth"):
        layout = dict(train_prefixes_per_user=args.train_prefixes_per_user, records_per_block=args.records_per_block,
                      blocks_per_shard=args.blocks_per_shard, compress=args.compress, force=args.force)
    try:
        if args.cmd == "build":
            source, name = _source_from_yaml(args.source)
            from pathlib import Path
            m = build_shards(source, args.out, dataset=args.dataset or name or Path(args.source).stem,
                             data_dir=args.data_dir, **layout)
            print(summarize(m))
            print(f"output: {args.out} ({time.time() - t0:.1f} s)")
        elif args.cmd == "synth":
            gen = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)}
            m = synth_shards(args.out, **gen, chunk_users=args.chunk_users,
                             progress=False if args.no_progress else None, **layout)
            print(summarize(m))
            print(f"output: {args.out} ({time.time() - t0:.1f} s)")
        elif args.cmd == "verify":
            r = verify_shards(args.manifest)
            print(f"ok: {r['shards']} shard(s), {r['blocks']} blocks, {r['records']:,} records "
                  f"({time.time() - t0:.1f} s)")
        elif args.cmd == "info":
            print(summarize(load_manifest(args.manifest)))
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
