"""DreamRec ``replay`` sources: one file of rows ``seq, len_seq|seq_len, next|tgt`` per split -> ``session`` Records.

A row is a (right-padded, last ``seq_size``) history and its next item; ``item_num`` (the pad
id) and ``seq_size`` come from ``data_statis.json`` (or ``num_items``). :func:`read_replay`
reads and checks one file; :func:`reconstruct_sessions` chains rows into sessions; a record
is one session's targets in file order (items raw + 1, ``num_items`` = item_num), train
sessions first, then valid, then test. A session starting with a non-empty history (rows
cut from an earlier session) is refused. Errors name the file, the line and the column.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from .indexing import csr_offsets
from .rawio import header_columns, input_error, open_bytes, open_text, text_rows
from .records import SEGMENTS, Records

if TYPE_CHECKING:
    from .source import SourceConfig

REPLAY_SEQ = ("seq",)
REPLAY_LEN = ("len_seq", "seq_len")  # DreamRec's name, baiyimeng's re-serialisation
REPLAY_TARGET = ("next", "tgt")


def _replay_statis(url: str) -> Tuple[int, int]:
    """``(item_num, seq_size)`` of a DreamRec ``data_statis.json``."""
    with open_bytes(url) as f:
        raw = f.read()
    try:
        st = json.loads(raw.decode("utf-8"))
        item_num, seq_size = int(st["item_num"]), int(st["seq_size"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise input_error(url, None, None,
                          f"expected {{\"item_num\": int, \"seq_size\": int}}, got {raw[:200]!r}") from None
    if item_num < 1 or seq_size < 1:
        raise input_error(url, None, None, f"item_num and seq_size must be >= 1, got {item_num}, {seq_size}")
    return item_num, seq_size


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        v = float(s)  # the pickled originals store `next` as float
        if not v.is_integer():
            raise ValueError(f"{s!r} is not an integer") from None
        return int(v)


def read_replay(url: str, item_num: int, seq_size: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and check one DreamRec replay file (header ``seq, len_seq|seq_len, next|tgt``).

    ``item_num`` is the pad id (items ``0..item_num-1``); ``seq_size`` the ids per ``seq``
    (None: that of the first row, the same for all). Returns raw 0-based ``(seq, count,
    target)``: int64 (rows, seq_size) as stored (right-padded), int64 (rows,) the real
    history items (0 for an empty history, whatever ``len_seq`` says), int64 (rows,).
    """
    seqs: List[List[int]] = []
    lens: List[int] = []
    targets: List[int] = []
    lines: List[int] = []
    with open_text(url) as f:
        it = text_rows(f, "\t")
        first = next(it, None)
        if first is None:
            raise input_error(url, None, None, "empty file (no header)")
        head = [h.strip() for h in first[1]]
        idx, names = header_columns(url, first[0], head, {"seq": REPLAY_SEQ, "len": REPLAY_LEN,
                                                          "target": REPLAY_TARGET})
        (si, li, ti), (sn, ln, tn) = idx.values(), names.values()
        for line, row in it:
            col = None
            try:
                if len(row) != len(head):
                    raise ValueError(f"{len(row)} field(s), the header has {len(head)}")
                col = sn
                s = [_int(x) for x in row[si].split()]
                if seq_size is None:
                    seq_size = len(s)
                if len(s) != seq_size:
                    raise ValueError(f"{len(s)} ids, expected seq_size={seq_size}")
                col = ln
                lens.append(_int(row[li]))
                col = tn
                targets.append(_int(row[ti]))
            except ValueError as e:
                del lens[len(seqs):], targets[len(seqs):]
                raise input_error(url, line, col, f"malformed replay row ({e})") from None
            seqs.append(s)
            lines.append(line)
    width = seq_size or 0
    seq = np.asarray(seqs, dtype=np.int64).reshape(-1, width)
    tgt = np.asarray(targets, dtype=np.int64)
    len_seq = np.asarray(lens, dtype=np.int64)

    def fail(bad: np.ndarray, col: str, what: str) -> None:
        r = int(np.flatnonzero(bad)[0])
        raise input_error(url, lines[r], col, f"{what} (seq {seq[r].tolist()}, {ln} {len_seq[r]}, {tn} {tgt[r]})")

    bad = ((seq < 0) | (seq > item_num)).any(1)
    if bad.any():
        fail(bad, sn, f"id outside [0, {item_num}] (pad = item_num = {item_num})")
    bad = (tgt < 0) | (tgt >= item_num)
    if bad.any():
        fail(bad, tn, f"id outside [0, {item_num - 1}]")
    real = seq != item_num
    count = real.sum(1).astype(np.int64)
    bad = (real != (np.arange(width)[None, :] < count[:, None])).any(1)
    if bad.any():
        fail(bad, sn, f"not right-padded: a real item follows the pad {item_num}")
    bad = (len_seq < 1) | (len_seq > width)
    if bad.any():
        fail(bad, ln, f"out of range 1..{width}")
    bad = len_seq != np.maximum(count, 1)
    if bad.any():
        fail(bad, ln, "neither the number of real items nor 1 for an empty history")
    return seq, count, tgt


