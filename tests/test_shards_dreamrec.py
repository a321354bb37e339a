"""Zhihu with DreamRec's session split, end to end through ``seq-v2`` shards.

The staged replay TSVs (``zhihu/raw/dreamrec/{train,val,test}_data.tsv.gz``) are built once
per module from ``configs/datasets/zhihu.yaml`` with small blocks (500 sessions, 2 blocks per
shard: 24 blocks in 12 shards) and read back with :class:`shards.dataset.SequenceDataset`.
The reference is read here independently (gzip + csv): a row's history is the real
(non-pad) items of ``seq`` + 1, its target ``next`` + 1; a row with an empty history starts
a session (the staged files have no other session starts), and sessions are numbered
train, then valid, then test, in file order (= the record ids).

Proved: every row of every split comes back exactly once, as (left-padded history, target)
of its session, in file order at world size 1 and multiset-equal over 2 ranks (in-process
rank loops: the plan is a pure function of the manifest), shuffled or not; a session's
first interaction is a sample with an all-padding history; per-rank counts differ by at
most one; ``item_counts.npy`` / ``target_counts.npy`` count the train interactions per item;
2 DataLoader workers yield the same batches; a compressed build reads back identically and
building again is a no-op.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections import Counter
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recsys_dist.config import load_config
from shards import FORMAT, build_shards, load_manifest, plan_batches
from shards.dataset import SequenceDataset
from shards.source import default_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "datasets", "zhihu.yaml")
DATA_DIR = default_data_dir()
ZHIHU = os.path.join(DATA_DIR, "zhihu", "raw", "dreamrec")
FILES = {"train": "train_data.tsv.gz", "valid": "val_data.tsv.gz", "test": "test_data.tsv.gz"}
SPLITS = ("train", "valid", "test")
ITEM_NUM = 4838  # data_statis.json: the pad id of the raw files
MAX_LEN = 10  # = the files' seq_size
ROWS = {"train": 61641, "valid": 8160, "test": 7911}  # datasets README: rows of the split files
SESSIONS = {"train": 9371, "valid": 1171, "test": 1172}
BUILD = dict(dataset="zhihu", records_per_block=500, blocks_per_shard=2, progress=False)

pytestmark = pytest.mark.skipif(not all(os.path.isfile(os.path.join(ZHIHU, f)) for f in FILES.values()),
                                reason=f"staged zhihu not found at {ZHIHU}")

Row = Tuple[int, Tuple[int, ...], int]  # (session = record id, left-padded history (MAX_LEN,), target)


# --------------------------------------------------------------------------- reference / helpers


def read_tsv(split: str) -> List[Tuple[Tuple[int, ...], int]]:
    """[(real history items + 1, oldest first; target + 1)] of a replay file, in file order."""
    out = []
    with gzip.open(os.path.join(ZHIHU, FILES[split]), "rt", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        head = next(rows)
        si, ti = head.index("seq"), head.index("next")
        for r in rows:
            seq = [int(x) for x in r[si].split()]
            out.append((tuple(x + 1 for x in seq if x != ITEM_NUM), int(float(r[ti])) + 1))
    return out


def left_pad(h: Tuple[int, ...]) -> Tuple[int, ...]:
    return (0,) * (MAX_LEN - len(h)) + h[-MAX_LEN:]


@pytest.fixture(scope="module")
def reference() -> Dict[str, List[Row]]:
    """Per split, the rows in file order with their session id (a new session at each empty history)."""
    out, first = {}, 0
    for s in SPLITS:
        rows = read_tsv(s)
        assert len(rows) == ROWS[s]
        sess = first - 1 + np.cumsum([len(h) == 0 for h, _ in rows])
        assert sess[0] == first, f"{s}: the file does not start a session"
        out[s] = [(int(u), left_pad(h), t) for u, (h, t) in zip(sess, rows)]
        first = int(sess[-1]) + 1
    return out


def source():
    return load_config(CONFIG).data.source


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dreamrec") / "zhihu")
    return out, build_shards(source(), out, data_dir=DATA_DIR, **BUILD)


def rows_of(batches) -> List[Row]:
    out = []
    for b in batches:
        h = b["history"]
        assert h.dtype == torch.int64 and h.shape == (b["target"].shape[0], MAX_LEN)
        out += [(u, tuple(hh), t) for u, hh, t in zip(b["user"].tolist(), h.tolist(), b["target"].tolist())]
    return out


def read(url: str, split: str, batch_size: int = 256, rank: int = 0, world_size: int = 1, **kw) -> list:
    return list(SequenceDataset(url, split, batch_size, rank, world_size, max_len=MAX_LEN, **kw))


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --------------------------------------------------------------------------- tests


def test_manifest_counts_and_id_map(built):
    out, m = built
    assert (m["format"], m["dataset"], m["protocol"]) == (FORMAT, "zhihu", "session")
    assert m["min_history_len"] == 0 and m["num_items"] == ITEM_NUM and m["pad_id"] == 0
    assert m["num_records"] == sum(SESSIONS.values())
    assert m["num_samples"] == m["num_interactions"] == ROWS  # one sample per interaction, the first included
    blocks = [b for sh in m["shards"] for b in sh["blocks"]]
    assert len(blocks) == 24 and len(m["shards"]) == 12  # small blocks: every split spans several
    assert {s: m["stats"]["splits"][s]["sessions"] for s in SPLITS} == SESSIONS
    assert all(m["stats"]["splits"][s]["orphan_session_starts"] == 0 for s in SPLITS)
    assert load_manifest(out)["num_samples"] == ROWS
    with open(os.path.join(out, m["id_map_file"])) as f:
        ids = json.load(f)
    assert ids["items"] == [None] + list(range(ITEM_NUM))  # item i <-> raw id i - 1
    assert ids["records"] == [f"{s}:{k}" for s in SPLITS for k in range(SESSIONS[s])]


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_once_in_file_order(built, reference, split):
    """World size 1, no shuffle: exactly the file's rows, in file order, with their sessions."""
    out, _ = built
    got = rows_of(read(out, split))
    assert got == reference[split]
    # a session's first interaction: an all-padding history (one per session, and it comes first)
    firsts = [r for r in got if r[1] == (0,) * MAX_LEN]
    assert len(firsts) == SESSIONS[split]
    assert [u for u, _, _ in firsts] == sorted({u for u, _, _ in got})
    starts = [i for i in range(len(got)) if i == 0 or got[i][0] != got[i - 1][0]]
    assert all(got[i][1] == (0,) * MAX_LEN for i in starts) and len(starts) == SESSIONS[split]
    # a narrower reader keeps the newest items
    narrow = next(iter(SequenceDataset(out, split, 256, max_len=3)))["history"]
    assert torch.equal(narrow, read(out, split)[0]["history"][:, -3:])


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_once_over_two_ranks(built, reference, split):
    out, m = built
    plain = None
    for shuffle in (False, True):
        per = [read(out, split, 128, r, 2, shuffle=shuffle, seed=3, epoch=1, window_blocks=2) for r in range(2)]
        rows = [rows_of(bs) for bs in per]
        assert Counter(rows[0] + rows[1]) == Counter(reference[split])  # each row exactly once
        assert abs(len(rows[0]) - len(rows[1])) <= 1
        assert [len(bs) for bs in per] == plan_batches(m, split, 128, 2, False)
        if plain is None:
            plain = rows
            assert rows[0] + rows[1] == reference[split]  # contiguous ranges, in order
        else:
            assert rows != plain  # shuffled ...
            assert [Counter(r) for r in rows] == [Counter(r) for r in plain]  # ... within each rank's share


