"""Session-split (DreamRec "replay" format) shards: zhihu built from its given train/val/test files."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shards import (
    ShardError,
    ShardReader,
    build_shards,
    decode_sample,
    encode_sample,
    load_manifest,
    load_session_splits,
    plan_batches,
    verify_shards,
)
from shards.__main__ import main as cli_main
from shards.sources import dataset_path

ZHIHU = dataset_path("zhihu")
ITEM_NUM = 4838  # data_statis.json
FULL_ROWS = {"train": 61641, "val": 8160, "test": 7911}  # README: rows of the DreamRec split files
FULL_SESSIONS = {"train": 9371, "val": 1171, "test": 1172}
MAX_ROWS = 700  # rows per split in the main fixture (the full build writes ~230 MiB of tar: too slow here)
PER_SHARD = 300
SPLITS = ("train", "val", "test")

pytestmark = pytest.mark.skipif(not os.path.isdir(ZHIHU), reason=f"dataset not found: {ZHIHU}")


# --------------------------------------------------------------------------- reference / helpers


def raw_rows(path, max_rows=None):
    """Independent reading of a replay TSV: [(history (ids + 1, oldest first), target + 1)] in file order."""
    out = []
    with gzip.open(path, "rt") as f:
        header = f.readline().rstrip("\n").split("\t")
        si = header.index("seq")
        ti = header.index("next") if "next" in header else header.index("tgt")
        for line in f:
            if max_rows is not None and len(out) == max_rows:
                break
            cols = line.rstrip("\n").split("\t")
            seq = [int(x) for x in cols[si].split()]
            out.append((tuple(x + 1 for x in seq if x != ITEM_NUM), int(cols[ti]) + 1))
    return out


def split_file(split):
    return os.path.join(ZHIHU, f"{split}_data.tsv.gz")


@pytest.fixture(scope="module")
def reference():
    return {s: raw_rows(split_file(s), MAX_ROWS) for s in SPLITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dreamrec") / "zhihu")
    m = build_shards("zhihu", out, max_rows=MAX_ROWS, samples_per_shard=PER_SHARD, seed=0, progress=False)
    return out, m


def read_batches(url, split, batch_size=64, **kw):
    return list(ShardReader(url, split, batch_size, **kw))


def samples_of(batches):
    """[(user, target, history without padding)] of a list of batches."""
    out = []
    for b in batches:
        for h, t, u in zip(b["history"].tolist(), b["target"].tolist(), b["user"].tolist()):
            out.append((u, t, tuple(x for x in h if x != 0)))
    return out


# --------------------------------------------------------------------------- full data (loader only)


def test_full_splits_match_tsv_row_counts_and_id_range():
    data = load_session_splits("zhihu")
    assert data.num_items == ITEM_NUM and data.seq_size == 10
    for split in SPLITS:
        with gzip.open(split_file(split), "rt") as f:
            lines = sum(1 for _ in f) - 1  # minus the header
        sp = data.splits[split]
        assert sp.num_rows == lines == FULL_ROWS[split]
        st = data.stats["splits"][split]
        assert st["rows"] == FULL_ROWS[split]
        assert st["sessions"] == st["empty_history_rows"] == FULL_SESSIONS[split]  # one empty row per session
        assert st["orphan_session_starts"] == 0
        assert sp.targets.min() >= 1 and sp.targets.max() <= ITEM_NUM
        assert sp.history_items.min() >= 1 and sp.history_items.max() <= ITEM_NUM
        lengths = sp.lengths()
        assert lengths.min() == 0 and lengths.max() == 10
        assert int((lengths == 0).sum()) == FULL_SESSIONS[split]
        # rows of a session: positions 1, 2, ...; history = previous history + previous target (last 10)
        starts = sp.session_starts()
        assert (sp.positions[starts] == 1).all() and (lengths[starts] == 0).all()
        r = int(np.flatnonzero(~starts & (lengths == 10))[0])
        prev = list(sp.history(r - 1)) + [int(sp.targets[r - 1])]
        assert list(sp.history(r)) == prev[-10:]


# --------------------------------------------------------------------------- build / manifest


def test_manifest_and_counts(built, reference):
    out, m = built
    assert m["format"] == "recsys-dist/seq-v1" and m["dataset"] == "zhihu"
    assert m["protocol"] == "session_split" and m["min_history_len"] == 0
    assert m["num_items"] == ITEM_NUM and m["max_len"] == 10 and m["pad_id"] == 0
    assert m["num_users"] == MAX_ROWS
    assert m["build"]["max_rows"] == MAX_ROWS and "filter" not in m
    for split in SPLITS:
        s = m["splits"][split]
        assert s["num_samples"] == len(reference[split]) == MAX_ROWS
        assert s["num_samples"] == sum(sh["num_samples"] for sh in s["shards"])
        assert [sh["num_samples"] for sh in s["shards"]] == [300, 300, 100]
        st = m["stats"]["splits"][split]
        assert st["rows"] == MAX_ROWS
        assert st["empty_history_rows"] == sum(1 for h, _ in reference[split] if not h) > 0
    assert load_manifest(out)["protocol"] == "session_split"
    assert verify_shards(out)["checked"] == 9
    with open(os.path.join(out, m["id_map_file"])) as f:
        id_map = json.load(f)
    assert id_map["items"][0] is None and id_map["items"][1:] == list(range(ITEM_NUM))  # item i <-> raw i - 1
    for split in SPLITS:
        sess = id_map["sessions"][split]
        assert len(sess) == MAX_ROWS and sess[0] == 0
        empty = [h == () for h, _ in reference[split]]
        assert [r for r in range(1, MAX_ROWS) if sess[r] != sess[r - 1]] == [r for r in range(1, MAX_ROWS) if empty[r]]


def test_every_row_read_back_with_shifted_ids(built, reference):
    out, _ = built
    for split in SPLITS:
        got = samples_of(read_batches(out, split))
        assert sorted(u for u, _, _ in got) == list(range(MAX_ROWS))  # user = row index, each row once
        expected = {r: (t, h) for r, (h, t) in enumerate(reference[split])}
        assert {u: (t, h) for u, t, h in got} == expected
        items = [x for _, t, h in got for x in h + (t,)]
        assert min(items) >= 1 and max(items) <= ITEM_NUM
    # val/test stay in file order; train was shuffled once at build time
    assert [u for u, _, _ in samples_of(read_batches(out, "val"))] == list(range(MAX_ROWS))
    assert [u for u, _, _ in samples_of(read_batches(out, "train"))] != list(range(MAX_ROWS))


def test_empty_histories_are_all_padding_and_batches_left_padded(built, reference):
    out, _ = built
    n_empty = 0
    for split in ("train", "test"):
        ref = reference[split]
        for b in read_batches(out, split, batch_size=50):
            h = b["history"]
            assert h.dtype == torch.int64 and h.shape == (b["target"].shape[0], 10)
            nz = h != 0
            n = nz.sum(1)
            cols = torch.arange(10).expand_as(h)
            assert torch.equal(nz, cols >= (10 - n).unsqueeze(1))  # one block of real items, ending in the last column
            for row, t, u in zip(h.tolist(), b["target"].tolist(), b["user"].tolist()):
                hist, target = ref[u]
                assert t == target
                if not hist:
                    assert row == [0] * 10
                    n_empty += 1
                else:
                    assert row[-1] == hist[-1] and row[10 - len(hist):] == list(hist)  # most recent item last
    assert n_empty == sum(1 for s in ("train", "test") for h, _ in reference[s] if not h)
    # a narrower reader keeps the most recent items; empty rows stay all-pad
    wide = read_batches(out, "test", batch_size=64)[0]
    narrow = read_batches(out, "test", batch_size=64, max_len=3)[0]
    assert narrow["history"].shape == (64, 3) and torch.equal(narrow["history"], wide["history"][:, -3:])


def test_item_counts_are_train_interactions(built, reference):
    out, m = built
    counts = np.load(os.path.join(out, m["train_item_counts_file"]), allow_pickle=False)
    assert counts.dtype == np.int64 and counts.shape == (ITEM_NUM + 1,) and counts[0] == 0
    exp = np.zeros(ITEM_NUM + 1, dtype=np.int64)
    for _, t in reference["train"]:
        exp[t] += 1
    np.testing.assert_array_equal(counts, exp)  # each interaction once: every row's target
    assert counts.sum() == MAX_ROWS
    assert all(counts[i] > 0 for h, _ in reference["train"] for i in h)  # history items are covered


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("assignment", ["round_robin", "balanced"])
def test_every_row_exactly_once_over_two_ranks(built, split, assignment):
    out, m = built
    for shuffle in (False, True):
        per_rank = [read_batches(out, split, 32, rank=r, world_size=2, shuffle=shuffle, seed=5, assignment=assignment)
                    for r in range(2)]
        users = sorted(u for batches in per_rank for u, _, _ in samples_of(batches))
        assert users == list(range(MAX_ROWS))
        assert [len(b) for b in per_rank] == plan_batches(m, split, 32, 2, 1, drop_last=False, assignment=assignment)


def test_dataloader_workers_read_empty_histories(built):
    out, _ = built
    everything = sorted(samples_of(read_batches(out, "val")))
    got = []
    for rank in range(2):  # 2 ranks x 2 worker processes = 4 readers
        rd = ShardReader(out, "val", 64, rank=rank, world_size=2)
        mine = samples_of(DataLoader(rd, batch_size=None, num_workers=2))
        assert rd.samples_yielded == len(mine) and rd.bad_samples == 0
        got += mine
    assert sorted(got) == everything and sum(1 for _, _, h in got if h == ()) > 0


def test_compressed_truncated_build_and_idempotence(tmp_path, reference):
    out = str(tmp_path / "z")
    kw = dict(max_rows=120, samples_per_shard=50, max_len=4, compress=True, progress=False)
    m = build_shards("zhihu", out, **kw)
    names = sorted(f for f in os.listdir(out) if ".tar" in f)
    assert names == sorted(f"{s}-{i:05d}.tar.gz" for s in SPLITS for i in range(3))
    assert m["max_len"] == 4 and m["build"]["compress"] is True
    for split in ("train", "val"):
        got = {u: (t, h) for u, t, h in samples_of(read_batches(out, split))}
        assert got == {r: (t, h[-4:]) for r, (h, t) in enumerate(reference[split][:120])}  # stored truncated
    mpath = os.path.join(out, "manifest.json")
    before = os.stat(mpath).st_mtime_ns
    assert build_shards("zhihu", out, **kw) == m
    assert os.stat(mpath).st_mtime_ns == before
    m2 = build_shards("zhihu", "file://" + out, **dict(kw, max_rows=60))  # parameters changed: rebuilt
    assert m2["splits"]["test"]["num_samples"] == 60
    left = sorted(f for f in os.listdir(out) if ".tar" in f)
    assert left == sorted(sh["name"] for s in m2["splits"].values() for sh in s["shards"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_header_variants_orphan_rows_and_malformed_rows(tmp_path):
    """baiyimeng's re-serialisation names the columns seq, seq_len, tgt (any order is accepted)."""
    root = tmp_path / "data"
    d = root / "zhihu" / "raw" / "dreamrec"
    d.mkdir(parents=True)
    (d / "data_statis.json").write_text(json.dumps({"seq_size": 3, "item_num": 5}))
    P = "5"
    rows = {  # (seq, seq_len, tgt)
        "train": [(f"{P} {P} {P}", 1, 0), (f"0 {P} {P}", 1, 4), (f"0 4 {P}", 2, 2), (f"0 4 2", 3, 1),
                  (f"4 2 1", 3, 3), (f"3 {P} {P}", 1, 3)],  # last row: an orphan session start
        "val": [(f"{P} {P} {P}", 1, 2)],
        "test": [(f"{P} {P} {P}", 1, 1), (f"1 {P} {P}", 1, 4)],
    }
    for split, rs in rows.items():
        with gzip.open(d / f"{split}_data.tsv.gz", "wt") as f:
            f.write("tgt\tseq\tseq_len\n")
            for seq, n, t in rs:
                f.write(f"{t}.0\t{seq}\t{n}\n" if split == "val" else f"{t}\t{seq}\t{n}\n")
    data = load_session_splits("zhihu", str(root))
    tr = data.splits["train"]
    assert tr.targets.tolist() == [1, 5, 3, 2, 4, 4]
    assert [tr.history(r).tolist() for r in range(6)] == [[], [1], [1, 5], [1, 5, 3], [5, 3, 2], [4]]
    assert tr.sessions.tolist() == [0, 0, 0, 0, 0, 1] and tr.positions.tolist() == [1, 2, 3, 4, 5, 2]
    assert data.stats["splits"]["train"]["orphan_session_starts"] == 1
    assert data.splits["val"].targets.tolist() == [3]
    out = str(tmp_path / "out")
    m = build_shards("zhihu", out, data_dir=str(root), progress=False)
    counts = np.load(os.path.join(out, "item_counts.npy"), allow_pickle=False)
    assert counts.tolist() == [0, 1, 1, 1, 3, 1]  # every train target once (item 4 twice) + the orphan's history item 4
    assert m["num_items"] == 5 and m["num_users"] == 6 and m["max_len"] == 10
    # malformed data: errors name the file and line
    with gzip.open(d / "test_data.tsv.gz", "wt") as f:
        f.write(f"seq\tlen_seq\tnext\n{P} {P} {P}\t1\t1\n1 {P} 2\t2\t3\n")
    with pytest.raises(ValueError, match=r"test_data\.tsv\.gz:3: seq is not right-padded"):
        load_session_splits("zhihu", str(root))
    with gzip.open(d / "test_data.tsv.gz", "wt") as f:
        f.write(f"seq\tlen_seq\tnext\n{P} {P}\t1\t1\n")
    with pytest.raises(ValueError, match=r"test_data\.tsv\.gz:2: malformed row .*seq_size=3"):
        load_session_splits("zhihu", str(root))
    with gzip.open(d / "test_data.tsv.gz", "wt") as f:
        f.write(f"seq\tlen_seq\tnext\n{P} {P} {P}\t1\t5\n")
    with pytest.raises(ValueError, match=r"test_data\.tsv\.gz:2: target outside \[0, 4\]"):
        load_session_splits("zhihu", str(root))