def reconstruct_sessions(seq: np.ndarray, count: np.ndarray, target: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(sessions, positions)`` of replay rows, int64 (rows,) each.

    A row continues the previous row's session when its ``seq`` is the previous history
    plus the previous target (last ``seq_size``) and is not empty; else it starts a session
    (an "orphan" start when its history is not empty). ``sessions``: 0-based index in file
    order; ``positions``: 1-based position of the target in its session (for an orphan:
    history length + 1, a lower bound when the history was truncated)."""
    n, width = seq.shape
    start = np.ones(n, dtype=bool)
    if n > 1:
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


def _replay_sessions(seq: np.ndarray, count: np.ndarray, target: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, int]]:
    """One split's sessions: ``(offsets (S+1,), items (n,) raw + 1, prefix (S,), stats)``.

    A session's items are its rows' targets in file order, preceded, for an orphan start, by
    that row's history (earlier interactions that are not in the file); ``prefix`` is the
    length of that history (0 for a session that starts with an empty history)."""
    sessions, _ = reconstruct_sessions(seq, count, target)
    n = target.size
    start = np.ones(n, dtype=bool)
    start[1:] = sessions[1:] != sessions[:-1]
    pre = np.where(start, count, 0)  # history items emitted before the row's target
    emit = pre + 1
    end = np.cumsum(emit)
    out = np.empty(int(end[-1]) if n else 0, np.int64)
    out[end - 1] = target
    orphan = np.flatnonzero(pre > 0)
    if orphan.size:
        r = np.repeat(orphan, pre[orphan])
        j = np.arange(r.size) - np.repeat(np.cumsum(pre[orphan]) - pre[orphan], pre[orphan])
        out[np.repeat(end[orphan] - 1 - pre[orphan], pre[orphan]) + j] = seq[r, j]
    S = int(sessions[-1]) + 1 if n else 0
    off = csr_offsets(sessions, S, emit)
    stats = {"rows": int(n), "sessions": S, "orphan_session_starts": int(orphan.size),
             "truncated_history_rows": int((count >= seq.shape[1]).sum()) if n else 0}
    return off, (out + 1).astype(np.int32), pre[start].astype(np.int64), stats


def load_replay(cfg: "SourceConfig", urls: Dict[str, str], statis: Optional[str]) -> Records:
    """``session`` over DreamRec replay files: train sessions, then valid, then test (file order).

    ``statis``: the ``data_statis.json`` URL, None when ``cfg.num_items`` gives item_num."""
    item_num, seq_size = (cfg.num_items, None) if statis is None else _replay_statis(statis)
    if cfg.num_items is not None and cfg.num_items != item_num:
        raise ValueError(f"data.source.num_items: {cfg.num_items} differs from item_num {item_num} in {statis}")
    offs, items, bounds, raw, stats = [], [], [], [], {}
    base = 0
    for seg, s in enumerate(SEGMENTS):
        seq, count, target = read_replay(urls[s], int(item_num), seq_size)  # type: ignore[arg-type]
        off, it, pre, st = _replay_sessions(seq, count, target)
        if st["orphan_session_starts"]:
            raise ValueError(f"{urls[s]}: {st['orphan_session_starts']} session(s) start with a non-empty history "
                             "(rows cut from an earlier session): their prefix belongs to no split, refused")
        lens = np.diff(off)
        b = {0: np.stack([lens, lens], 1), 1: np.stack([pre, lens], 1), 2: np.stack([pre, pre], 1)}[seg]
        offs.append(off[:-1] + base)
        base += int(off[-1])
        items.append(it)
        bounds.append(b)
        raw.extend(f"{s}:{k}" for k in range(lens.size))
        stats[s] = st
    off = np.concatenate(offs + [np.array([base], np.int64)])
    return Records(off, np.concatenate(items), np.concatenate(bounds).astype(np.int64), int(item_num), "session",
                   None, np.asarray(raw), np.arange(int(item_num), dtype=np.int64),
                   {"protocol": "session", "format": "replay", "item_num": int(item_num), "seq_size": seq_size,
                    "splits": stats})
