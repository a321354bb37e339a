"""Config-driven data sources: one :class:`SourceConfig` (YAML ``data.source``) -> :class:`~shards.records.Records`.

Any dataset is described by *where* its interactions are (``path`` or per-split ``files``),
*how* they are stored (``format``: ``table`` CSV/TSV, DreamRec ``replay`` rows, DiffRec
``pairs_npy``), *which* columns hold the user, item and time, and *which* protocol cuts the
records into train / valid / test segments (see :mod:`shards.records`). :func:`load_records`
is the only entry point; :func:`source_files` lists every file it reads (for build checksums).

Re-indexing of ``table`` sources: users (sessions) -> records in ascending raw id order, items
-> ``1..N`` by ascending raw id over the kept interactions; a column's raw ids are ordered as
integers when every value parses as one (and no two spellings such as ``7``/``07`` collide),
else as strings. ``0`` is padding and never stored. ``replay`` and ``pairs_npy`` keep their
dense ids: item = raw + 1.

Errors: bad input is one line, ``ValueError`` (``FileNotFoundError`` for a missing file),
naming the file, the 1-based line (``pairs_npy``: row) and the column where there is one.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import operator
import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import fsspec
import numpy as np

from .records import PROTOCOLS, SEGMENTS, Records

DATA_DIR_ENV = "RECSYS_DATA_DIR"
FORMATS: Tuple[str, ...] = ("auto", "table", "replay", "pairs_npy")
REPLAY_STATIS = "data_statis.json"
LOO_MIN_LENGTH = 3  # leave-one-out needs >= 1 train, 1 valid and 1 test interaction

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma")
_TABLE_SEPS = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".dat": "\t"}
_REPLAY_SEQ = ("seq",)
_REPLAY_LEN = ("len_seq", "seq_len")  # DreamRec's name, baiyimeng's re-serialisation
_REPLAY_TARGET = ("next", "tgt")

Column = Union[str, int]


def repo_root() -> Path:
    """Root of the recsys-dist checkout (the parent of the ``shards`` package)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """``$RECSYS_DATA_DIR`` if set, else ``<repo root>/../shared/datasets``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    return str((repo_root().parent / "shared" / "datasets").resolve())


# --------------------------------------------------------------------------- config


@dataclass
class SourceConfig:
    """How to read one dataset (YAML ``data.source``); :meth:`validate` checks the combination.

    Exactly one of ``path`` (protocols ``leave_one_out`` / ``temporal``) and ``files``
    (protocols ``session`` / ``given``) is set.
    """

    path: Optional[str] = None
    """One interactions file. Relative paths resolve against the data dir; any fsspec URL
    (``s3://...``); compression inferred from the extension (``.gz``, ``.bz2``, ...)."""
    files: Optional[Dict[str, str]] = None
    """One file per split, keys exactly ``train``, ``valid``, ``test`` (resolved like ``path``)."""
    format: str = "auto"
    """``table`` (CSV/TSV), ``replay`` (DreamRec rows ``seq, len_seq|seq_len, next|tgt``),
    ``pairs_npy`` (DiffRec int ``(n, 2)`` ``[user, item]`` arrays) or ``auto``: ``.npy`` ->
    ``pairs_npy``, ``.csv/.tsv/.txt/.dat`` (optionally compressed) -> ``table``."""
    sep: Optional[str] = None
    """``table`` field separator; may be multi-character (``::``, no quoting then). None: by
    extension, ``.csv`` -> ``,``; ``.tsv/.txt/.dat`` -> tab."""
    header: bool = True
    """``table``: the first line names the columns. False: columns are 0-based indices."""
    user: Column = "user"
    """``table``: the user column (the session column under ``session``); ids are strings or ints."""
    item: Column = "item"
    """``table``: the item column."""
    time: Optional[Column] = None
    """``table``: a numeric time or position column that orders each record's interactions
    (stable: ties keep file order). None: file order."""
    time_is_position: bool = False
    """``time`` is a position, unique within a user: two interactions of one user at one
    position are an error (with real timestamps ties are broken by file order)."""
    protocol: str = "leave_one_out"
    """One of :data:`shards.records.PROTOCOLS`: ``leave_one_out``, ``temporal``, ``session``, ``given``."""
    temporal_ratio: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    """``temporal``: train / valid / test fractions of all kept interactions in global time order."""
    min_user_count: int = 0
    """Iterated k-core: keep users with at least this many interactions (``leave_one_out`` / ``temporal``)."""
    min_item_count: int = 0
    """Iterated k-core: keep items with at least this many interactions (``leave_one_out`` / ``temporal``)."""
    max_users: Optional[int] = None
    """Keep the first N users (ascending raw id) after the k-core; items are then re-indexed
    over the kept users only."""
    num_items: Optional[int] = None
    """``replay``: item_num (pad id) -- None: from the statis file. ``pairs_npy``: vocabulary
    size, at least max raw item + 1 (None: exactly that)."""
    statis: Optional[str] = None
    """``replay``: the JSON ``{"seq_size", "item_num"}`` file (resolved like ``path``). None:
    ``data_statis.json`` beside the train file, read only when ``num_items`` is None."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SourceConfig":
        """The config of a YAML ``data.source`` mapping; unknown keys are an error; validated."""
        if not isinstance(d, Mapping):
            raise ValueError(f"data.source must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"data.source: unknown key(s) {unknown}; known: {known}")
        kw = dict(d)
        if "temporal_ratio" in kw and kw["temporal_ratio"] is not None:
            kw["temporal_ratio"] = tuple(kw["temporal_ratio"])
        if kw.get("files") is not None:
            kw["files"] = dict(kw["files"])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def urls(self) -> List[str]:
        """The configured data file(s) as written (``path``, or ``files`` in split order)."""
        if self.files is not None:
            return [self.files[s] for s in SEGMENTS if s in self.files]
        return [self.path] if self.path is not None else []

    def resolved_format(self) -> str:
        """``format``, with ``auto`` resolved from the data file extension(s)."""
        if self.format != "auto":
            return self.format
        found = {_format_of(u) for u in self.urls()}
        if len(found) != 1 or None in found:
            raise ValueError(f"data.source.format: cannot infer it from {self.urls()} (set format: table, "
                             f"replay or pairs_npy)")
        return found.pop()  # type: ignore[return-value]

    def separator(self, url: str) -> str:
        """The ``table`` field separator of ``url``: ``sep``, or by extension."""
        if self.sep is not None:
            return self.sep
        sep = _TABLE_SEPS.get(_extension(url))
        if sep is None:
            raise ValueError(f"data.source.sep: cannot infer the separator of {url} from its extension "
                             f"(known: {sorted(_TABLE_SEPS)}); set sep")
        return sep

    def validate(self) -> None:
        """Raise a one-line ValueError (``data.source.<key>: ...``) on a bad value or combination."""
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"data.source.{key}: {msg}")

        if self.protocol not in PROTOCOLS:
            raise bad("protocol", f"{self.protocol!r} is not one of {list(PROTOCOLS)}")
        if self.format not in FORMATS:
            raise bad("format", f"{self.format!r} is not one of {list(FORMATS)}")
        per_split = self.protocol in ("session", "given")
        if (self.path is None) == (self.files is None):
            raise bad("path", "set exactly one of path (one file) and files (one per split)")
        if per_split and self.files is None:
            raise bad("files", f"protocol {self.protocol} reads one file per split: set files "
                               f"{{train, valid, test}} instead of path")
        if not per_split and self.path is None:
            raise bad("path", f"protocol {self.protocol} splits one file: set path instead of files")
        if self.files is not None:
            if not isinstance(self.files, Mapping) or sorted(self.files) != sorted(SEGMENTS):
                raise bad("files", f"needs exactly the keys {list(SEGMENTS)}, got "
                                   f"{sorted(self.files) if isinstance(self.files, Mapping) else self.files!r}")
        for u in self.urls():
            if not isinstance(u, str) or not u:
                raise bad("files" if per_split else "path", f"{u!r} is not a file name")
        fmt = self.resolved_format()
        if fmt == "replay" and self.protocol != "session":
            raise bad("format", f"replay rows are sessions: needs protocol session, not {self.protocol}")
        if fmt == "pairs_npy" and self.protocol != "given":
            raise bad("format", f"pairs_npy holds given splits: needs protocol given, not {self.protocol}")
        if fmt == "table":
            for u in self.urls():
                self.separator(u)
            if self.sep is not None and (not isinstance(self.sep, str) or not self.sep or "\n" in self.sep
                                         or "\r" in self.sep):
                raise bad("sep", f"{self.sep!r} is not a field separator")
            cols = {"user": self.user, "item": self.item, **({"time": self.time} if self.time is not None else {})}
            for k, c in cols.items():
                if self.header and not (isinstance(c, (str, int)) and str(c)):
                    raise bad(k, f"{c!r} is not a column name")
                if not self.header and _index(c) is None:
                    raise bad(k, f"{c!r}: with header: false columns are 0-based indices")
            if len({str(c) for c in cols.values()}) != len(cols):
                raise bad("user", f"the user, item and time columns must differ, got {cols}")
            if self.num_items is not None:
                raise bad("num_items", "only replay / pairs_npy sources take a fixed vocabulary; a table's "
                                       "items are re-indexed over the kept interactions")
        elif self.time is not None or self.time_is_position:
            raise bad("time", f"a {fmt} source has no time column (its order is the file order)")
        if fmt != "replay" and self.statis is not None:
            raise bad("statis", "only replay sources read a statis file")
        if fmt == "replay" and not self.header:
            raise bad("header", "replay files always have the header seq, len_seq, next")
        if self.time_is_position and self.time is None:
            raise bad("time_is_position", "needs a time column")
        if self.protocol == "temporal":
            if self.time_is_position:
                raise bad("time_is_position", "temporal splits by global time, not per-user positions")
            r = self.temporal_ratio
            if (not isinstance(r, (tuple, list)) or len(r) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in r)
                    or abs(sum(r) - 1.0) > 1e-6):
                raise bad("temporal_ratio", f"needs three non-negative fractions summing to 1, got {r!r}")
        for k in ("min_user_count", "min_item_count"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(k, f"needs an int >= 0, got {v!r}")
        if self.max_users is not None and (not isinstance(self.max_users, int) or isinstance(self.max_users, bool)
                                           or self.max_users < 1):
            raise bad("max_users", f"needs an int >= 1 or null, got {self.max_users!r}")
        if per_split and (self.min_user_count or self.min_item_count or self.max_users is not None):
            raise bad("min_user_count", f"k-core / max_users apply to leave_one_out and temporal only, "
                                        f"not to the given splits of protocol {self.protocol}")
        if self.num_items is not None and (not isinstance(self.num_items, int) or isinstance(self.num_items, bool)
                                           or self.num_items < 1):
            raise bad("num_items", f"needs an int >= 1 or null, got {self.num_items!r}")


def _extension(url: str) -> str:
    """Lower-case extension of ``url`` below any compression suffix (``a.tsv.gz`` -> ``.tsv``)."""
    name = posixpath.basename(url.split("?", 1)[0]).lower()
    for c in _COMPRESSIONS:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    return posixpath.splitext(name)[1]


def _format_of(url: str) -> Optional[str]:
    ext = _extension(url)
    if ext == ".npy":
        return "pairs_npy"
    return "table" if ext in _TABLE_SEPS else None


def _index(c: Column) -> Optional[int]:
    if isinstance(c, bool):
        return None
    if isinstance(c, int):
        return c if c >= 0 else None
    return int(c) if isinstance(c, str) and c.isdigit() else None


# --------------------------------------------------------------------------- files


def _resolve(p: str, data_dir: str) -> str:
    if "://" in p or os.path.isabs(p) or p.startswith("~"):
        return os.path.expanduser(p) if p.startswith("~") else p
    if "://" in data_dir:
        return data_dir.rstrip("/") + "/" + p
    return os.path.join(data_dir, p)


def _data_files(cfg: SourceConfig, data_dir: str) -> Dict[str, str]:
    """Resolved data URLs: ``{"all": url}`` or ``{split: url}``."""
    if cfg.files is not None:
        return {s: _resolve(cfg.files[s], data_dir) for s in SEGMENTS}
    return {"all": _resolve(cfg.path, data_dir)}  # type: ignore[arg-type]


def _statis_url(cfg: SourceConfig, data_dir: str) -> Optional[str]:
    if cfg.statis is not None:
        return _resolve(cfg.statis, data_dir)
    if cfg.num_items is not None:
        return None
    train = _resolve(cfg.files["train"], data_dir)  # type: ignore[index]
    return posixpath.join(posixpath.dirname(train), REPLAY_STATIS) if "://" in train else \
        os.path.join(os.path.dirname(train), REPLAY_STATIS)


def source_files(cfg: SourceConfig, data_dir: Optional[str] = None) -> List[str]:
    """Every URL :func:`load_records` reads for ``cfg`` (data files in split order, then a
    replay statis file), resolved against ``data_dir`` (default :func:`default_data_dir`)."""
    cfg.validate()
    data_dir = data_dir or default_data_dir()
    out = list(_data_files(cfg, data_dir).values())
    if cfg.resolved_format() == "replay":
        s = _statis_url(cfg, data_dir)
        if s is not None:
            out.append(s)
    return out


def _missing(url: str) -> FileNotFoundError:
    return FileNotFoundError(f"{url}: not found (relative paths resolve against the data dir: pass data_dir "
                             f"or set ${DATA_DIR_ENV}; default {default_data_dir()})")


@contextmanager
def _open_bytes(url: str) -> Iterator[Any]:
    of = fsspec.open(url, "rb", compression="infer")
    try:
        f = of.__enter__()
    except FileNotFoundError:
        raise _missing(url) from None
    try:
        yield f
    finally:
        of.__exit__(None, None, None)


@contextmanager
def _open_text(url: str) -> Iterator[io.TextIOBase]:
    with _open_bytes(url) as b:
        yield io.TextIOWrapper(b, encoding="utf-8-sig", newline="")


def _lines(f: io.TextIOBase, chunk: int = 1 << 22) -> Iterator[str]:
    """The lines of ``f`` (endings kept; ``\n``, ``\r\n`` or ``\r``), read in large chunks: iterating
    a text wrapper over a decompressor line by line costs a Python-level call per line."""
    rest = ""
    while True:
        buf = f.read(chunk)
        if not buf:
            if rest:
                yield from io.StringIO(rest, newline="")
            return
        buf = rest + buf
        cut = buf.rfind("\n") + 1
        rest = buf[cut:]
        if cut:
            yield from io.StringIO(buf[:cut], newline="")


def _rows(f: io.TextIOBase, sep: str) -> Iterator[Tuple[int, List[str]]]:
    """``(line, fields)`` of every non-blank line (1-based ``line``; csv quoting for a one-char sep)."""
    if len(sep) == 1:
        reader = csv.reader(_lines(f), delimiter=sep)
        for row in reader:
            if row:
                yield reader.line_num, row
    else:
        for n, line in enumerate(_lines(f), start=1):
            line = line.rstrip("\r\n")
            if line:
                yield n, line.split(sep)


def _line_of(url: str, sep: str, header: bool, row: int) -> int:
    """1-based line of data row ``row`` (0-based, blank lines skipped) of a table file."""
    with _open_text(url) as f:
        it = _rows(f, sep)
        if header:
            next(it, None)
        for k, (line, _) in enumerate(it):
            if k == row:
                return line
    raise ValueError(f"{url}: has no data row {row}")  # not reached for rows the reader returned


def _fail(url: str, line: Optional[int], column: Optional[str], msg: str) -> ValueError:
    where = url + (f": line {line}" if line is not None else "") + (f", column {column!r}" if column else "")
    return ValueError(f"{where}: {msg}")


# --------------------------------------------------------------------------- table reading


@dataclass
class _Table:
    """The wanted columns of one table file as written (strings), one entry per data row."""

    url: str
    sep: str
    header: bool
    columns: Dict[str, Sequence[str]]  # role ("user", "item", "time") -> values (rows,)
    names: Dict[str, str]  # role -> column name as written in the file (or its index)

    @property
    def rows(self) -> int:
        return len(self.columns["user"])

    def fail(self, row: int, role: Optional[str], msg: str) -> ValueError:
        """The error of data row ``row`` (0-based), naming its line and ``role``'s column."""
        return _fail(self.url, _line_of(self.url, self.sep, self.header, row),
                     None if role is None else self.names[role], msg)


def _read_table(url: str, cfg: SourceConfig) -> _Table:
    """Read the user, item (and time) columns of a table file; check field counts and empty ids."""
    sep = cfg.separator(url)
    roles: Dict[str, Column] = {"user": cfg.user, "item": cfg.item}
    if cfg.time is not None:
        roles["time"] = cfg.time
    with _open_text(url) as f:
        first = next(_rows(f, sep), None)  # the header (or first data row); rewind after it
    if first is None:
        raise _fail(url, None, None, "empty file (no header / rows)")
    ncol = len(first[1])
    if cfg.header:
        head = [h.strip() for h in first[1]]
        idx, names = {}, {}
        for role, c in roles.items():
            if str(c) not in head:
                hint = (" (a DreamRec replay file? set format: replay)"
                        if "seq" in head and any(n in head for n in _REPLAY_TARGET) else "")
                raise _fail(url, first[0], str(c), f"no such column; the header has {head}{hint}")
            idx[role], names[role] = head.index(str(c)), str(c)
    else:
        idx = {role: _index(c) for role, c in roles.items()}  # type: ignore[misc]
        names = {role: str(i) for role, i in idx.items()}
        for role, i in idx.items():
            if i >= ncol:  # type: ignore[operator]
                raise _fail(url, first[0], names[role], f"no such column; line {first[0]} has {ncol} field(s)")
    with _open_text(url) as f:
        text = f.read()
    fields = _split_fast(text, sep, ncol, url)
    if fields is not None:  # flat list: row r's field j is fields[r * ncol + j]
        h = 1 if cfg.header else 0
        cols = [fields[h * ncol + idx[r]::ncol] for r in roles]
    else:
        cols = _split_csv(text, sep, ncol, cfg.header, [idx[r] for r in roles], url)
    del text
    table = _Table(url, sep, cfg.header, dict(zip(roles, cols)), names)
    for role in ("user", "item"):
        vals = table.columns[role]  # as written: no stripping
        if "" in vals:
            raise table.fail(vals.index(""), role, "empty id")  # type: ignore[attr-defined]
    return table


_UNIT = "\x1f"  # ASCII unit separator: stands in for a multi-character sep in the fast path


def _split_fast(text: str, sep: str, ncol: int, url: str) -> Optional[List[str]]:
    """All fields of ``text`` as one flat list (``ncol`` per non-blank line), or None where the
    fast path does not apply (csv quoting, a non-ASCII separator). Checks the field count of
    every line with numpy (one pass over the bytes) and raises naming the first bad line."""
    shown = sep
    if len(sep) == 1:
        if '"' in text or ord(sep) > 127:
            return None
    else:
        if _UNIT in text:
            return None
        text = text.replace(sep, _UNIT)
        sep = _UNIT
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    b = np.frombuffer(text.encode("utf-8"), np.uint8)
    nl = np.flatnonzero(b == 10)
    ends = nl if (b.size == 0 or b[-1] == 10) else np.append(nl, b.size)
    starts = np.concatenate([[0], nl + 1])[: ends.size]
    per_line = np.diff(np.searchsorted(np.flatnonzero(b == ord(sep)), ends), prepend=0)  # seps per line
    blank = ends == starts
    bad = np.flatnonzero(~blank & (per_line != ncol - 1))
    if bad.size:
        k = int(bad[0])
        raise _fail(url, k + 1, None, f"{int(per_line[k]) + 1} field(s), expected {ncol} "
                                      f"(sep {shown!r})")
    if blank.any():
        text = "\n".join(line for line in text.split("\n") if line)
    elif text.endswith("\n"):
        text = text[:-1]
    return text.replace("\n", sep).split(sep) if text else []


def _split_csv(text: str, sep: str, ncol: int, header: bool, want: List[int], url: str) -> List[Sequence[str]]:
    """The ``want`` columns of ``text`` parsed by :mod:`csv` (quoting), one entry per data row."""
    get = operator.itemgetter(*want)  # >= 2 columns: returns a tuple
    rows: List[Tuple[str, ...]] = []
    app = rows.append
    reader = csv.reader(_lines(io.StringIO(text, newline="")), delimiter=sep)
    skip = header
    enabled = gc.isenabled()
    gc.disable()  # millions of small tuples: the cyclic collector would rescan them over and over
    try:
        for row in reader:
            if len(row) != ncol:
                if not row:
                    continue  # blank line
                raise _fail(url, reader.line_num, None, f"{len(row)} field(s), expected {ncol} (sep {sep!r})")
            if skip:
                skip = False
                continue
            app(get(row))
        return list(zip(*rows)) if rows else [() for _ in want]
    finally:
        if enabled:
            gc.enable()


def _codes(values: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """``(codes, uniq)``: int64 (n,) dense codes in ascending raw id order, and the raw ids.

    Raw ids are int64 when every value parses as an integer and no two spellings collide
    (``7`` / ``07``), else strings (string order)."""
    try:
        ints = np.fromiter(map(int, values), np.int64, count=len(values))
    except (ValueError, OverflowError):
        ints = None
    if ints is not None:
        uniq, inv = np.unique(ints, return_inverse=True)
        if uniq.size == len(set(values)):
            return inv.astype(np.int64).ravel(), uniq
    uniq, inv = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return inv.astype(np.int64).ravel(), uniq


def _times(table: _Table) -> Optional[np.ndarray]:
    """The time column as int64 (float64 when not all integral), or None; non-numeric -> error."""
    if "time" not in table.columns:
        return None
    s = table.columns["time"]
    try:
        return np.fromiter(map(int, s), np.int64, count=len(s))
    except (ValueError, OverflowError):
        pass
    try:
        t = np.fromiter(map(float, s), np.float64, count=len(s))
        if np.isfinite(t).all():
            return t
    except ValueError:
        pass
    for k, v in enumerate(s):
        try:
            ok = math.isfinite(float(v))
        except ValueError:
            ok = False
        if not ok:
            raise table.fail(k, "time", f"{v!r} is not a finite number")
    raise AssertionError("unreachable")


def _store_times(t: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """``Records.times`` is int64: integral times as is, others (fractional timestamps) dropped."""
    if t is None:
        return None
    if t.dtype.kind == "f":
        return t.astype(np.int64) if np.all(t == np.floor(t)) else None
    return t.astype(np.int64)


def _check_positions(table_of: Callable[[int], "_Table"], group: np.ndarray, t: np.ndarray, rows: np.ndarray) -> None:
    """Raise if two interactions of one group (already sorted by ``(group, t)``) share a position.

    ``rows`` are the interactions' file rows (same order); ``table_of(k)`` the table of sorted entry k."""
    dup = np.flatnonzero((group[1:] == group[:-1]) & (t[1:] == t[:-1]))
    if dup.size:
        k = int(dup[0])
        a, b = int(rows[k]), int(rows[k + 1])
        tab = table_of(k + 1)
        first = _line_of(table_of(k).url, tab.sep, tab.header, a)
        raise tab.fail(b, "time", f"position {t[k + 1].item()!r} repeats for one user (first at line {first} of "
                                  f"{table_of(k).url}); time_is_position needs unique positions per user")


def kcore_filter(user_codes: np.ndarray, item_codes: np.ndarray, min_item_count: int,
                 min_user_count: int, keep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int]:
    """Iterated k-core over interactions: drop items with fewer than ``min_item_count``, then
    users with fewer than ``min_user_count`` interactions, until nothing changes (the unique
    maximal subset meeting both). Returns ``(keep, iterations)``, bool (n,), starting from
    ``keep`` (default all)."""
    keep = np.ones(user_codes.shape[0], dtype=bool) if keep is None else keep.copy()
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


def _csr(group: np.ndarray, n_groups: int) -> np.ndarray:
    """int64 (n_groups + 1,) offsets of ``group`` (sorted dense codes)."""
    off = np.zeros(n_groups + 1, np.int64)
    np.cumsum(np.bincount(group, minlength=n_groups), out=off[1:])
    return off


# --------------------------------------------------------------------------- protocols on one table


def _load_split_one(cfg: SourceConfig, url: str) -> Records:
    """``leave_one_out`` / ``temporal`` over one table file."""
    table = _read_table(url, cfg)
    n_raw = table.rows
    ucode, uniq_users = _codes(table.columns["user"])
    icode, uniq_items = _codes(table.columns["item"])
    t = _times(table)
    rows = np.arange(n_raw, dtype=np.int64)
    order = np.argsort(ucode, kind="stable") if t is None else np.lexsort((t, ucode))
    ucode, icode, rows = ucode[order], icode[order], rows[order]
    ts = None if t is None else t[order]
    if cfg.time_is_position and ts is not None:
        _check_positions(lambda k: table, ucode, ts, rows)

    keep, iterations = kcore_filter(ucode, icode, cfg.min_item_count, cfg.min_user_count)
    stats: Dict[str, Any] = {
        "protocol": cfg.protocol, "format": "table", "min_user_count": cfg.min_user_count,
        "min_item_count": cfg.min_item_count, "iterations": iterations,
        "raw_users": int(uniq_users.size), "raw_items": int(uniq_items.size), "raw_interactions": n_raw,
        "filtered_users": int(np.unique(ucode[keep]).size), "filtered_items": int(np.unique(icode[keep]).size),
        "filtered_interactions": int(keep.sum()),
    }
    if cfg.protocol == "leave_one_out":
        short = kcore_filter(ucode, icode, cfg.min_item_count, max(cfg.min_user_count, LOO_MIN_LENGTH), keep)[0]
        stats["short_users_dropped"] = stats["filtered_users"] - int(np.unique(ucode[short]).size)
        stats["short_interactions_dropped"] = int(keep.sum() - short.sum())
        keep = short
    if not keep.any():
        raise ValueError(f"{url}: nothing left after the k-core (min_user_count={cfg.min_user_count}, "
                         f"min_item_count={cfg.min_item_count}"
                         + (f", leave_one_out needs >= {LOO_MIN_LENGTH} per user" if cfg.protocol == "leave_one_out"
                            else "")
                         + f"): 0 users / 0 items / 0 interactions left of {stats['raw_users']} users / "
                         f"{stats['raw_items']} items / {n_raw} interactions")
    ucode, icode, rows = ucode[keep], icode[keep], rows[keep]
    ts = None if ts is None else ts[keep]

    kept_users = np.unique(ucode)  # ascending code == ascending raw id
    if cfg.max_users is not None and kept_users.size > cfg.max_users:
        kept_users = kept_users[: cfg.max_users]
        sel = ucode <= kept_users[-1]
        ucode, icode, rows = ucode[sel], icode[sel], rows[sel]
        ts = None if ts is None else ts[sel]
    user = np.searchsorted(kept_users, ucode)
    kept_items = np.unique(icode)
    items = (np.searchsorted(kept_items, icode) + 1).astype(np.int32)
    off = _csr(user, kept_users.size)
    lens = np.diff(off)
    if cfg.protocol == "leave_one_out":
        bounds = np.stack([lens - 2, lens - 1], axis=1)
    else:
        bounds, stats["temporal_cut"] = _temporal_bounds(user, rows if ts is None else ts, rows, kept_users.size,
                                                        cfg.temporal_ratio)
        # per user: train ++ valid ++ test, each in time order = global time order within the user
        stats["users_without_train"] = int((bounds[:, 0] == 0).sum())
    stats.update({"max_users": cfg.max_users, "users": int(kept_users.size), "items": int(kept_items.size),
                  "interactions": int(items.size)})
    return Records(off, items, bounds.astype(np.int64), int(kept_items.size), cfg.protocol, _store_times(ts),
                   uniq_users[kept_users], uniq_items[kept_items], stats)


def _temporal_bounds(user: np.ndarray, t: np.ndarray, rows: np.ndarray, n_users: int,
                     ratio: Sequence[float]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Per-user ``(train_end, valid_end)`` of a global time-quantile split.

    ``user``, ``t``, ``rows``: the kept interactions sorted by ``(user, t)``; all of them sorted
    by ``(t, file row)``: the first ``floor(r0 * n)`` are train, up to ``floor((r0 + r1) * n)``
    valid, the rest test (ties at a cut are split by file order)."""
    n = user.size
    g = np.lexsort((rows, t))  # global time order, ties by file order
    c1 = int(math.floor(ratio[0] * n + 1e-9))
    c2 = max(c1, min(n, int(math.floor((ratio[0] + ratio[1]) * n + 1e-9))))
    seg = np.empty(n, np.int8)
    seg[g[:c1]], seg[g[c1:c2]], seg[g[c2:]] = 0, 1, 2
    tr = np.bincount(user, weights=seg == 0, minlength=n_users).astype(np.int64)
    va = np.bincount(user, weights=seg == 1, minlength=n_users).astype(np.int64)
    cut = {"train_interactions": c1, "valid_interactions": c2 - c1, "test_interactions": n - c2,
           "valid_from_time": t[g[c1]].item() if c1 < n else None,
           "test_from_time": t[g[c2]].item() if c2 < n else None}
    return np.stack([tr, tr + va], axis=1), cut


# --------------------------------------------------------------------------- per-split tables


def _load_split_tables(cfg: SourceConfig, urls: Dict[str, str]) -> Records:
    """``session`` / ``given`` over one table file per split (ids re-indexed over all splits)."""
    tables = [_read_table(urls[s], cfg) for s in SEGMENTS]
    sizes = np.array([tb.rows for tb in tables])
    split = np.repeat(np.arange(3, dtype=np.int64), sizes)
    rows = np.concatenate([np.arange(k, dtype=np.int64) for k in sizes])
    ucode, uniq_users = _codes([v for tb in tables for v in tb.columns["user"]])
    icode, uniq_items = _codes([v for tb in tables for v in tb.columns["item"]])
    t: Optional[np.ndarray] = None
    if cfg.time is not None:
        tt = [_times(tb) for tb in tables]
        dtype = np.float64 if any(x.dtype.kind == "f" for x in tt) else np.int64  # type: ignore[union-attr]
        t = np.concatenate([x.astype(dtype) for x in tt])  # type: ignore[union-attr]
    # session: records are (split, session); given: records are users, their splits concatenated
    major = (split, ucode) if cfg.protocol == "session" else (ucode, split)
    keys = (rows,) + (() if t is None else (t,)) + (major[1], major[0])
    order = np.lexsort(keys)
    split, ucode, icode, rows = split[order], ucode[order], icode[order], rows[order]
    ts = None if t is None else t[order]
    gid = split * (int(ucode.max()) + 1 if ucode.size else 1) + ucode  # (split, user) as one code
    if cfg.time_is_position and ts is not None:
        _check_positions(lambda k: tables[int(split[k])], gid, ts, rows)
    kept_items = np.unique(icode)
    items = (np.searchsorted(kept_items, icode) + 1).astype(np.int32)
    if cfg.protocol == "session":
        uk, first, rec = np.unique(gid, return_index=True, return_inverse=True)  # gid ascends here
        rec_split, rec_user = split[first], ucode[first]
        off = _csr(rec.ravel(), uk.size)
        lens = np.diff(off)
        bounds = np.zeros((uk.size, 2), np.int64)  # test sessions: (0, 0)
        bounds[rec_split == 0] = lens[rec_split == 0, None]  # train: (n, n)
        bounds[rec_split == 1, 1] = lens[rec_split == 1]  # valid: (0, n)
        raw_rec = uniq_users[rec_user]
        stats_rec = {"sessions": {s: int((rec_split == i).sum()) for i, s in enumerate(SEGMENTS)}}
    else:
        kept_users = np.unique(ucode)
        user = np.searchsorted(kept_users, ucode)
        off = _csr(user, kept_users.size)
        tr = np.bincount(user, weights=split == 0, minlength=kept_users.size).astype(np.int64)
        va = np.bincount(user, weights=split == 1, minlength=kept_users.size).astype(np.int64)
        bounds = np.stack([tr, tr + va], 1)
        raw_rec = uniq_users[kept_users]
        stats_rec = {"users": int(kept_users.size)}
    stats = {"protocol": cfg.protocol, "format": "table", "items": int(kept_items.size),
             "raw_interactions": {s: int(k) for s, k in zip(SEGMENTS, sizes)}, **stats_rec}
    return Records(off, items, bounds.astype(np.int64), int(kept_items.size), cfg.protocol, _store_times(ts),
                   raw_rec, uniq_items[kept_items], stats)


# --------------------------------------------------------------------------- DiffRec pairs


def _read_pairs(url: str) -> np.ndarray:
    """int64 (n, 2) ``[user, item]`` of a DiffRec ``.npy`` (no pickles), ids >= 0."""
    with _open_bytes(url) as f:
        raw = f.read()
    try:
        a = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise _fail(url, None, None, f"not a plain .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != 2 or a.dtype.kind not in "iu":
        raise _fail(url, None, None, f"expected an int (n, 2) [user, item] array, got "
                                     f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    neg = np.flatnonzero((a < 0).any(1)) if a.dtype.kind == "i" else np.zeros(0, np.int64)
    if neg.size:
        r = int(neg[0])
        col = "user" if a[r, 0] < 0 else "item"
        raise ValueError(f"{url}: row {r + 1}, column {col!r}: negative id {int(a[r, 0 if col == 'user' else 1])}")
    return a.astype(np.int64)


def _load_given_pairs(cfg: SourceConfig, urls: Dict[str, str]) -> Records:
    """``given`` over DiffRec pairs: users ``0..max`` (raw), items raw + 1, each split in file order."""
    pairs = [_read_pairs(urls[s]) for s in SEGMENTS]
    nonempty = [p for p in pairs if p.size]
    num_users = max((int(p[:, 0].max()) + 1 for p in nonempty), default=0)
    max_item = max((int(p[:, 1].max()) + 1 for p in nonempty), default=0)
    num_items = max_item if cfg.num_items is None else cfg.num_items
    if num_items < max_item:
        raise ValueError(f"data.source.num_items: {cfg.num_items} < max raw item + 1 = {max_item} in "
                         f"{', '.join(urls.values())}")
    user = np.concatenate([p[:, 0] for p in pairs])
    item = np.concatenate([p[:, 1] for p in pairs]) + 1
    split = np.repeat(np.arange(3), [p.shape[0] for p in pairs])
    order = np.argsort(user, kind="stable")  # within a user: train, valid, test, each in file order
    off = _csr(user[order], num_users)
    tr = np.bincount(user, weights=split == 0, minlength=num_users).astype(np.int64)
    va = np.bincount(user, weights=split == 1, minlength=num_users).astype(np.int64)
    stats = {"protocol": "given", "format": "pairs_npy", "users": num_users, "items": num_items,
             "raw_interactions": {s: int(p.shape[0]) for s, p in zip(SEGMENTS, pairs)},
             "users_without_interactions": int((np.diff(off) == 0).sum())}
    return Records(off, item[order].astype(np.int32), np.stack([tr, tr + va], 1), int(num_items), "given", None,
                   np.arange(num_users, dtype=np.int64), np.arange(num_items, dtype=np.int64), stats)


# --------------------------------------------------------------------------- DreamRec replay


def _replay_statis(url: str) -> Tuple[int, int]:
    """``(item_num, seq_size)`` of a DreamRec ``data_statis.json``."""
    with _open_bytes(url) as f:
        raw = f.read()
    try:
        st = json.loads(raw.decode("utf-8"))
        item_num, seq_size = int(st["item_num"]), int(st["seq_size"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise _fail(url, None, None, f"expected {{\"item_num\": int, \"seq_size\": int}}, got {raw[:200]!r}") from None
    if item_num < 1 or seq_size < 1:
        raise _fail(url, None, None, f"item_num and seq_size must be >= 1, got {item_num}, {seq_size}")
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
    with _open_text(url) as f:
        it = _rows(f, "\t")
        first = next(it, None)
        if first is None:
            raise _fail(url, None, None, "empty file (no header)")
        head = [h.strip() for h in first[1]]
        idx, names = [], []
        for alias in (_REPLAY_SEQ, _REPLAY_LEN, _REPLAY_TARGET):
            found = [n for n in alias if n in head]
            if not found:
                raise _fail(url, first[0], " / ".join(alias), f"no such column; the header has {head}")
            idx.append(head.index(found[0]))
            names.append(found[0])
        (si, li, ti), (sn, ln, tn) = idx, names
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
                raise _fail(url, line, col, f"malformed replay row ({e})") from None
            seqs.append(s)
            lines.append(line)
    width = seq_size or 0
    seq = np.asarray(seqs, dtype=np.int64).reshape(-1, width)
    tgt = np.asarray(targets, dtype=np.int64)
    len_seq = np.asarray(lens, dtype=np.int64)

    def fail(bad: np.ndarray, col: str, what: str) -> None:
        r = int(np.flatnonzero(bad)[0])
        raise _fail(url, lines[r], col, f"{what} (seq {seq[r].tolist()}, {ln} {len_seq[r]}, {tn} {tgt[r]})")

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
    off = np.zeros(S + 1, np.int64)
    np.cumsum(np.bincount(sessions, weights=emit, minlength=S).astype(np.int64), out=off[1:])
    stats = {"rows": int(n), "sessions": S, "orphan_session_starts": int(orphan.size),
             "truncated_history_rows": int((count >= seq.shape[1]).sum()) if n else 0}
    return off, (out + 1).astype(np.int32), pre[start].astype(np.int64), stats


def _load_replay(cfg: SourceConfig, urls: Dict[str, str], data_dir: str) -> Records:
    """``session`` over DreamRec replay files: train sessions, then valid, then test (file order)."""
    statis = _statis_url(cfg, data_dir)
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


# --------------------------------------------------------------------------- entry point


def load_records(cfg: SourceConfig, data_dir: Optional[str] = None) -> Records:
    """Read the source described by ``cfg`` into validated :class:`~shards.records.Records`.

    Protocols (segment bounds per record, see :mod:`shards.records`):

    * ``leave_one_out`` (table): one record per user, its interactions sorted by ``time``
      (stable); k-core, then ``max_users``; bounds ``(n - 2, n - 1)``. Users left with fewer
      than 3 interactions are dropped: the k-core runs with ``min_user_count`` raised to 3
      (the item threshold keeps holding), ``stats["short_users_dropped"]`` counts them.
    * ``temporal`` (table): k-core and ``max_users`` as above, then all kept interactions in
      global time order (ties: file order) are cut at ``temporal_ratio`` quantiles; a user's
      record is its train ++ valid ++ test in time order (users may have empty segments).
    * ``session``: replay files -> one record per reconstructed session, train sessions, then
      valid, then test, each in file order; bounds train ``(n, n)``, valid ``(0, n)``, test
      ``(0, 0)`` (``(p, n)`` / ``(p, p)`` when an orphan session start brings a p-item
      history); items raw + 1, ``num_items`` = item_num. Table files -> one record per
      (split, session id), ascending session id within each split.
    * ``given``: pairs_npy -> users ``0..max`` over the splits (possibly empty records),
      items raw + 1, ``num_items`` = max raw item + 1 (or ``cfg.num_items``); table files ->
      users / items re-indexed over all splits. A record is the user's train ++ valid ++ test,
      each in file (or ``time``) order; bounds ``(len train, len train + len valid)``.

    Raises:
        FileNotFoundError: a data (or statis) file is missing, naming it.
        ValueError: a bad config, or bad input naming the file, line and column.
    """
    cfg.validate()
    data_dir = data_dir or default_data_dir()
    urls = _data_files(cfg, data_dir)
    fmt = cfg.resolved_format()
    if fmt == "replay":
        rec = _load_replay(cfg, urls, data_dir)
    elif fmt == "pairs_npy":
        rec = _load_given_pairs(cfg, urls)
    elif cfg.protocol in ("leave_one_out", "temporal"):
        rec = _load_split_one(cfg, urls["all"])
    else:
        rec = _load_split_tables(cfg, urls)
    rec.stats["segments"] = rec.segment_counts()
    rec.validate(where=", ".join(urls.values()))
    return rec