# --------------------------------------------------------------------------- errors / CLI / schema


@pytest.mark.parametrize("dataset", ["kuairec", "yoochoose"])
def test_missing_train_split_raises_naming_the_file(dataset, tmp_path):
    if not os.path.isdir(dataset_path(dataset)):
        pytest.skip(f"{dataset} not staged")
    train = os.path.join(dataset_path(dataset), "train_data.tsv.gz")
    assert not os.path.exists(train)
    with pytest.raises(FileNotFoundError, match=r"missing file\(s\) " + train.replace(".", r"\.") + "; "):
        build_shards(dataset, str(tmp_path / dataset), progress=False)
    assert not os.path.exists(tmp_path / dataset / "manifest.json")


def test_missing_file_in_a_copy_names_it(tmp_path):
    root = tmp_path / "data" / "zhihu" / "raw" / "dreamrec"
    shutil.copytree(ZHIHU, root)
    os.remove(root / "val_data.tsv.gz")
    with pytest.raises(FileNotFoundError, match=r"val_data\.tsv\.gz") as ei:
        build_shards("zhihu", str(tmp_path / "out"), data_dir=str(tmp_path / "data"), progress=False)
    assert "train_data" not in str(ei.value).split(";")[0]


def test_cli_builds_zhihu_and_reports_missing_train(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli_main(["build", "--dataset", "zhihu", "--out", out, "--max-rows", "50", "--samples-per-shard", "40"]) == 0
    m = load_manifest(out)
    assert m["protocol"] == "session_split" and m["splits"]["val"]["num_samples"] == 50 and m["max_len"] == 10
    assert "session_split" in capsys.readouterr().out
    if os.path.isdir(dataset_path("kuairec")):
        assert cli_main(["build", "--dataset", "kuairec", "--out", str(tmp_path / "k")]) == 1
        assert "kuairec/raw/dreamrec/train_data.tsv.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["build", "--dataset", "nope"])
    assert "zhihu" in capsys.readouterr().err


def test_leave_one_out_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="train_prefixes_per_user"):
        build_shards("zhihu", str(tmp_path / "a"), train_prefixes_per_user=3)
    with pytest.raises(ValueError, match="min_item_count"):
        build_shards("zhihu", str(tmp_path / "a"), min_item_count=5)
    with pytest.raises(ValueError, match="max_rows"):
        build_shards("zhihu", str(tmp_path / "a"), max_rows=10, max_users=20)
    with pytest.raises(ValueError, match="max_rows applies"):
        build_shards("ml-1m", str(tmp_path / "a"), max_rows=10)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_shards("steam", str(tmp_path / "a"))


