"""shards.source: config-driven loading of every staged format into Records."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytest

from shards.source import SourceConfig, default_data_dir, load_records, source_files


def write(path: Path, lines: Sequence[str], gz: bool = False) -> str:
    """Write ``lines`` (one per row) to ``path`` (gzip when ``gz``); return the path as str."""
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def seqs(r) -> List[List[int]]:
    return [r.items[r.offsets[i]:r.offsets[i + 1]].tolist() for i in range(r.num_records)]


# user item time rows, deliberately out of order; user 2 has 3 interactions, user 10 has 4, user 9 has 3
ROWS = [("10", "300", "4"), ("2", "5", "2"), ("10", "5", "1"), ("9", "40", "7"), ("2", "300", "1"),
        ("10", "40", "3"), ("9", "5", "5"), ("2", "40", "3"), ("10", "300", "2"), ("9", "300", "6")]


def table(tmp_path: Path, name: str, sep: str = "\t", header: bool = True, gz: bool = False,
          rows=ROWS, cols=("u", "i", "t")) -> str:
    lines = ([sep.join(cols)] if header else []) + [sep.join(r) for r in rows]
    return write(tmp_path / name, lines, gz)


def loo(path: str, **kw) -> SourceConfig:
    kw.setdefault("user", "u")
    kw.setdefault("item", "i")
    kw.setdefault("time", "t")
    return SourceConfig(path=path, **kw)


# --------------------------------------------------------------------------- leave-one-out / re-indexing


def test_leave_one_out_reindex_and_bounds(tmp_path):
    r = load_records(loo(table(tmp_path, "a.tsv")), str(tmp_path))
    # users by ascending numeric raw id (2 < 9 < 10, not string order), items 5 < 40 < 300 -> 1, 2, 3
    assert r.raw_record_ids.tolist() == [2, 9, 10] and r.raw_item_ids.tolist() == [5, 40, 300]
    assert seqs(r) == [[3, 1, 2], [1, 3, 2], [1, 3, 2, 3]]  # each user's items sorted by t
    assert r.times.tolist() == [1, 2, 3, 5, 6, 7, 1, 2, 3, 4]
    assert r.bounds.tolist() == [[1, 2], [1, 2], [2, 3]]
    assert r.num_items == 3 and r.protocol == "leave_one_out" and r.offsets.dtype == np.int64
    assert r.items.dtype == np.int32 and r.segment_counts() == {"train": 4, "valid": 3, "test": 3}


def test_same_records_from_csv_tsv_gzip_and_double_colon(tmp_path):
    ref = load_records(loo(table(tmp_path, "a.tsv")))
    variants = [loo(table(tmp_path, "b.csv", sep=",")), loo(table(tmp_path, "c.tsv.gz", gz=True)),
                loo(table(tmp_path, "d.csv.gz", sep=",", gz=True)),
                # ML-1M ratings.dat style: no header, '::', columns by index
                SourceConfig(path="ratings.dat", sep="::", header=False, user=0, item=1, time=2)]
    table(tmp_path, "ratings.dat", sep="::", header=False)
    for cfg in variants:
        r = load_records(cfg, str(tmp_path))
        assert seqs(r) == seqs(ref) and r.bounds.tolist() == ref.bounds.tolist(), cfg
        assert r.raw_record_ids.tolist() == ref.raw_record_ids.tolist()


def test_quoted_csv_blank_lines_and_crlf(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes(b'u,i,t,title\r\n1,a,1,"x, y"\r\n\r\n1,b,2,"z"\r\n1,c,3,w\r\n')
    r = load_records(loo(str(p)))
    assert seqs(r) == [[1, 2, 3]] and r.raw_item_ids.tolist() == ["a", "b", "c"]


def test_string_ids_and_colliding_spellings_keep_string_order(tmp_path):
    rows = [("A1", "B000X", "1"), ("A1", "0205616461", "2"), ("A1", "9", "3"), ("u7", "10", "1"),
            ("u7", "9", "2"), ("u7", "B000X", "3")]
    r = load_records(loo(table(tmp_path, "s.tsv", rows=rows)))
    assert r.raw_record_ids.tolist() == ["A1", "u7"]
    assert r.raw_item_ids.tolist() == ["0205616461", "10", "9", "B000X"]  # string order
    rows = [("1", "7", "1"), ("1", "07", "2"), ("1", "8", "3")]  # "7" and "07" are different ids
    r = load_records(loo(table(tmp_path, "z.tsv", rows=rows)))
    assert r.raw_item_ids.tolist() == ["07", "7", "8"] and r.num_items == 3


def test_file_order_when_no_time_and_ties_keep_file_order(tmp_path):
    rows = [("1", "a", "5"), ("1", "b", "5"), ("1", "c", "1"), ("1", "d", "5")]
    p = table(tmp_path, "t.tsv", rows=rows)
    assert seqs(load_records(loo(p, time=None))) == [[1, 2, 3, 4]]
    assert seqs(load_records(loo(p))) == [[3, 1, 2, 4]]


def _kcore_reference(rows, min_user, min_item):
    """Plain-Python iterated k-core: the set of kept (user, item, time) rows."""
    kept = list(rows)
    while True:
        ic, uc = {}, {}
        for u, i, _ in kept:
            ic[i] = ic.get(i, 0) + 1
        k1 = [r for r in kept if ic[r[1]] >= min_item]
        for u, _, _ in k1:
            uc[u] = uc.get(u, 0) + 1
        k2 = [r for r in k1 if uc[r[0]] >= min_user]
        if len(k2) == len(kept):
            return set(k2)
        kept = k2


def test_kcore_iterates_to_the_maximal_core(tmp_path):
    rows = [(u, i, str(t)) for u, its in [("1", "abc"), ("2", "abc"), ("3", "abd"), ("4", "cde")]
            for t, i in enumerate(its)]
    r = load_records(loo(table(tmp_path, "k.tsv", rows=rows), min_user_count=3, min_item_count=2))
    # e (1) goes, then user 4 (2 left), then d (1), then user 3, and a, b, c keep 2 each
    assert r.raw_record_ids.tolist() == [1, 2] and r.raw_item_ids.tolist() == ["a", "b", "c"]
    assert r.stats["iterations"] == 3 and r.stats["raw_interactions"] == 12 and r.stats["interactions"] == 6

    rng = np.random.default_rng(0)
    rows = [(str(u), str(i), str(t)) for t, (u, i) in enumerate(zip(rng.integers(0, 40, 600),
                                                                    rng.zipf(1.6, 600) % 80))]
    for mu, mi in [(3, 2), (5, 5), (8, 3)]:
        r = load_records(loo(table(tmp_path, "big.csv", sep=",", rows=rows), min_user_count=mu, min_item_count=mi))
        got = {(str(r.raw_record_ids[u]), str(r.raw_item_ids[it - 1]), str(t))
               for u in range(r.num_records)
               for it, t in zip(r.items[r.offsets[u]:r.offsets[u + 1]], r.times[r.offsets[u]:r.offsets[u + 1]])}
        assert got == _kcore_reference(rows, mu, mi)
        assert r.lengths().min() >= max(mu, 3) and np.bincount(r.items)[1:].min() >= mi


def test_leave_one_out_drops_users_below_three(tmp_path):
    rows = [("1", "a", "1"), ("1", "b", "2"), ("1", "c", "3"), ("2", "a", "1"), ("2", "b", "2"),
            ("3", "a", "1"), ("3", "b", "2"), ("3", "c", "3")]
    r = load_records(loo(table(tmp_path, "s.tsv", rows=rows), min_item_count=2))
    assert r.raw_record_ids.tolist() == [1, 3] and r.bounds.tolist() == [[1, 2], [1, 2]]
    assert r.stats["short_users_dropped"] == 1 and r.stats["short_interactions_dropped"] == 2
    # temporal keeps short users
    r = load_records(loo(table(tmp_path, "s.tsv", rows=rows), protocol="temporal"))
    assert r.num_records == 3


def test_max_users_keeps_first_users_and_reindexes_items(tmp_path):
    rows = [("5", "z", "1"), ("5", "y", "2"), ("5", "x", "3"), ("3", "a", "1"), ("3", "y", "2"),
            ("3", "b", "3"), ("9", "q", "1"), ("9", "r", "2"), ("9", "s", "3")]
    r = load_records(loo(table(tmp_path, "m.tsv", rows=rows), max_users=2))
    assert r.raw_record_ids.tolist() == [3, 5]
    assert r.raw_item_ids.tolist() == ["a", "b", "x", "y", "z"] and r.num_items == 5  # q, r, s gone
    assert seqs(r) == [[1, 4, 2], [5, 4, 3]] and r.stats["users"] == 2


# --------------------------------------------------------------------------- temporal


def test_temporal_global_quantiles_and_per_user_order(tmp_path):
    # 20 interactions, times 0..19 shuffled over 3 users: train t < 16, valid 16, 17, test 18, 19
    rng = np.random.default_rng(1)
    t = rng.permutation(20)
    users = ["a"] * 7 + ["b"] * 7 + ["c"] * 6
    rows = [(u, str(100 + int(x) % 7), str(int(x))) for u, x in zip(users, t)]
    r = load_records(loo(table(tmp_path, "tm.tsv", rows=rows), protocol="temporal"))
    assert r.stats["temporal_cut"]["valid_from_time"] == 16 and r.stats["temporal_cut"]["test_from_time"] == 18
    assert r.segment_counts() == {"train": 16, "valid": 2, "test": 2}
    for u in range(3):
        ts = r.times[r.offsets[u]:r.offsets[u + 1]]
        tr, va = r.bounds[u]
        assert np.all(np.diff(ts) > 0)  # time order within the user
        assert np.all(ts[:tr] < 16) and np.all((ts[tr:va] >= 16) & (ts[tr:va] < 18)) and np.all(ts[va:] >= 18)
    # ties at the cut: equal times split by file order; ratio (0.5, 0.25, 0.25)
    rows = [("a", "x", "1"), ("b", "y", "1"), ("a", "y", "1"), ("b", "x", "1")]
    r = load_records(loo(table(tmp_path, "tie.tsv", rows=rows), protocol="temporal", temporal_ratio=(0.5, 0.25, 0.25)))
    assert seqs(r) == [[1, 2], [2, 1]] and r.bounds.tolist() == [[1, 2], [1, 1]]


# --------------------------------------------------------------------------- session (DreamRec replay)


def replay_row(hist: Sequence[int], target: int, pad: int, width: int = 3, len_seq: Optional[int] = None) -> str:
    h = list(hist)[-width:]
    seq = h + [pad] * (width - len(h))
    return f"{' '.join(map(str, seq))}\t{max(len(h), 1) if len_seq is None else len_seq}\t{target}"


def replay_file(path: Path, sessions: Sequence[Sequence[int]], pad: int, header: str = "seq\tlen_seq\tnext",
                gz: bool = True) -> str:
    lines = [header]
    for s in sessions:
        lines += [replay_row(s[:j], s[j], pad) for j in range(len(s))]
    return write(path, lines, gz)


def make_replay(tmp_path: Path, pad: int = 9) -> dict:
    d = tmp_path / "rp"
    d.mkdir(exist_ok=True)
    (d / "data_statis.json").write_text(json.dumps({"seq_size": 3, "item_num": pad}))
    train = [[0, 1, 2, 3, 4], [5, 6, 7]]  # session 0 longer than seq_size: truncated histories
    files = {"train": replay_file(d / "train_data.tsv.gz", train, pad, "seq\tseq_len\ttgt"),
             "valid": replay_file(d / "val_data.tsv.gz", [[8, 0, 1]], pad),
             "test": replay_file(d / "test_data.tsv", [[2, 3, 4, 5], [1, 1, 1]], pad, gz=False)}
    return files


def test_session_replay(tmp_path):
    files = make_replay(tmp_path)
    r = load_records(SourceConfig(files=files, format="replay", protocol="session"))
    assert seqs(r) == [[1, 2, 3, 4, 5], [6, 7, 8], [9, 1, 2], [3, 4, 5, 6], [2, 2, 2]]  # raw + 1
    assert r.bounds.tolist() == [[5, 5], [3, 3], [0, 3], [0, 0], [0, 0]]
    assert r.num_items == 9 and r.raw_item_ids.tolist() == list(range(9)) and r.protocol == "session"
    assert r.raw_record_ids.tolist() == ["train:0", "train:1", "valid:0", "test:0", "test:1"]
    assert source_files(SourceConfig(files=files, format="replay", protocol="session"))[-1].endswith(
        os.path.join("rp", "data_statis.json"))
    # num_items given: no statis read, seq_size from the rows
    (tmp_path / "rp" / "data_statis.json").unlink()
    r2 = load_records(SourceConfig(files=files, format="replay", protocol="session", num_items=9))
    assert seqs(r2) == seqs(r) and len(source_files(SourceConfig(files=files, format="replay", protocol="session",
                                                                  num_items=9))) == 3


def test_session_replay_orphan_start_is_refused_naming_the_file(tmp_path):
    pad = 9
    files = make_replay(tmp_path, pad)
    # a valid session whose first row already has a history [4, 5] (earlier clicks not in the file):
    # that prefix would belong to no split (as train it would leak valid items into training)
    files["valid"] = write(tmp_path / "orphan.tsv", ["seq\tlen_seq\tnext", replay_row([4, 5], 6, pad),
                                                     replay_row([4, 5, 6], 7, pad)])
    with pytest.raises(ValueError, match=r"orphan\.tsv: 1 session\(s\) start with a non-empty history"):
        load_records(SourceConfig(files=files, format="replay", protocol="session"))


def test_session_from_tables(tmp_path):
    files = {s: table(tmp_path, f"{s}.csv", sep=",", cols=("sid", "item", "ts"), rows=rows) for s, rows in {
        "train": [("s2", "b", "2"), ("s1", "a", "1"), ("s2", "a", "1"), ("s1", "c", "2")],
        "valid": [("s3", "c", "5"), ("s3", "a", "4")],
        "test": [("s1", "b", "9")]}.items()}
    r = load_records(SourceConfig(files=files, protocol="session", user="sid", item="item", time="ts"))
    assert seqs(r) == [[1, 3], [1, 2], [1, 3], [2]]
    assert r.raw_record_ids.tolist() == ["s1", "s2", "s3", "s1"]
    assert r.bounds.tolist() == [[2, 2], [2, 2], [0, 2], [0, 0]]


# --------------------------------------------------------------------------- given


def test_given_pairs_npy(tmp_path):
    tr = np.array([[0, 3], [2, 0], [0, 1], [2, 2]], np.int64)
    va = np.array([[0, 0]], np.int32)
    te = np.array([[2, 5], [0, 4]], np.int64)  # user 1 has no interaction at all
    files = {}
    for s, a in {"train": tr, "valid": va, "test": te}.items():
        np.save(tmp_path / f"{s}_list.npy", a)
        files[s] = f"{s}_list.npy"
    r = load_records(SourceConfig(files=files, protocol="given"), str(tmp_path))
    assert r.num_records == 3 and r.num_items == 6 and r.protocol == "given"
    assert seqs(r) == [[4, 2, 1, 5], [], [1, 3, 6]]  # train, valid, test in file order; raw + 1
    assert r.bounds.tolist() == [[2, 3], [0, 0], [2, 2]]
    assert r.raw_record_ids.tolist() == [0, 1, 2] and r.raw_item_ids.tolist() == list(range(6))
    assert load_records(SourceConfig(files=files, protocol="given", num_items=10), str(tmp_path)).num_items == 10


def test_given_tables(tmp_path):
    files = {s: table(tmp_path, f"g_{s}.tsv", rows=rows) for s, rows in {
        "train": [("7", "b", "1"), ("3", "a", "1"), ("7", "a", "0")],
        "valid": [("3", "c", "2")],
        "test": [("7", "c", "5"), ("3", "b", "3")]}.items()}
    r = load_records(SourceConfig(files=files, protocol="given", user="u", item="i"))  # file order
    assert r.raw_record_ids.tolist() == [3, 7] and seqs(r) == [[1, 3, 2], [2, 1, 3]]
    assert r.bounds.tolist() == [[1, 2], [2, 2]]
    r = load_records(SourceConfig(files=files, protocol="given", user="u", item="i", time="t"))
    assert seqs(r) == [[1, 3, 2], [1, 2, 3]]


def test_fsspec_url(tmp_path):
    import fsspec
    data = gzip.compress(("u\ti\tt\n" + "".join("\t".join(x) + "\n" for x in ROWS)).encode())
    with fsspec.open("memory://bucket/src/a.tsv.gz", "wb") as f:
        f.write(data)
    cfg = loo("src/a.tsv.gz")
    assert seqs(load_records(cfg, "memory://bucket")) == seqs(load_records(loo(table(tmp_path, "a.tsv"))))
    assert source_files(cfg, "memory://bucket") == ["memory://bucket/src/a.tsv.gz"]


# --------------------------------------------------------------------------- bad input


def err(cfg: SourceConfig, exc=ValueError, data_dir: Optional[str] = None) -> str:
    with pytest.raises(exc) as e:
        load_records(cfg, data_dir)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_error_missing_column_lists_header(tmp_path):
    p = table(tmp_path, "a.tsv")
    m = err(loo(p, time="timestamp"))
    assert p in m and "line 1" in m and "'timestamp'" in m and "['u', 'i', 't']" in m


def test_error_missing_file(tmp_path):
    m = err(loo("nope/a.tsv"), FileNotFoundError, str(tmp_path))
    assert str(tmp_path / "nope" / "a.tsv") in m


def test_error_non_numeric_time_names_line_and_column(tmp_path):
    rows = list(ROWS)
    rows[6] = ("9", "5", "2024-01-01")  # data row 7 -> line 8 (after the header)
    p = table(tmp_path, "a.csv", sep=",", rows=rows)
    m = err(loo(p))
    assert p in m and "line 8" in m and "'t'" in m and "2024-01-01" in m
    rows[6] = ("9", "5", "nan")
    m = err(loo(table(tmp_path, "b.tsv", rows=rows)))
    assert "line 8" in m and "'t'" in m


def test_error_empty_id_and_field_count(tmp_path):
    rows = list(ROWS)
    rows[3] = ("9", "", "7")  # line 5
    p = table(tmp_path, "a.tsv", rows=rows)
    m = err(loo(p))
    assert p in m and "line 5" in m and "'i'" in m and "empty" in m
    lines = ["u,i,t", "1,a,1", "", "1,b,2,extra", "1,c,3"]  # blank line 3; line 4 has 4 fields
    for name, quoted in (("f.csv", False), ("g.csv", True)):
        if quoted:
            lines[1] = '1,"a",1'
        m = err(loo(write(tmp_path / name, lines)))
        assert name in m and "line 4" in m and "4 field(s)" in m
    m = err(SourceConfig(path=write(tmp_path / "r.dat", ["1::2::3", "1::3::4", "1::4"]), sep="::", header=False,
                         user=0, item=1, time=2))
    assert "r.dat" in m and "line 3" in m and "2 field(s)" in m


def test_error_duplicate_position(tmp_path):
    rows = list(ROWS)
    rows[8] = ("10", "300", "4")  # user 10 already has position 4 at line 2; this is line 10
    p = table(tmp_path, "a.tsv", rows=rows)
    m = err(loo(p, time_is_position=True))
    assert p in m and "line 10" in m and "'t'" in m and "line 2" in m
    load_records(loo(p))  # a real timestamp tie is fine (file order)


def test_error_empty_after_kcore(tmp_path):
    m = err(loo(table(tmp_path, "a.tsv"), min_user_count=5, min_item_count=2))
    assert "min_user_count=5" in m and "min_item_count=2" in m and "0 users" in m and "10 interactions" in m


def test_error_replay_rows(tmp_path):
    pad = 9
    files = make_replay(tmp_path, pad)
    good = ["seq\tlen_seq\tnext", replay_row([], 1, pad), replay_row([1], 2, pad)]
    cases = {  # planted line 3 each time
        "fields": (good[:2] + [replay_row([1], 2, pad) + "\textra"], "", "4 field(s)"),  # no column
        "width": (good[:2] + ["1 9\t1\t2"], "'seq'", "seq_size=3"),
        "len": (good[:2] + [replay_row([1], 2, pad, len_seq=7)], "'len_seq'", "1..3"),
        "len_mismatch": (good[:2] + [replay_row([1], 2, pad, len_seq=2)], "'len_seq'", "real items"),
        "pad_middle": (good[:2] + [f"1 {pad} 3\t2\t2"], "'seq'", "right-padded"),
        "target": (good[:2] + [replay_row([1], pad, pad)], "'next'", "outside"),
        "not_int": (good[:2] + ["1 x 9\t1\t2"], "'seq'", "malformed"),
    }
    for name, (lines, col, what) in cases.items():
        files["test"] = write(tmp_path / f"{name}.tsv", lines)
        m = err(SourceConfig(files=files, format="replay", protocol="session"))
        assert f"{name}.tsv" in m and "line 3" in m and col in m and what in m, (name, m)
    files["test"] = write(tmp_path / "nocol.tsv", ["seq\tlen\tnext", replay_row([], 1, pad)])
    m = err(SourceConfig(files=files, format="replay", protocol="session"))
    assert "nocol.tsv" in m and "len_seq / seq_len" in m and "line 1" in m
    os.unlink(files["train"])
    m = err(SourceConfig(files=files, format="replay", protocol="session"), FileNotFoundError)
    assert "train_data.tsv.gz" in m


def test_error_pairs_shape_and_dtype(tmp_path):
    files = {s: str(tmp_path / f"{s}.npy") for s in ("train", "valid", "test")}
    for s in files:
        np.save(files[s], np.zeros((2, 2), np.int64))
    for bad, what in ((np.zeros((3, 3), np.int64), "(3, 3)"), (np.zeros((2, 2), np.float32), "float32"),
                      (np.array([[0, 1], [0, -4]]), "row 2")):
        np.save(files["valid"], bad)
        m = err(SourceConfig(files=files, protocol="given"))
        assert files["valid"] in m and what in m, m


@pytest.mark.parametrize("kw, key", [
    (dict(path="a.tsv", protocol="nope"), "protocol"),
    (dict(path="a.tsv", format="parquet"), "format"),
    (dict(path="a.tsv", files={"train": "a", "valid": "b", "test": "c"}), "path"),
    (dict(path="a.tsv", protocol="session"), "files"),
    (dict(files={"train": "a.tsv", "test": "b.tsv"}, protocol="given"), "files"),
    (dict(path="a.parquet"), "format"),
    (dict(path="a.json", format="table"), "sep"),
    (dict(path="a.tsv", format="replay"), "format"),
    (dict(files={"train": "a.npy", "valid": "b.npy", "test": "c.npy"}, protocol="session"), "format"),
    (dict(path="a.tsv", protocol="temporal", temporal_ratio=(0.8, 0.3, 0.1)), "temporal_ratio"),
    (dict(path="a.tsv", protocol="temporal", time="t", time_is_position=True), "time_is_position"),
    (dict(path="a.tsv", time_is_position=True), "time_is_position"),
    (dict(path="a.tsv", min_user_count=-1), "min_user_count"),
    (dict(path="a.tsv", max_users=0), "max_users"),
    (dict(path="a.tsv", num_items=5), "num_items"),
    (dict(path="a.tsv", header=False, user="u"), "user"),
    (dict(path="a.tsv", user="x", item="x"), "user"),
    (dict(files={"train": "a.npy", "valid": "b.npy", "test": "c.npy"}, protocol="given", min_item_count=5),
     "min_user_count"),
    (dict(files={"train": "a.npy", "valid": "b.npy", "test": "c.npy"}, protocol="given", time="t"), "time"),
])
def test_validate_rejects_bad_combinations(kw, key):
    with pytest.raises(ValueError, match=rf"^data\.source\.{key}: [^\n]+$"):
        SourceConfig(**kw).validate()


def test_from_dict():
    cfg = SourceConfig.from_dict({"path": "x.tsv", "protocol": "temporal", "temporal_ratio": [0.6, 0.2, 0.2]})
    assert cfg.temporal_ratio == (0.6, 0.2, 0.2)
    with pytest.raises(ValueError, match="unknown key"):
        SourceConfig.from_dict({"path": "x.tsv", "min_users": 3})


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_DIR", "/some/where")
    assert default_data_dir() == "/some/where"
    monkeypatch.delenv("RECSYS_DATA_DIR")
    assert default_data_dir() == str((Path(__file__).resolve().parent.parent.parent / "shared" / "datasets").resolve())


# --------------------------------------------------------------------------- staged data


def staged() -> str:
    d = os.environ.get("RECSYS_DATA_DIR") or "/work/shared/datasets"
    if not os.path.isdir(d):
        pytest.skip(f"staged datasets not found at {d}")
    return d


def diffurec(name: str) -> SourceConfig:
    return SourceConfig(path=f"{name}/raw/diffurec/interactions.tsv.gz", user="raw_user_id", item="raw_item_id",
                        time="pos", time_is_position=True, min_user_count=5, min_item_count=5)


@pytest.mark.parametrize("name, users, items", [("ml-1m", 6040, 3416), ("amazon-beauty", 22363, 12101)])
def test_staged_diffurec(name, users, items):
    r = load_records(diffurec(name), staged())
    assert (r.num_records, r.num_items) == (users, items)
    assert r.segment_counts()["valid"] == r.segment_counts()["test"] == users
    assert r.raw_item_ids.dtype.kind == "i" and np.all(np.diff(r.raw_record_ids) > 0)


def test_staged_zhihu():
    d = "zhihu/raw/dreamrec"
    cfg = SourceConfig(files={"train": f"{d}/train_data.tsv.gz", "valid": f"{d}/val_data.tsv.gz",
                              "test": f"{d}/test_data.tsv.gz"}, format="replay", protocol="session")
    r = load_records(cfg, staged())
    assert r.num_items == 4838
    assert {s: r.stats["splits"][s]["sessions"] for s in ("train", "valid", "test")} == {
        "train": 9371, "valid": 1171, "test": 1172}
    assert r.segment_counts() == {"train": 61641, "valid": 8160, "test": 7911}
    # kuairec lacks its train split: a FileNotFoundError naming it
    k = "kuairec/raw/dreamrec"
    cfg = SourceConfig(files={"train": f"{k}/train_data.tsv.gz", "valid": f"{k}/val_data.tsv.gz",
                              "test": f"{k}/test_data.tsv.gz"}, format="replay", protocol="session")
    with pytest.raises(FileNotFoundError, match="kuairec/raw/dreamrec/train_data.tsv.gz"):
        load_records(cfg, staged())


def test_staged_diffrec_clean():
    d = staged()
    src = "ml-1m/raw/diffrec/ml-1m_clean"
    files = {s: f"{src}/{s}_list.npy" for s in ("train", "valid", "test")}
    r = load_records(SourceConfig(files=files, protocol="given"), d)
    n = {s: np.load(os.path.join(d, f), allow_pickle=False).shape[0] for s, f in files.items()}
    assert r.segment_counts() == n == {"train": 403277, "valid": 110722, "test": 57532}
    assert (r.num_records, r.num_items) == (5949, 2810)
