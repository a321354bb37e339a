"""Streaming one shard's blocks through :mod:`tarfile`, verified before anything is used.

The shard is opened with :func:`shards.storage.open_retrying` (any fsspec URL; a cut
S3 body is resumed at the byte offset) and read sequentially (``tarfile`` stream mode,
plain or gzip). Each block's members are collected, their declared sizes checked against
what the manifest's block entry allows *before* they are read (a hostile size cannot make
the reader allocate more than the manifest allows), and the block is decoded and verified
(:func:`shards.format.decode_block`) before it is handed on. Blocks not wanted by the
caller are not decoded, but their structure and checksum are still checked (so damage is
named by its block whichever blocks the caller wanted). At the end of the shard its size
and sha256 are compared with the manifest (covers the tar headers and padding as well).

Only regular members are accepted, which is all the builder writes: inside its iteration
:mod:`tarfile` reads a pax or GNU long-name header's whole declared size into memory (and
follows a GNU sparse header's map), before the caller sees any member, so such entries
are refused from their header alone (:class:`_PlainTarInfo`). Together with the size
limits, reading a shard never holds more than one block of the manifest's size.
"""

from __future__ import annotations

import tarfile
from typing import Any, Dict, Iterator, Mapping, Optional, Set, Tuple

from .format import Block, ShardError, block_sha256, decode_block, member_size_limit, shard_url
from .storage import RetriesExhausted, open_retrying


class _Refused(tarfile.TarError):
    """A tar entry refused from its header alone (``member``: its name)."""

    def __init__(self, member: str, msg: str) -> None:
        super().__init__(msg)
        self.member = member


class _PlainTarInfo(tarfile.TarInfo):
    """``TarInfo`` that lets only regular members through: an extension header (pax, GNU
    long name / link, sparse, ...) raises :class:`_Refused` before anything it declares is read."""

    def _proc_member(self, tf: Any) -> Any:  # tarfile's documented hook for subclasses
        if self.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise _Refused(self.name, f"tar entry {self.name!r} of type {self.type!r} declaring {self.size} bytes "
                                      "is not a regular member (seq-v2 shards hold only those; refused unread)")
        return super()._proc_member(tf)


class _Hashing:
    """Read-through file wrapper counting bytes and their sha256."""

    def __init__(self, f: Any) -> None:
        import hashlib

        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.bytes += len(b)
        return b


def read_shard(manifest: Mapping[str, Any], base_url: str, s: int, wanted: Set[int],
               io_attempts: int = 5) -> Iterator[Tuple[int, Block]]:
    """``(position in shard, verified Block)`` for the blocks at positions ``wanted`` of shard
    ``s``, in storage order. Raises :class:`~shards.format.ShardError` naming the shard URL
    and block (and member) on any damage."""
    sh = manifest["shards"][s]
    url = shard_url(base_url, sh["name"])
    entries = sh["blocks"]
    pos = 0

    def err(msg: str, member: Optional[str] = None) -> ShardError:
        k = entries[min(pos, len(entries) - 1)]["key"]
        return ShardError(f"{url} [block {k}]: {msg}", url=url, key=k, member=member)

    try:
        f = open_retrying(url, attempts=io_attempts)
    except OSError as e:
        raise err(f"cannot open shard: {type(e).__name__}: {e}") from e
    with f:
        hf = _Hashing(f)
        try:
            with tarfile.open(fileobj=hf, mode="r|*", tarinfo=_PlainTarInfo) as tf:  # type: ignore[call-overload]
                key: Optional[str] = None
                mem: Dict[str, bytes] = {}
                for ti in tf:
                    k, _, ext = ti.name.partition(".")
                    if k != key:
                        if key is not None:
                            yield from _finish(err, manifest, url, entries, pos, key, mem, wanted)
                            pos += 1
                        if pos >= len(entries):
                            raise err(f"tar holds more blocks than the manifest's {len(entries)} (stale manifest "
                                      "or appended data)")
                        key, mem = k, {}
                    if ext in mem or "/" in ti.name:
                        raise err(f"tar entry {ti.name!r} is nested or appears twice", ti.name)
                    if ti.size > member_size_limit(ext, entries[pos]):
                        raise err(f"member {ti.name!r} declares {ti.size} bytes, more than block "
                                  f"{entries[pos]['key']} of the manifest can hold (corrupt or hostile shard)", ti.name)
                    mem[ext] = tf.extractfile(ti).read()  # type: ignore[union-attr]
                if key is not None:
                    yield from _finish(err, manifest, url, entries, pos, key, mem, wanted)
                    pos += 1
            while hf.read(1 << 20):  # trailing padding, for the shard checksum
                pass
        except _Refused as e:
            raise err(f"corrupt or hostile tar: {e}", e.member) from e
        except RetriesExhausted as e:
            raise err(f"storage read failed (retries used up, not a damaged file): {e}") from e
        except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
            raise err(f"corrupt or truncated tar: {type(e).__name__}: {e}") from e
    if pos != len(entries):
        raise err(f"shard ends after {pos} of {len(entries)} blocks (truncated shard or stale manifest)")
    if hf.bytes != sh["bytes"] or hf.sha.hexdigest() != sh["sha256"]:  # every block verified: not one's fault
        raise ShardError(f"{url}: shard is {hf.bytes} bytes with sha256 {hf.sha.hexdigest()[:16]}...; the manifest "
                         f"says {sh['bytes']} / {sh['sha256'][:16]}... (corrupt tar headers or padding, appended "
                         "data, or a stale manifest)", url=url)


def _finish(err: Any, manifest: Mapping[str, Any], url: str, entries: Any, pos: int, key: str,
            mem: Dict[str, bytes], wanted: Set[int]) -> Iterator[Tuple[int, Block]]:
    rec = entries[pos]
    if key != rec["key"]:
        raise err(f"tar holds block {key!r} at position {pos}; the manifest lists {rec['key']!r} there "
                  "(stale manifest or foreign shard)")
    names = manifest["block_members"]
    if sorted(mem) != sorted(names):
        raise err(f"block members {sorted(mem)}, expected {names} (truncated or foreign shard)")
    if pos in wanted:
        yield pos, decode_block(mem, rec, manifest, f"{url} [block {key}]")
    elif block_sha256(mem) != rec["sha256"]:
        raise err("checksum mismatch (corrupt block, or the manifest is stale)")
