"""Raw interaction sources -> filtered, re-indexed per-user item sequences.

Supported datasets (DiffuRec leave-one-out conversion, see
``<data dir>/README.md``): ``ml-1m`` and ``amazon-beauty``. Each is a gzip TSV
with header ``user, item, pos, split, raw_user_id, raw_item_id``; ``pos`` is
the 0-based chronological position in the user's sequence. The ``split``
column and the pre-computed ``user``/``item`` indices are ignored: sequences
are rebuilt from ``(raw_user_id, pos)`` order and ``raw_item_id``.

Processing (:func:`load_sequences`):

1. order every user's interactions by ``pos``;
2. iterated k-core filter: drop the interactions of items with fewer than
   ``min_item_count`` interactions, then of users with fewer than
   ``min_user_count``, and repeat until nothing changes (the result is the
   unique maximal sub-dataset meeting both thresholds);
3. optionally keep only the first ``max_users`` users (by ascending raw user
   id) *after* the filter;
4. re-index: users -> ``0..U-1`` by ascending raw user id; items that occur in
   the kept sequences -> ``1..N`` by ascending raw item id (numeric order when
   all raw ids are integers, else string order). ``0`` is the padding id.

Session-split datasets (DreamRec "replay" format, see :func:`load_session_splits`):
``zhihu``, ``kuairec``, ``yoochoose``. Each is a folder with
``{train,val,test}_data.tsv.gz`` and ``data_statis.json``; the given 8:1:1
session split is kept as is (no re-splitting, no filter). Only ``zhihu`` has
all three files in the staged data; ``kuairec`` and ``yoochoose`` lack
``train_data.tsv.gz`` and raise :class:`FileNotFoundError` naming it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .schema import LEAVE_ONE_OUT, SESSION_SPLIT, SPLITS

# leave-one-out datasets: the DiffuRec interactions TSV (relative to the data dir)
DATASETS: Dict[str, str] = {
    "ml-1m": "ml-1m/raw/diffurec/interactions.tsv.gz",
    "amazon-beauty": "amazon-beauty/raw/diffurec/interactions.tsv.gz",
}
# session-split datasets: the DreamRec "replay" folder (relative to the data dir)
SESSION_DATASETS: Dict[str, str] = {
    "zhihu": "zhihu/raw/dreamrec",
    "kuairec": "kuairec/raw/dreamrec",
    "yoochoose": "yoochoose/raw/dreamrec",
}
DATA_DIR_ENV = "RECSYS_DATA_DIR"
_COLUMNS = ("pos", "raw_user_id", "raw_item_id")


def repo_root() -> Path:
    """Root of the recsys-dist checkout (the parent of the ``shards`` package)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """``$RECSYS_DATA_DIR`` if set, else ``<repo root>/../shared/datasets``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    return str((repo_root().parent / "shared" / "datasets").resolve())


def dataset_names() -> List[str]:
    """Every dataset :func:`shards.build_shards` knows, sorted."""
    return sorted({**DATASETS, **SESSION_DATASETS})


def dataset_protocol(dataset: str) -> str:
    """``"leave_one_out"`` (DiffuRec TSV) or ``"session_split"`` (DreamRec replay files)."""
    if dataset in DATASETS:
        return LEAVE_ONE_OUT
    if dataset in SESSION_DATASETS:
        return SESSION_SPLIT
    raise ValueError(f"unknown dataset {dataset!r}; known: {dataset_names()}")


def dataset_path(dataset: str, data_dir: Optional[str] = None) -> str:
    """Source of ``dataset`` under ``data_dir`` (default :func:`default_data_dir`).

    The interactions file of a leave-one-out dataset, the folder holding the
    ``*_data.tsv.gz`` files of a session-split one.
    """
    rel = DATASETS.get(dataset, SESSION_DATASETS.get(dataset))
    if rel is None:
        raise ValueError(f"unknown dataset {dataset!r}; known: {dataset_names()}")
    return os.path.join(data_dir or default_data_dir(), rel)


@dataclass
class SequenceData:
    """Filtered, re-indexed per-user sequences in CSR layout.

    Attributes:
        items: int32 array (total_interactions,), item ids in ``1..num_items``;
            user ``u``'s chronological sequence is ``items[offsets[u]:offsets[u+1]]``.
        offsets: int64 array (num_users + 1,).
        raw_user_ids: array (num_users,), raw id of each dense user index.
        raw_item_ids: array (num_items,), raw id of item ``i`` at position ``i - 1``.
        stats: counts before/after filtering (JSON-serialisable).
    """

    items: np.ndarray
    offsets: np.ndarray
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def num_items(self) -> int:
        return int(self.raw_item_ids.size)

    def sequence(self, user: int) -> np.ndarray:
        """Chronological item ids of dense user ``user``, shape (n,)."""
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def lengths(self) -> np.ndarray:
        """Sequence length of every user, int64 (num_users,)."""
        return np.diff(self.offsets)


def _header_indices(path: str) -> Tuple[int, ...]:
    with gzip.open(path, "rt", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    try:
        return tuple(header.index(c) for c in _COLUMNS)
    except ValueError:
        raise ValueError(f"{path}: header {header} lacks one of the columns {list(_COLUMNS)}") from None


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = _header_indices(path)
    try:  # fast path: integer raw ids
        with gzip.open(path, "rt", newline="") as f:
            arr = np.loadtxt(f, delimiter="\t", skiprows=1, usecols=idx, dtype=np.int64, ndmin=2)
        pos, users, items = arr[:, 0], arr[:, 1], arr[:, 2]
    except ValueError:  # raw ids are not all integers: keep them as strings
        pos_l: List[int] = []
        users_l: List[str] = []
        items_l: List[str] = []
        with gzip.open(path, "rt", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            next(reader)
            for lineno, row in enumerate(reader, start=2):
                try:
                    pos_l.append(int(row[idx[0]]))
                    users_l.append(row[idx[1]])
                    items_l.append(row[idx[2]])
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: malformed row {row!r} ({e})") from None
        pos = np.asarray(pos_l, dtype=np.int64)
        users = np.asarray(users_l)
        items = np.asarray(items_l)
    for a in (pos, users, items):
        a.setflags(write=False)
    return pos, users, items


def load_interactions(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``(pos, raw_user_id, raw_item_id)`` columns of an interactions TSV(.gz).

    Returns three read-only arrays of shape (num_interactions,): ``pos`` int64,
    raw user / item ids as int64 (or str when not all are integers). Results
    are cached in-process per (path, mtime, size).
    """
    st = os.stat(path)
    return _load_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def kcore_filter(
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    min_item_count: int,
    min_user_count: int,
) -> Tuple[np.ndarray, int]:
    """Iterated k-core filter over interactions.

    Args:
        user_codes, item_codes: int64 arrays (num_interactions,) of dense codes.
        min_item_count: keep items with at least this many interactions.
        min_user_count: keep users with at least this many interactions.

    Returns:
        ``(keep, iterations)``: bool mask (num_interactions,) and the number of
        passes until stable.
    """
    keep = np.ones(user_codes.shape[0], dtype=bool)
    n_items = int(item_codes.max()) + 1 if item_codes.size else 0
    n_users = int(user_codes.max()) + 1 if user_codes.size else 0
    iterations = 0
    while True:
        iterations += 1
        before = int(keep.sum())
        ic = np.bincount(item_codes[keep], minlength=n_items)
        keep &= ic[item_codes] >= min_item_count
        uc = np.bincount(user_codes[keep], minlength=n_users)
        keep &= uc[user_codes] >= min_user_count
        if int(keep.sum()) == before:
            return keep, iterations


