"""Opening shard URLs (any fsspec URL) with retries for transient object-storage errors.

:func:`open_retrying` returns a read-only file object that survives connection
resets, broken pipes, truncated HTTP bodies and timeouts: on a *transient*
error (see :func:`is_transient`) during the open **or** during a read it closes
the underlying file, waits (exponential backoff with jitter), reopens the URL,
seeks to the byte offset it had reached and continues. The caller sees one
contiguous byte stream, so a streaming consumer (:class:`shards.tarstream.TarStream`,
gzip) is unaware of the reopen. A warning names the URL, the offset and
the attempt. After ``attempts`` consecutive failures without progress it
raises :class:`RetriesExhausted` (an ``OSError`` naming the URL and offset,
chained to the last error). A missing object (``FileNotFoundError``) or a
permission problem is never retried, and neither is an object that changed
between two opens (size or ETag differ: :class:`ObjectChanged`), since
continuing at the old offset would splice two versions.

The classification of errors lives in :data:`PERMANENT_ERRORS`,
:func:`transient_error_types` and :func:`is_transient`, nowhere else.

Retries stack with the client library's own: s3fs retries a request whose body
is cut (``ClientPayloadError``, ``IncompleteRead``, timeouts) up to
``S3FileSystem.retries`` (5) times with its own short backoff, and botocore
retries connection errors before a response. This layer catches what they give
up on and what they do not cover (e.g. an error on another request of the same
file, a premature end of the body), and it reopens the *file*, not just the
request.

S3 endpoint and credentials come only from the standard AWS environment
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance roles ...)
or from fsspec configuration (``fsspec.config.conf["s3"]``, ``FSSPEC_S3`` env
JSON, ``~/.config/fsspec/*.json``); nothing is hard-coded. botocore >= 1.31
(this project pins 1.43) reads ``AWS_ENDPOINT_URL`` itself, so s3fs honours it
without help. :func:`storage_options` nevertheless passes the endpoint from the
environment explicitly as ``endpoint_url`` (unless fsspec configuration sets
one): fsspec caches filesystem instances by their *arguments*, so without it a
process that changes ``AWS_ENDPOINT_URL`` after its first S3 access would keep
talking to the old endpoint through the cached instance.
"""

from __future__ import annotations

import errno
import http.client
import io
import logging
import os
import random
import time
from typing import Any, Callable, Dict, Optional, Tuple

import fsspec

log = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_DELAY = 0.2
DEFAULT_MAX_DELAY = 5.0


class RetriesExhausted(OSError):
    """A URL could not be opened or read after ``attempts`` consecutive transient failures.

    Attributes: ``url``, ``offset`` (byte offset reached), ``attempts``, ``last_error``.
    """

    def __init__(self, url: str, offset: int, attempts: int, last_error: BaseException) -> None:
        what = "open" if offset == 0 else "read"
        super().__init__(
            f"{url}: {what} failed {attempts} time(s) in a row at byte offset {offset}, giving up "
            f"(last error: {type(last_error).__name__}: {last_error})"
        )
        self.url = url
        self.offset = offset
        self.attempts = attempts
        self.last_error = last_error


class PrematureEOF(OSError):
    """The body ended before the object's known size (a truncated response that raised nothing)."""


class ObjectChanged(OSError):
    """The object was replaced while being read (size or ETag differ after a reopen): resuming
    at the old offset would splice two versions, so this is never retried."""


# --------------------------------------------------------------------------- classification

#: Never retried, even though some are ``OSError`` subclasses.
PERMANENT_ERRORS: Tuple[type, ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    io.UnsupportedOperation,
    RetriesExhausted,
    ObjectChanged,
)
#: ``OSError`` errnos that describe the request, not the network.
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL,
                     errno.EROFS, errno.ENOSPC, errno.EEXIST, errno.ENAMETOOLONG}

_TRANSIENT: Optional[Tuple[type, ...]] = None
_PERMANENT_EXTRA: Optional[Tuple[type, ...]] = None


