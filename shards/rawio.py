"""Raw source files: where relative paths resolve, opening, lines / rows, and input errors.

* :func:`default_data_dir`: ``$RECSYS_DATA_DIR``, else ``<repo root>/../shared/datasets``.
* :func:`open_bytes` / :func:`open_text`: any fsspec URL, compression inferred from the
  extension; a missing file is a ``FileNotFoundError`` naming it.
* :func:`chunked_lines` / :func:`text_rows`: lines (endings kept) and ``(1-based line, fields)``
  of the non-blank lines (csv quoting for a one-character separator).
* :func:`header_columns`: the wanted columns of a header line, a missing one an error.
* :func:`input_error`: the one-line ``ValueError`` naming the file, line (or row) and column.
"""

from __future__ import annotations

import csv
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import fsspec

DATA_DIR_ENV = "RECSYS_DATA_DIR"


def repo_root() -> Path:
    """Root of the recsys-dist checkout (the parent of the ``shards`` package)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """``$RECSYS_DATA_DIR`` if set, else ``<repo root>/../shared/datasets``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    return str((repo_root().parent / "shared" / "datasets").resolve())


def _missing(url: str) -> FileNotFoundError:
    return FileNotFoundError(f"{url}: not found (relative paths resolve against the data dir: pass data_dir "
                             f"or set ${DATA_DIR_ENV}; default {default_data_dir()})")


@contextmanager
def open_bytes(url: str) -> Iterator[Any]:
    """``url`` (any fsspec URL) opened for reading, decompressed by its extension; a missing
    file is a :class:`FileNotFoundError` naming it and the data dir."""
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
def open_text(url: str) -> Iterator[io.TextIOBase]:
    """``url`` as UTF-8 text (a BOM dropped, line endings kept)."""
    with open_bytes(url) as b:
        yield io.TextIOWrapper(b, encoding="utf-8-sig", newline="")


def chunked_lines(f: io.TextIOBase, chunk: int = 1 << 22) -> Iterator[str]:
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


def text_rows(f: io.TextIOBase, sep: str) -> Iterator[Tuple[int, List[str]]]:
    """``(line, fields)`` of every non-blank line (1-based ``line``; csv quoting for a one-char sep)."""
    if len(sep) == 1:
        reader = csv.reader(chunked_lines(f), delimiter=sep)
        for row in reader:
            if row:
                yield reader.line_num, row
    else:
        for n, line in enumerate(chunked_lines(f), start=1):
            line = line.rstrip("\r\n")
            if line:
                yield n, line.split(sep)


def input_error(url: str, line: Optional[int], column: Optional[str], msg: str, unit: str = "line") -> ValueError:
    """The one-line error of bad input: ``<url>[: <unit> <line>][, column '<column>']: <msg>``."""
    where = url + (f": {unit} {line}" if line is not None else "") + (f", column {column!r}" if column else "")
    return ValueError(f"{where}: {msg}")


def header_columns(url: str, line: int, head: List[str], wanted: Mapping[str, Sequence[str]],
                   hint: str = "") -> Tuple[Dict[str, int], Dict[str, str]]:
    """``(index, name)`` per role of ``wanted`` (role -> accepted names, first present wins) in
    the header ``head`` (fields stripped) on ``line``; a missing column is an error (+ ``hint``)."""
    idx: Dict[str, int] = {}
    names: Dict[str, str] = {}
    for role, aliases in wanted.items():
        found = [n for n in aliases if n in head]
        if not found:
            raise input_error(url, line, " / ".join(aliases), f"no such column; the header has {head}{hint}")
        idx[role], names[role] = head.index(found[0]), found[0]
    return idx, names