def load_sequences(
    dataset: str,
    data_dir: Optional[str] = None,
    min_item_count: int = 5,
    min_user_count: int = 5,
    max_users: Optional[int] = None,
) -> SequenceData:
    """Load ``dataset`` and return filtered, re-indexed chronological sequences.

    See the module docstring for the exact rules. ``max_users`` keeps the first
    N users (ascending raw user id) after the k-core filter; items are then
    re-indexed over the kept users only, so ``num_items`` of a slice is the
    number of distinct items in it.
    """
    path = dataset_path(dataset, data_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found (set ${DATA_DIR_ENV} or pass data_dir; default {default_data_dir()})"
        )
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
    pos, raw_users, raw_items = load_interactions(path)
    uniq_users, ucode = np.unique(raw_users, return_inverse=True)
    uniq_items, icode = np.unique(raw_items, return_inverse=True)
    ucode = ucode.astype(np.int64).ravel()
    icode = icode.astype(np.int64).ravel()

    order = np.lexsort((pos, ucode))  # by user, then chronological position
    ucode, icode, pos_s = ucode[order], icode[order], pos[order]
    dup = (ucode[1:] == ucode[:-1]) & (pos_s[1:] == pos_s[:-1])
    if dup.any():
        k = int(np.flatnonzero(dup)[0])
        raise ValueError(f"{path}: user {uniq_users[ucode[k]]!r} has two interactions at pos {pos_s[k]}")

    keep, iterations = kcore_filter(ucode, icode, min_item_count, min_user_count)
    ucode, icode = ucode[keep], icode[keep]
    users_after = int(np.unique(ucode).size)
    items_after = int(np.unique(icode).size)
    inter_after = int(ucode.size)

    kept_users = np.unique(ucode)  # ascending code == ascending raw id
    if max_users is not None and kept_users.size > max_users:
        sel = np.isin(ucode, kept_users[:max_users])
        ucode, icode = ucode[sel], icode[sel]
        kept_users = kept_users[:max_users]

    # users -> 0..U-1 ; items -> 1..N (ascending raw id)
    user_new = np.searchsorted(kept_users, ucode)
    kept_items = np.unique(icode)
    item_new = (np.searchsorted(kept_items, icode) + 1).astype(np.int32)
    counts = np.bincount(user_new, minlength=kept_users.size)
    offsets = np.zeros(kept_users.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    stats: Dict[str, object] = {
        "min_item_count": int(min_item_count),
        "min_user_count": int(min_user_count),
        "iterations": iterations,
        "raw_users": int(uniq_users.size),
        "raw_items": int(uniq_items.size),
        "raw_interactions": int(pos.size),
        "filtered_users": users_after,
        "filtered_items": items_after,
        "filtered_interactions": inter_after,
        "max_users": max_users,
        "users": int(kept_users.size),
        "items": int(kept_items.size),
        "interactions": int(item_new.size),
    }
    return SequenceData(
        items=item_new,
        offsets=offsets,
        raw_user_ids=uniq_users[kept_users],
        raw_item_ids=uniq_items[kept_items],
        stats=stats,
    )


# --------------------------------------------------------------------------- session-split (DreamRec) data

SESSION_STATIS_FILE = "data_statis.json"
_SEQ_COLUMN = "seq"
_LEN_COLUMNS = ("len_seq", "seq_len")  # DreamRec's name, baiyimeng's re-serialisation
_TARGET_COLUMNS = ("next", "tgt")


def session_split_file(split: str) -> str:
    """Base name of the replay file of ``split``: ``f"{split}_data.tsv.gz"``."""
    return f"{split}_data.tsv.gz"


@dataclass
class SessionSplit:
    """One split of a session-split dataset: one row per (history, target), in file order.

    Attributes:
        history_items: int32 (total,), item ids ``1..num_items``; row ``r``'s history,
            oldest first, unpadded and possibly empty, is
            ``history_items[history_offsets[r]:history_offsets[r + 1]]``.
        history_offsets: int64 (rows + 1,).
        targets: int32 (rows,), item ids ``1..num_items``.
        sessions: int64 (rows,), 0-based session index within the split (file order).
            A session starts at a row with an empty history, or at a row whose history
            is not the previous row's history plus its target (an "orphan" start,
            counted in the stats; none in the staged data).
        positions: int64 (rows,), 1-based position of the target in its session
            (for an orphan start: its history length + 1, a lower bound when the
            history was truncated at ``seq_size``).
    """

    history_items: np.ndarray
    history_offsets: np.ndarray
    targets: np.ndarray
    sessions: np.ndarray
    positions: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.targets.size)

    def history(self, row: int) -> np.ndarray:
        """Unpadded history of ``row``, oldest first, shape (L,), L may be 0."""
        return self.history_items[self.history_offsets[row]:self.history_offsets[row + 1]]

    def lengths(self) -> np.ndarray:
        """History length of every row, int64 (rows,)."""
        return np.diff(self.history_offsets)

    def session_starts(self) -> np.ndarray:
        """bool (rows,): the row is the first row of its session."""
        s = np.ones(self.targets.size, dtype=bool)
        s[1:] = self.sessions[1:] != self.sessions[:-1]
        return s


