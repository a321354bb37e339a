"""Config-driven data sources: one :class:`SourceConfig` (YAML ``data.source``) -> :class:`~shards.records.Records`.

A dataset is described by *where* its interactions are (``path`` or per-split ``files``),
*how* they are stored (``format``: ``table`` CSV/TSV, DreamRec ``replay`` rows, DiffRec
``pairs_npy``), *which* columns hold the user, item and time, and *which* protocol cuts the
records into train / valid / test segments (see :mod:`shards.records`). :func:`load_records`
is the only entry point; :func:`source_files` lists every file it reads (for build checksums).
This module holds the config, its validation and file resolution; the formats are read by
:mod:`shards.table` + :mod:`shards.table_protocols`, :mod:`shards.replay` and
:mod:`shards.pairs` (files opened by :mod:`shards.rawio`, ids by :mod:`shards.indexing`).

Ids: ``table`` sources are re-indexed (records by ascending raw user / session id, items
``1..N`` by ascending raw id); ``replay`` and ``pairs_npy`` keep their dense ids: item =
raw + 1. ``0`` is padding and never stored.

Errors: bad input is one line, ``ValueError`` (``FileNotFoundError`` for a missing file),
naming the file, the 1-based line (``pairs_npy``: row) and the column where there is one.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .indexing import kcore_filter
from .pairs import load_given_pairs
from .rawio import DATA_DIR_ENV, default_data_dir, repo_root
from .records import PROTOCOLS, SEGMENTS, Records
from .replay import load_replay, read_replay, reconstruct_sessions
from .table import Column, column_index
from .table_protocols import LOO_MIN_LENGTH, load_split_one, load_split_tables

__all__ = [  # public names, some re-exported from the modules that define them
    "DATA_DIR_ENV", "FORMATS", "LOO_MIN_LENGTH", "REPLAY_STATIS", "Column", "SourceConfig", "default_data_dir",
    "kcore_filter", "load_records", "read_replay", "reconstruct_sessions", "repo_root", "source_files",
]

FORMATS: Tuple[str, ...] = ("auto", "table", "replay", "pairs_npy")
REPLAY_STATIS = "data_statis.json"

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma")
_TABLE_SEPS = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".dat": "\t"}


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
                if not self.header and column_index(c) is None:
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
      ``(0, 0)``; items raw + 1, ``num_items`` = item_num; a session starting with a
      non-empty history (an orphan start) is refused. Table files -> one record per
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
        rec = load_replay(cfg, urls, _statis_url(cfg, data_dir))
    elif fmt == "pairs_npy":
        rec = load_given_pairs(cfg, urls)
    elif cfg.protocol in ("leave_one_out", "temporal"):
        rec = load_split_one(cfg, urls["all"])
    else:
        rec = load_split_tables(cfg, urls)
    rec.stats["segments"] = rec.segment_counts()
    rec.validate(where=", ".join(urls.values()))
    return rec