def test_schema_empty_history_only_when_allowed():
    with pytest.raises(ValueError, match="non-empty"):
        encode_sample("test", 3, 1, np.zeros(0, dtype=np.int32), 7)
    enc = encode_sample("test", 3, 1, np.zeros(0, dtype=np.int32), 7, min_len=0)
    assert enc["history.i32"] == b"" and enc["__key__"] == "test-00000003-00001"
    members = {k: v for k, v in enc.items() if k != "__key__"}
    h, t, u = decode_sample(enc["__key__"], members, "x.tar", num_items=10, max_len=5, min_len=0)
    assert h.shape == (0,) and (t, u) == (7, 3)
    with pytest.raises(ShardError, match=r"test-00000003-00001\.history\.i32 has 0 bytes.*between 4 and 20"):
        decode_sample(enc["__key__"], members, "x.tar", num_items=10, max_len=5)  # leave-one-out default


def test_empty_history_in_a_leave_one_out_manifest_is_rejected(built, tmp_path):
    out, _ = built
    dst = str(tmp_path / "loo")
    shutil.copytree(out, dst)
    mp = os.path.join(dst, "manifest.json")
    with open(mp) as f:
        m = json.load(f)
    m["protocol"] = "leave_one_out"
    del m["min_history_len"]  # old manifests: histories must be non-empty
    with open(mp, "w") as f:
        json.dump(m, f)
    assert load_manifest(dst)["min_history_len"] == 1
    with pytest.raises(ShardError, match=r"history\.i32 has 0 bytes"):
        read_batches(dst, "val")
    rd = ShardReader(dst, "val", 64, on_error="skip")
    n = sum(b["target"].shape[0] for b in rd)
    assert rd.bad_samples == m["stats"]["splits"]["val"]["empty_history_rows"] and n == MAX_ROWS - rd.bad_samples
    m["protocol"] = "bogus"
    with open(mp, "w") as f:
        json.dump(m, f)
    with pytest.raises(ShardError, match="unknown protocol"):
        load_manifest(dst)