@dataclass
class SessionData:
    """The three splits of a session-split dataset (ids ``1..num_items``, 0 = padding)."""

    splits: Dict[str, SessionSplit]
    num_items: int
    seq_size: int
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        """Rows of the largest split: user (= row) indices are ``0..num_users-1`` in every split."""
        return max((s.num_rows for s in self.splits.values()), default=0)


def _column(header: List[str], names: Tuple[str, ...], path: str) -> int:
    for n in names:
        if n in header:
            return header.index(n)
    raise ValueError(f"{path}: header {header} lacks a {' / '.join(repr(n) for n in names)} column")


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        v = float(s)  # the pickled originals store `next` as float
        if not v.is_integer():
            raise ValueError(f"{s!r} is not an integer") from None
        return int(v)


def read_replay_tsv(
    path: str, item_num: int, seq_size: int, max_rows: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and check one DreamRec replay TSV(.gz) (header ``seq, len_seq|seq_len, next|tgt``).

    Args:
        path: the file.
        item_num: items are ``0..item_num-1``; ``item_num`` is the padding value.
        seq_size: number of ids in every ``seq``.
        max_rows: read only the first N rows.

    Returns:
        ``(seq, count, target)``, raw 0-based ids: ``seq`` int64 (rows, seq_size) as
        stored (right-padded), ``count`` int64 (rows,) the number of real (non-pad)
        history items (0 for an empty history, whatever ``len_seq`` says), ``target``
        int64 (rows,).

    Raises:
        ValueError: naming ``path`` and the line, for a malformed row, an id out of
            range, a pad before a real item, or a ``len_seq`` that is neither the
            real-item count nor 1 for an empty history.
    """
    opener = gzip.open if path.endswith(".gz") else open
    seqs: List[int] = []
    targets: List[int] = []
    lens: List[int] = []
    with opener(path, "rt", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        si = _column(header, (_SEQ_COLUMN,), path)
        li = _column(header, _LEN_COLUMNS, path)
        ti = _column(header, _TARGET_COLUMNS, path)
        for lineno, line in enumerate(f, start=2):
            if max_rows is not None and len(targets) >= max_rows:
                break
            row = line.rstrip("\r\n").split("\t")
            try:
                if len(row) != len(header):
                    raise ValueError(f"{len(row)} column(s), the header has {len(header)}")
                s = [_int(x) for x in row[si].split()]
                if len(s) != seq_size:
                    raise ValueError(f"seq has {len(s)} ids, expected seq_size={seq_size}")
                lens.append(_int(row[li]))
                targets.append(_int(row[ti]))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed row {line.rstrip()!r} ({e})") from None
            seqs.extend(s)
    seq = np.asarray(seqs, dtype=np.int64).reshape(-1, seq_size)
    tgt = np.asarray(targets, dtype=np.int64)
    len_seq = np.asarray(lens, dtype=np.int64)

    def fail(bad: np.ndarray, what: str) -> None:
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}:{r + 2}: {what} (seq {seq[r].tolist()}, len_seq {len_seq[r]}, target {tgt[r]})")

    bad = ((seq < 0) | (seq > item_num)).any(1)
    if bad.any():
        fail(bad, f"seq holds an id outside [0, {item_num}] (pad = item_num = {item_num})")
    bad = (tgt < 0) | (tgt >= item_num)
    if bad.any():
        fail(bad, f"target outside [0, {item_num - 1}]")
    real = seq != item_num
    count = real.sum(1).astype(np.int64)
    bad = (real != (np.arange(seq_size)[None, :] < count[:, None])).any(1)
    if bad.any():
        fail(bad, "seq is not right-padded (a real item follows a pad)")
    bad = len_seq != np.maximum(count, 1)
    if bad.any():
        fail(bad, "len_seq is neither the number of real items nor 1 for an empty history")
    return seq, count, tgt


def _reconstruct_sessions(seq: np.ndarray, count: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(sessions, positions)`` of replay rows (see :class:`SessionSplit`)."""
    n, width = seq.shape
    start = np.ones(n, dtype=bool)
    if n > 1:
        # what row r's seq must be if it continues row r-1: r-1's history + its target, last `width`
        exp = seq[:-1].copy()
        pc = count[:-1]
        full = pc >= width
        exp[full, :-1] = seq[:-1][full, 1:]
        exp[np.arange(n - 1), np.where(full, width - 1, pc)] = target[:-1]
        start[1:] = ~((exp == seq[1:]).all(1) & (count[1:] > 0))
    sessions = np.cumsum(start, dtype=np.int64) - 1
    first = np.flatnonzero(start)
    positions = np.arange(n, dtype=np.int64) - first[sessions] + 1 + count[first][sessions]
    return sessions, positions


def load_session_splits(
    dataset: str,
    data_dir: Optional[str] = None,
    max_rows: Optional[int] = None,
) -> SessionData:
    """Load the given train/val/test split of a DreamRec-format dataset.

    Item ids become ``raw + 1`` (``1..item_num``; 0 = padding), histories are the
    real items of ``seq`` (oldest first, unpadded; empty for the first row of a
    session), targets ``next + 1``. No filter, no re-splitting. ``max_rows`` keeps
    the first N rows (file order) of every split; ``num_items`` stays ``item_num``.

    Raises:
        FileNotFoundError: naming every missing file (``data_statis.json`` or a
            ``<split>_data.tsv.gz``), e.g. the train split of kuairec / yoochoose.
        ValueError: unknown or not a session-split dataset, malformed rows.
    """
    if dataset_protocol(dataset) != SESSION_SPLIT:
        raise ValueError(f"{dataset!r} is not a session-split dataset (those are {sorted(SESSION_DATASETS)})")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    root = dataset_path(dataset, data_dir)
    statis_path = os.path.join(root, SESSION_STATIS_FILE)
    paths = {s: os.path.join(root, session_split_file(s)) for s in SPLITS}
    missing = [p for p in [statis_path, *paths.values()] if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"session-split dataset {dataset!r}: missing file(s) {', '.join(missing)}; the build keeps the given "
            f"train/val/test split and never re-splits, so it needs {', '.join(session_split_file(s) for s in SPLITS)} "
            f"and {SESSION_STATIS_FILE} in {root} (data dir: pass data_dir or set ${DATA_DIR_ENV})"
        )
    with open(statis_path, "rb") as f:
        statis = json.loads(f.read().decode("utf-8"))
    try:
        item_num, seq_size = int(statis["item_num"]), int(statis["seq_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{statis_path}: expected {{\"item_num\": int, \"seq_size\": int}}, got {statis!r}") from None
    if item_num < 1 or seq_size < 1:
        raise ValueError(f"{statis_path}: item_num and seq_size must be >= 1, got {statis!r}")

    splits: Dict[str, SessionSplit] = {}
    stats: Dict[str, object] = {"item_num": item_num, "seq_size": seq_size, "max_rows": max_rows, "splits": {}}
    for split, path in paths.items():
        seq, count, target = read_replay_tsv(path, item_num, seq_size, max_rows)
        sessions, positions = _reconstruct_sessions(seq, count, target)
        offsets = np.zeros(count.size + 1, dtype=np.int64)
        np.cumsum(count, out=offsets[1:])
        sp = SessionSplit(
            history_items=(seq[seq != item_num] + 1).astype(np.int32),  # row-major: oldest first
            history_offsets=offsets,
            targets=(target + 1).astype(np.int32),
            sessions=sessions,
            positions=positions,
        )
        starts = sp.session_starts()
        splits[split] = sp
        stats["splits"][split] = {
            "rows": sp.num_rows,
            "sessions": int(sessions[-1]) + 1 if sessions.size else 0,
            "empty_history_rows": int((count == 0).sum()),
            "orphan_session_starts": int((starts & (count > 0)).sum()),
            "truncated_history_rows": int((count >= seq_size).sum()),
            "max_session_rows": int(np.bincount(sessions).max()) if sessions.size else 0,
            "distinct_targets": int(np.unique(target).size),
        }
    return SessionData(splits=splits, num_items=item_num, seq_size=seq_size, stats=stats)


def session_item_counts(split: SessionSplit, num_items: int) -> np.ndarray:
    """int64 (num_items + 1,): how often each item is interacted with in ``split`` (row 0 = pad = 0).

    Every interaction of a session is the target of exactly one row (its first
    interaction is the target of the empty-history row), and each history holds only earlier targets
    of the same session, so this counts every target once plus the history items of
    orphan session starts (rows whose earlier interactions are not in the file).
    Counting every history occurrence too would weigh an item by how many later
    rows of its session still show it (up to ``seq_size`` times).
    """
    counts = np.bincount(split.targets, minlength=num_items + 1).astype(np.int64)
    orphan = np.flatnonzero(split.session_starts() & (split.lengths() > 0))
    for r in orphan.tolist():
        counts += np.bincount(split.history(r), minlength=num_items + 1)
    counts[0] = 0
    return counts
