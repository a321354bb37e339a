"""Reading one table file (CSV / TSV, any separator, any compression) into its wanted columns.

:func:`read_table` returns the user, item (and time) columns of every non-blank data row as
written (strings, not stripped), after checking that the columns exist, that every line has
the header's field count and that no id is empty. A one-character separator follows csv
quoting (:mod:`csv` when the text has a ``"``, else a numpy fast path giving the same
fields); a multi-character one (``::``) splits plainly. :func:`table_times` parses the time
column (int64, else finite float64). Errors name the file, the 1-based line and the column
(:meth:`Table.fail` maps a data row back to its line).
"""

from __future__ import annotations

import csv
import gc
import io
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .rawio import chunked_lines, header_columns, input_error, open_text, text_rows
from .replay import REPLAY_TARGET

if TYPE_CHECKING:
    from .source import SourceConfig

Column = Union[str, int]


def column_index(c: Column) -> Optional[int]:
    """The 0-based index ``c`` names (an int or a digit string), or None."""
    if isinstance(c, bool):
        return None
    if isinstance(c, int):
        return c if c >= 0 else None
    return int(c) if isinstance(c, str) and c.isdigit() else None


def line_of(url: str, sep: str, header: bool, row: int) -> int:
    """1-based line of data row ``row`` (0-based, blank lines skipped) of a table file."""
    with open_text(url) as f:
        it = text_rows(f, sep)
        if header:
            next(it, None)
        for k, (line, _) in enumerate(it):
            if k == row:
                return line
    raise ValueError(f"{url}: has no data row {row}")  # not reached for rows the reader returned


@dataclass
class Table:
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
        return input_error(self.url, line_of(self.url, self.sep, self.header, row),
                           None if role is None else self.names[role], msg)


def read_table(url: str, cfg: "SourceConfig") -> Table:
    """Read the user, item (and time) columns of a table file; check field counts and empty ids."""
    sep = cfg.separator(url)
    roles: Dict[str, Column] = {"user": cfg.user, "item": cfg.item}
    if cfg.time is not None:
        roles["time"] = cfg.time
    with open_text(url) as f:
        first = next(text_rows(f, sep), None)  # the header (or first data row); rewind after it
    if first is None:
        raise input_error(url, None, None, "empty file (no header / rows)")
    ncol = len(first[1])
    if cfg.header:
        head = [h.strip() for h in first[1]]
        hint = (" (a DreamRec replay file? set format: replay)"
                if "seq" in head and any(n in head for n in REPLAY_TARGET) else "")
        idx, names = header_columns(url, first[0], head, {role: (str(c),) for role, c in roles.items()}, hint)
    else:
        idx = {role: column_index(c) for role, c in roles.items()}  # type: ignore[misc]
        names = {role: str(i) for role, i in idx.items()}
        for role, i in idx.items():
            if i >= ncol:  # type: ignore[operator]
                raise input_error(url, first[0], names[role],
                                  f"no such column; line {first[0]} has {ncol} field(s)")
    with open_text(url) as f:
        text = f.read()
    fields = _split_fast(text, sep, ncol, url)
    if fields is not None:  # flat list: row r's field j is fields[r * ncol + j]
        h = 1 if cfg.header else 0
        cols = [fields[h * ncol + idx[r]::ncol] for r in roles]
    else:
        cols = _split_csv(text, sep, ncol, cfg.header, [idx[r] for r in roles], url)
    del text
    table = Table(url, sep, cfg.header, dict(zip(roles, cols)), names)
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
        raise input_error(url, k + 1, None, f"{int(per_line[k]) + 1} field(s), expected {ncol} "
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
    reader = csv.reader(chunked_lines(io.StringIO(text, newline="")), delimiter=sep)
    skip = header
    enabled = gc.isenabled()
    gc.disable()  # millions of small tuples: the cyclic collector would rescan them over and over
    try:
        for row in reader:
            if len(row) != ncol:
                if not row:
                    continue  # blank line
                raise input_error(url, reader.line_num, None,
                                  f"{len(row)} field(s), expected {ncol} (sep {sep!r})")
            if skip:
                skip = False
                continue
            app(get(row))
        return list(zip(*rows)) if rows else [() for _ in want]
    finally:
        if enabled:
            gc.enable()


def table_times(table: Table) -> Optional[np.ndarray]:
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


def stored_times(t: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """``Records.times`` is int64: integral times as is, others (fractional timestamps) dropped."""
    if t is None:
        return None
    if t.dtype.kind == "f":
        return t.astype(np.int64) if np.all(t == np.floor(t)) else None
    return t.astype(np.int64)