def transient_error_types() -> Tuple[type, ...]:
    """Exception types that mean "the connection or the response broke; try again".

    Builtins (``ConnectionError`` = reset / aborted / refused / broken pipe,
    ``TimeoutError``, ``http.client.IncompleteRead``), aiohttp
    (``ClientPayloadError``, ``ClientConnectionError``, ``ServerDisconnectedError``,
    ``ServerTimeoutError``), botocore (``ConnectionError`` incl.
    ``EndpointConnectionError`` / ``ConnectTimeoutError``, ``HTTPClientError``
    incl. ``ReadTimeoutError`` / ``ConnectionClosedError`` /
    ``ResponseStreamingError``, ``IncompleteReadError``), urllib3 / requests
    (protocol errors, read timeouts, chunked-encoding errors), fsspec
    ``FSTimeoutError``, and our :class:`PrematureEOF`. Optional libraries are
    included only when installed.
    """
    global _TRANSIENT, _PERMANENT_EXTRA
    if _TRANSIENT is not None:
        return _TRANSIENT
    types: list = [ConnectionError, TimeoutError, http.client.IncompleteRead, http.client.BadStatusLine,
                   PrematureEOF]
    permanent: list = []
    try:
        import aiohttp

        types += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError,
                  aiohttp.ServerTimeoutError]
        permanent += [aiohttp.ClientSSLError, aiohttp.InvalidURL]
    except ImportError:  # pragma: no cover
        pass
    try:
        import botocore.exceptions as bx

        types += [bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError]
        permanent += [bx.SSLError] if hasattr(bx, "SSLError") else []
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3.exceptions as ux

        types += [ux.ProtocolError, ux.ReadTimeoutError, ux.IncompleteRead]
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests.exceptions as rx

        types += [rx.ConnectionError, rx.ChunkedEncodingError, rx.Timeout]
        permanent += [rx.SSLError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    _PERMANENT_EXTRA = tuple(permanent)
    _TRANSIENT = tuple(dict.fromkeys(types))
    return _TRANSIENT


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` is worth a retry (reopen + seek); False for missing objects, permissions,
    bad arguments, certificate errors and everything that is not I/O."""
    transient = transient_error_types()
    if isinstance(exc, PERMANENT_ERRORS) or isinstance(exc, _PERMANENT_EXTRA or ()):
        return False
    if isinstance(exc, transient):
        return True
    if isinstance(exc, OSError):  # EIO, s3fs-translated 5xx / SlowDown, ...
        return exc.errno not in _PERMANENT_ERRNOS
    return False


# --------------------------------------------------------------------------- endpoint / options


def s3_endpoint_from_env() -> Optional[str]:
    """The S3 endpoint the AWS environment asks for, as botocore reads it:
    ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; None if unset or if
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true. The only place this project reads them."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str) -> Dict[str, Any]:
    """Extra fsspec arguments for opening ``url``: for ``s3://`` the environment's endpoint
    (see the module docstring) unless fsspec configuration already names one; else ``{}``."""
    protocol = fsspec.utils.get_protocol(str(url))
    if protocol not in ("s3", "s3a"):
        return {}
    conf = fsspec.config.conf.get("s3", {}) or {}
    if conf.get("endpoint_url") or (conf.get("client_kwargs") or {}).get("endpoint_url"):
        return {}
    ep = s3_endpoint_from_env()
    return {"endpoint_url": ep} if ep else {}


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> Any:
    """``fsspec.open(url, mode, **storage_options(url), **kwargs).open()`` (no retries)."""
    return fsspec.open(url, mode, **{**storage_options(url), **kwargs}).open()


# --------------------------------------------------------------------------- retrying file


class RetryingFile(io.RawIOBase):
    """Read-only file over ``url`` that reopens and seeks on transient errors (see :func:`open_retrying`).

    Attributes: ``url``, ``retries`` (reopens done so far), ``offset`` (bytes delivered).
    """

    def __init__(
        self,
        url: str,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        on_retry: Optional[Callable[[str, int, BaseException], None]] = None,
        opener: Optional[Callable[[str], Any]] = None,
        sleep: Callable[[float], None] = time.sleep,
        **open_kwargs: Any,
    ) -> None:
        self._f: Any = None
        super().__init__()
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.url = str(url)
        self.attempts = int(attempts)
        self.base_delay = max(0.0, float(base_delay))
        self.max_delay = max(self.base_delay, float(max_delay))
        self.retries = 0
        self.offset = 0
        self._on_retry = on_retry
        self._opener = opener or (lambda u: open_url(u, "rb", **open_kwargs))
        self._sleep = sleep
        self._rand = random.Random(os.urandom(8))  # jitter; never touches the global RNGs
        self._size: Optional[int] = None
        self._etag: Optional[str] = None
        self._streak = 0  # consecutive failures without progress
        self._call(lambda: None)  # open now: a missing object fails here, unretried

    # ------------------------------------------------------------ internals

    def _open(self) -> None:
        f = self._opener(self.url)
        try:
            if self.offset:
                if f.seekable():
                    f.seek(self.offset)
                else:  # e.g. a pipe: skip what was delivered already
                    left = self.offset
                    while left:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            raise PrematureEOF(f"{self.url}: stream ended at {self.offset - left} while "
                                               f"skipping to {self.offset} after a reopen")
                        left -= len(chunk)
        except BaseException:
            _close_quietly(f)
            raise
        size = getattr(f, "size", None)
        size = size if isinstance(size, int) and not isinstance(size, bool) else None
        details = getattr(f, "details", None)
        etag = details.get("ETag") if isinstance(details, dict) else None
        if (size is not None and self._size is not None and size != self._size) or \
                (etag is not None and self._etag is not None and etag != self._etag):
            _close_quietly(f)
            raise ObjectChanged(f"{self.url}: object changed while being read (size {self._size} -> {size}, "
                                f"ETag {self._etag} -> {etag}); cannot continue at byte offset {self.offset}")
        self._size = size if size is not None else self._size
        self._etag = etag if etag is not None else self._etag
        self._f = f

    def _call(self, op: Callable[[], Any]) -> Any:
        while True:
            try:
                if self._f is None:
                    self._open()
                return op()
            except BaseException as e:  # noqa: BLE001 - classified below
                if not is_transient(e):
                    raise
                self._failed(e)

    def _failed(self, e: BaseException) -> None:
        _close_quietly(self._f)
        self._f = None
        self._streak += 1
        if self._streak >= self.attempts:
            raise RetriesExhausted(self.url, self.offset, self._streak, e) from e
        delay = min(self.max_delay, self.base_delay * 2 ** (self._streak - 1))
        delay *= 0.5 + 0.5 * self._rand.random()
        self.retries += 1
        log.warning("%s: transient %s at byte offset %d (attempt %d/%d): %s; reopening in %.2f s",
                    self.url, type(e).__name__, self.offset, self._streak, self.attempts, e, delay)
        if self._on_retry is not None:
            self._on_retry(self.url, self.offset, e)
        if delay > 0:
            self._sleep(delay)

    def _read_once(self, n: int) -> bytes:
        data = self._f.read(n) if n >= 0 else self._f.read()
        if not data and n != 0 and self._size is not None and self.offset < self._size:
            raise PrematureEOF(f"{self.url}: body ended at byte {self.offset} of {self._size}")
        return data

    # ------------------------------------------------------------ io API

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: Optional[int] = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        n = -1 if n is None else int(n)
        data = self._call(lambda: self._read_once(n))
        if data:
            self.offset += len(data)
            self._streak = 0
        return bytes(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: Any) -> int:
        data = self.read(len(memoryview(b)))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self.offset

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = int(pos)
        elif whence == io.SEEK_CUR:
            new = self.offset + int(pos)
        elif whence == io.SEEK_END:
            if self._size is None:
                raise io.UnsupportedOperation(f"{self.url}: size unknown, cannot seek from the end")
            new = self._size + int(pos)
        else:
            raise ValueError(f"bad whence {whence}")
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        if new != self.offset:
            self.offset = new
            self._streak = 0
            self._call(lambda: self._f.seek(new))
        return self.offset

    @property
    def size(self) -> Optional[int]:
        return self._size

    def close(self) -> None:
        if not self.closed:
            _close_quietly(self._f)
            self._f = None
        super().close()


def _close_quietly(f: Any) -> None:
    if f is None:
        return
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the connection is broken anyway
        pass


def open_retrying(
    url: str,
    mode: str = "rb",
    attempts: int = DEFAULT_ATTEMPTS,
    base_delay: float = DEFAULT_BASE_DELAY,
    max_delay: float = DEFAULT_MAX_DELAY,
    on_retry: Optional[Callable[[str, int, BaseException], None]] = None,
    **open_kwargs: Any,
) -> RetryingFile:
    """Open ``url`` (any fsspec URL) for reading, retrying transient errors.

    Args:
        url: the URL.
        mode: only ``"rb"``.
        attempts: tries per failure streak: after ``attempts`` consecutive transient
            failures without a byte of progress, :class:`RetriesExhausted` is raised
            (``attempts=1``: no retries). Progress resets the streak.
        base_delay, max_delay: the k-th consecutive retry waits
            ``min(max_delay, base_delay * 2**(k-1))`` times a jitter factor in [0.5, 1).
        on_retry: called as ``on_retry(url, offset, error)`` before each reopen.
        **open_kwargs: passed to :func:`fsspec.open` (e.g. ``block_size``).

    Raises:
        FileNotFoundError, PermissionError: at once, never retried.
        RetriesExhausted: retries used up (an ``OSError`` naming URL and offset).
    """
    if mode != "rb":
        raise ValueError(f"open_retrying reads only (mode 'rb'), got {mode!r}")
    return RetryingFile(url, attempts=attempts, base_delay=base_delay, max_delay=max_delay,
                        on_retry=on_retry, **open_kwargs)
