"""On-disk schema of the ``recsys-dist/seq-v1`` WebDataset shards.

One sample is one (history, target) pair of a sequential recommender:

=================  ==========================================================
tar member         content
=================  ==========================================================
``<key>.history.i32``  int32 little-endian raw bytes, the *unpadded* history,
                   oldest item first, length min_history_len..max_len
                   (4*min_history_len..4*max_len bytes)
``<key>.target.i32``   one int32 little-endian (4 bytes): the next item
``<key>.user.i32``     one int32 little-endian (4 bytes): the dense user index
``<key>.seen.i32``     optional, val/test only: int32 raw bytes, the user's *whole* seen
                   set before the target (sorted unique ids), written when the
                   history was cut to ``max_len``; absent, the history is the
                   whole seen set. Evaluation masks this set (``eval.mask_history``),
                   never just the model's input window.
=================  ==========================================================

``key = f"{split}-{user:08d}-{j:05d}"`` where ``j`` is the 1-based position
of the target in the user's full sequence ``s_1..s_n``. Item ids are
``1..num_items``; ``0`` is padding and never appears in a shard.

The manifest's ``protocol`` says what a user and a history are:

* ``"leave_one_out"`` (DiffuRec datasets; the default of manifests written
  before the key existed): ``user`` is the dense user index, histories are
  never empty (``min_history_len`` 1).
* ``"session_split"`` (DreamRec datasets): ``user`` is the row index of the
  sample in its split's file (``0..n-1``, unique within a split), ``j`` the
  position of the target in its session, and the history of a session's first
  interaction is *empty* (a 0-byte ``history.i32``; the manifest has
  ``"min_history_len": 0``).

Shards are named ``f"{split}-{index:05d}.tar"`` (``.tar.gz`` when built with
``compress=True``) and sit next to a ``manifest.json`` (see
:mod:`shards.build`).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

FORMAT = "recsys-dist/seq-v1"
SPLITS: Tuple[str, ...] = ("train", "val", "test")
HISTORY = "history.i32"
TARGET = "target.i32"
USER = "user.i32"
SEEN = "seen.i32"
MEMBERS: Tuple[str, ...] = (HISTORY, TARGET, USER)
OPTIONAL_MEMBERS: Tuple[str, ...] = (SEEN,)
PAD_ID = 0
LEAVE_ONE_OUT = "leave_one_out"
SESSION_SPLIT = "session_split"
PROTOCOLS: Tuple[str, ...] = (LEAVE_ONE_OUT, SESSION_SPLIT)
MANIFEST_NAME = "manifest.json"
ITEM_COUNTS_NAME = "item_counts.npy"
TARGET_COUNTS_NAME = "target_counts.npy"  # train-target occurrences (in-batch negatives)
ID_MAP_NAME = "id_map.json"

_I32 = np.dtype("<i4")
_SHARD_RE = re.compile(r"^(train|val|test)-(\d{5})\.tar(\.gz)?$")


class ShardError(RuntimeError):
    """A shard (or manifest) is missing, truncated, or holds an invalid sample.

    The message always names the shard URL, and where it applies the sample
    key / tar member and what is wrong with it. ``url``, ``key`` and
    ``member`` are also available as attributes (``None`` when not known).
    """

    def __init__(
        self,
        message: str,
        url: Optional[str] = None,
        key: Optional[str] = None,
        member: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.key = key
        self.member = member


def make_key(split: str, user: int, j: int) -> str:
    """Sample key ``f"{split}-{user:08d}-{j:05d}"`` (``j`` = 1-based target position)."""
    return f"{split}-{user:08d}-{j:05d}"


def shard_name(split: str, index: int, compress: bool = False) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-00003.tar``."""
    return f"{split}-{index:05d}.tar" + (".gz" if compress else "")


def is_shard_name(name: str) -> bool:
    """True if ``name`` (a base name) looks like a shard written by this package."""
    return _SHARD_RE.match(name) is not None


def manifest_protocol(manifest: Mapping[str, object]) -> str:
    """``manifest["protocol"]``; ``"leave_one_out"`` for manifests written before the key existed."""
    p = manifest.get("protocol", LEAVE_ONE_OUT)
    if p not in PROTOCOLS:
        raise ValueError(f"unknown protocol {p!r} (known: {list(PROTOCOLS)})")
    return str(p)


def manifest_min_history_len(manifest: Mapping[str, object]) -> int:
    """Shortest history the manifest allows: ``manifest["min_history_len"]``, default 1 (0 or 1)."""
    v = int(manifest.get("min_history_len", 1))  # type: ignore[arg-type]
    if v not in (0, 1):
        raise ValueError(f"min_history_len must be 0 or 1, got {v}")
    return v