def test_item_and_target_counts_are_train_interactions(built, reference):
    out, m = built
    exp = np.bincount([t for _, _, t in reference["train"]], minlength=ITEM_NUM + 1)
    for name in (m["train_item_counts_file"], m["train_target_counts_file"]):
        c = np.load(os.path.join(out, name), allow_pickle=False)
        assert c.dtype == np.int64 and c.shape == (ITEM_NUM + 1,) and c[0] == 0
        np.testing.assert_array_equal(c, exp)  # every train interaction is one train target
    assert exp.sum() == ROWS["train"]


def test_two_dataloader_workers_give_the_same_batches(built):
    out, _ = built
    for split, rank, kw in (("train", 0, dict(shuffle=True, seed=7, window_blocks=3)), ("valid", 1, {})):
        ds = SequenceDataset(out, split, 200, rank, 2, max_len=MAX_LEN, **kw)
        ref = list(ds)
        got = list(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(ref) == len(ds) and same_batches(ref, got)


def test_compressed_build_reads_back_identically_and_rebuild_is_a_noop(built, tmp_path):
    out, _ = built
    gz = str(tmp_path / "gz")
    m = build_shards(source(), gz, data_dir=DATA_DIR, compress=True, **BUILD)
    assert sorted(f for f in os.listdir(gz) if ".tar" in f) == [f"seq-{i:05d}.tar.gz" for i in range(12)]
    assert m["build"]["compress"] is True
    for split in SPLITS:
        assert same_batches(read(gz, split, 300, 1, 2), read(out, split, 300, 1, 2))
    before = {f: os.stat(os.path.join(gz, f)).st_mtime_ns for f in os.listdir(gz)}
    assert build_shards(source(), gz, data_dir=DATA_DIR, compress=True, **BUILD) == m
    assert {f: os.stat(os.path.join(gz, f)).st_mtime_ns for f in os.listdir(gz)} == before  # manifest included