def encode_sample(
    split: str, user: int, j: int, history: np.ndarray, target: int, min_len: int = 1,
    seen: Optional[np.ndarray] = None,
) -> Dict[str, object]:
    """Encode one sample as a dict for ``webdataset.TarWriter(encoder=False)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        user: dense user index (>= 0).
        j: 1-based position of ``target`` in the user's sequence.
        history: 1-D int array, unpadded, oldest first, length >= ``min_len``.
        target: item id (>= 1).
        min_len: shortest allowed history (0 for session-split data).
        seen: the user's whole seen set before the target when ``history`` is a cut of it
            (written as sorted unique ids), else None.

    Returns:
        ``{"__key__": str, "history.i32": bytes, "target.i32": bytes, "user.i32": bytes}``
        (+ ``"seen.i32"``).
    """
    h = np.ascontiguousarray(history, dtype=_I32)
    if h.ndim != 1 or h.size < min_len:
        what = "a non-empty 1-D array" if min_len >= 1 else "a 1-D array"
        raise ValueError(f"history must be {what}, got shape {h.shape}")
    out: Dict[str, object] = {
        "__key__": make_key(split, user, j),
        HISTORY: h.tobytes(),
        TARGET: np.asarray([target], dtype=_I32).tobytes(),
        USER: np.asarray([user], dtype=_I32).tobytes(),
    }
    if seen is not None:
        out[SEEN] = np.unique(np.asarray(seen, dtype=_I32)).astype(_I32).tobytes()
    return out


def decode_sample(
    key: str,
    members: Mapping[str, bytes],
    url: str,
    num_items: int,
    max_len: int,
    min_len: int = 1,
    with_seen: bool = False,
) -> Tuple[Any, ...]:
    """Decode and validate one sample read from shard ``url``.

    Args:
        key: the sample key (tar member name up to the first dot).
        members: ``{"history.i32": bytes, "target.i32": bytes, "user.i32": bytes}``.
        url: shard URL, only used in error messages.
        num_items: valid item ids are ``1..num_items``.
        max_len: the longest history the manifest allows.
        min_len: the shortest history the manifest allows (its ``min_history_len``:
            1, or 0 for session-split data whose first interactions have none).
        with_seen: also return the seen set (the ``seen.i32`` member, or the
            history itself when the sample has none).

    Returns:
        ``(history, target, user)`` (+ ``seen`` with ``with_seen``): history is an
        int32 array of shape (L,), min_len <= L <= max_len, oldest first; target
        and user are Python ints; seen is an int32 array of item ids.

    Raises:
        ShardError: a member is missing or unexpected, has the wrong byte length,
            or holds an item id outside ``[1, num_items]``.
    """
    for m in MEMBERS:
        if m not in members:
            raise ShardError(
                f"{url}: sample {key!r} is missing member {key}.{m} (has {sorted(members)})",
                url=url, key=key, member=m,
            )
    extra = sorted(set(members) - set(MEMBERS) - set(OPTIONAL_MEMBERS))
    if extra:
        raise ShardError(
            f"{url}: sample {key!r} has unexpected member(s) {[key + '.' + e for e in extra]}",
            url=url, key=key, member=extra[0],
        )
    hb = members[HISTORY]
    if len(hb) < 4 * min_len or len(hb) % 4 != 0 or len(hb) > 4 * max_len:
        raise ShardError(
            f"{url}: member {key}.{HISTORY} has {len(hb)} bytes; expected a multiple of 4 "
            f"between {4 * min_len} and {4 * max_len} ({min_len}..max_len={max_len} int32 items)",
            url=url, key=key, member=HISTORY,
        )
    for m in (TARGET, USER):
        if len(members[m]) != 4:
            raise ShardError(
                f"{url}: member {key}.{m} has {len(members[m])} bytes; expected 4 (one int32)",
                url=url, key=key, member=m,
            )
    history = np.frombuffer(hb, dtype=_I32)
    target = int(np.frombuffer(members[TARGET], dtype=_I32)[0])
    user = int(np.frombuffer(members[USER], dtype=_I32)[0])
    if history.size and (int(history.min()) < 1 or int(history.max()) > num_items):
        bad = int(history[(history < 1) | (history > num_items)][0])
        raise ShardError(
            f"{url}: member {key}.{HISTORY} holds item id {bad} outside [1, {num_items}]",
            url=url, key=key, member=HISTORY,
        )
    if target < 1 or target > num_items:
        raise ShardError(
            f"{url}: member {key}.{TARGET} holds item id {target} outside [1, {num_items}]",
            url=url, key=key, member=TARGET,
        )
    if user < 0:
        raise ShardError(
            f"{url}: member {key}.{USER} holds negative user index {user}",
            url=url, key=key, member=USER,
        )
    if not with_seen:
        return history, target, user
    seen = history
    if SEEN in members:
        sb = members[SEEN]
        if len(sb) % 4 != 0:
            raise ShardError(f"{url}: member {key}.{SEEN} has {len(sb)} bytes; expected a multiple of 4",
                             url=url, key=key, member=SEEN)
        seen = np.frombuffer(sb, dtype=_I32)
        if seen.size and (int(seen.min()) < 1 or int(seen.max()) > num_items):
            bad = int(seen[(seen < 1) | (seen > num_items)][0])
            raise ShardError(f"{url}: member {key}.{SEEN} holds item id {bad} outside [1, {num_items}]",
                             url=url, key=key, member=SEEN)
    return history, target, user, seen
