"""Shards on a real S3-protocol server (moto's, see the ``s3_server`` fixture in conftest.py).

Built straight to ``s3://`` by the synthetic builder through fsspec; read by 2 ranks x 2
DataLoader workers in separate processes; a TCP proxy that cuts responses mid-body
exercises the retry path of :mod:`shards.storage`; plain webdataset reads the same
samples through the fsspec gopen handler of :mod:`shards.wds`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tarfile
import threading
import time
from collections import Counter

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader

from distributed_harness import run_distributed
from shards.reader import ShardReader, plan_batches, steps_per_epoch
from shards.schema import ShardError
from test_reader_resume import write_shards
from recsys_dist.config import REPO_ROOT

pytest.importorskip("s3fs")
pytest.importorskip("moto")

MAX_LEN = 20  # >= max_seq_len: histories are never truncated, so j = len(history) + 1
PREFIX = "synth"
_KEY = re.compile(r"^(train|val|test)-(\d{8})-(\d{5})$")


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def s3_data(s3_server):
    """Tiny synthetic dataset written to S3 by the regular (fsspec) builder: train has
    5 shards (100, 100, 100, 100, 28 samples), val and test one shard each."""
    from shards.synthetic import synth_shards

    url = f"s3://{s3_server.bucket}/{PREFIX}"
    m = synth_shards(url, num_items=300, num_users=60, min_seq_len=5, max_seq_len=MAX_LEN, max_len=MAX_LEN,
                     num_interests=5, seed=1, samples_per_shard=100, chunk_users=25, progress=False)
    assert [sh["num_samples"] for sh in m["splits"]["train"]["shards"]] == [100, 100, 100, 100, 28]
    assert len(m["splits"]["val"]["shards"]) == 1
    return url, m


def tar_keys(url: str, manifest: dict, split: str) -> Counter:
    """(user, j) of every sample, from the tar member names (independent of ShardReader)."""
    keys: Counter = Counter()
    for sh in manifest["splits"][split]["shards"]:
        with fsspec.open(f"{url}/{sh['name']}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for ti in tf:
                k, ext = ti.name.split(".", 1)
                if ext == "target.i32":
                    mt = _KEY.match(k)
                    keys[(int(mt.group(2)), int(mt.group(3)))] += 1
    return keys


def batch_keys(b) -> list:
    lens = (b["history"] != 0).sum(1).tolist()
    return [(u, n + 1) for u, n in zip(b["user"].tolist(), lens)]


def _rank_reads(url, specs):
    """Runs in each rank process (gloo): for each spec read the given epochs through a
    DataLoader with persistent workers; ``sync`` adds one all_reduce per batch, as DDP's
    gradient sync does (a rank with fewer batches would leave the other blocked)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, split, batch_size, num_workers, kw, epochs, sync in specs:
        rd = ShardReader(url, split, batch_size, rank=rank, world_size=world, **kw)
        # fork as under torchrun (the harness's spawn would otherwise be inherited: slow imports)
        dl = DataLoader(rd, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                        multiprocessing_context="fork" if num_workers > 0 else None)
        runs = []
        for epoch in epochs:
            rd.set_epoch(epoch)
            nb, keys = 0, []
            for b in dl:
                nb += 1
                keys += batch_keys(b)
                if sync:
                    t = torch.ones(1)
                    dist.all_reduce(t)
                    assert int(t) == world
            runs.append((nb, keys))
        out[name] = {"runs": runs, "io_retries": rd.io_retries}
    dist.barrier()
    return out


class FaultyProxy:
    """Threaded HTTP proxy on 127.0.0.1 in front of the S3 server (a real network fault, no patch).

    Each request is forwarded verbatim on a fresh upstream connection. The first
    ``faults`` GETs of a shard object whose ``Range`` starts at byte >= ``min_start``
    get the full response headers and half of the body, then the client socket is
    closed: the client library sees a truncated body (``ClientPayloadError``).
    """

    def __init__(self, upstream_host, upstream_port, faults=0, min_start=1, path_re=r"/(train|val|test)-\d+\.tar"):
        self.upstream = (upstream_host, upstream_port)
        self.min_start = min_start
        self.path_re = re.compile(path_re)
        self.lock = threading.Lock()
        self.faults_left = faults
        self.faulted = []  # (path, range start)
        self.requests = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, faults):
        with self.lock:
            self.faults_left, self.faulted = faults, []

    def close(self):
        self._stop = True
        self.sock.close()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_head(sock, buf):
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return None, buf
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n", rest

    @staticmethod
    def _headers(head):
        lines = head.decode("latin-1").split("\r\n")
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        return lines[0], hdrs

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                head, buf = self._read_head(conn, buf)
                if head is None:
                    return
                first, hdrs = self._headers(head)
                n = int(hdrs.get("content-length", 0))
                while len(buf) < n:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:n], buf[n:]
                method, path = first.split(" ")[:2]
                m = re.match(r"bytes=(\d+)-", hdrs.get("range", ""))
                start = int(m.group(1)) if m else 0
                fault = False
                with self.lock:
                    self.requests += 1
                    if method == "GET" and self.path_re.search(path) and start >= self.min_start \
                            and self.faults_left > 0:
                        self.faults_left -= 1
                        self.faulted.append((path, start))
                        fault = True
                # forward with "Connection: close" so that the response ends at upstream EOF
                lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(b"connection:")]
                req = b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body
                with socket.create_connection(self.upstream) as up:
                    up.sendall(req)
                    resp = b""
                    while True:
                        chunk = up.recv(65536)
                        if not chunk:
                            break
                        resp += chunk
                rhead, rbody = resp.split(b"\r\n\r\n", 1)
                if fault:
                    conn.sendall(rhead + b"\r\n\r\n" + rbody[: max(1, len(rbody) // 2)])
                    return  # close mid-body
                conn.sendall(resp)
                _, rh = self._headers(rhead + b"\r\n\r\n")
                if rh.get("connection", "").lower() == "close" or "content-length" not in rh:
                    return
        except OSError:
            return
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


# --------------------------------------------------------------------------- retry layer, locally


class FlakyFS(LocalFileSystem):
    """``flaky://`` = the local filesystem with scripted faults (registered with fsspec, so
    the reader opens it like any URL). ``read_faults[path]``: byte offsets at which a read
    fails once each (a read spanning one first returns the bytes before it, like a socket);
    ``"eof@N"`` silently ends the body at N instead; ``open_faults[path]``: how many opens fail."""

    protocol = ("flaky",)
    read_faults: dict = {}
    open_faults: dict = {}
    opens: Counter = Counter()

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        FlakyFS.opens[path] += 1
        if FlakyFS.open_faults.get(path, 0) > 0:
            FlakyFS.open_faults[path] -= 1
            raise ConnectionRefusedError(f"scripted: connection refused opening {path}")
        return _FlakyFile(path, super()._open(path, mode, block_size, **kwargs))


class _FlakyFile:
    def __init__(self, path, f):
        self.path, self.f = path, f
        self.size = os.path.getsize(path)

    def read(self, n=-1):
        pos = self.f.tell()
        n = self.size - pos if n is None or n < 0 else n
        faults = FlakyFS.read_faults.get(self.path, [])
        for i, fault in enumerate(faults):
            eof = isinstance(fault, str)
            at = int(fault[4:]) if eof else fault
            if pos <= at < pos + n or (eof and pos == at):
                if at > pos:
                    return self.f.read(at - pos)
                del faults[i]
                if eof:
                    return b""
                raise ConnectionResetError(f"scripted: connection reset by peer at {at}")
        return self.f.read(n)

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def seekable(self):
        return True

    def close(self):
        self.f.close()


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


def _read_users(url, **kw):
    return [u for b in ShardReader(url, "train", 5, **kw) for u in b["user"].tolist()]


@pytest.mark.parametrize("compress", [False, True])
def test_reopen_at_offset_is_transparent_to_streaming_tar(tmp_path, caplog, compress):
    """Resets mid-member, mid-header, right at a read boundary, a silently short body and a
    refused open: the tar stream (plain or gzip) never notices; each reopen is counted and
    logged with URL and offset."""
    root = str(tmp_path / "d")
    m = write_shards(root, [37, 23, 11], compress=compress)
    names = [sh["name"] for sh in m["splits"]["train"]["shards"]]
    paths = [os.path.join(root, n) for n in names]
    expected = _read_users(root, shuffle=True, seed=4)
    size = [sh["bytes"] for sh in m["splits"]["train"]["shards"]]
    a, b, c, d = size[0] // 7, size[0] // 2, size[0] * 3 // 4, size[1] // 3
    if not compress:
        a, c = 700, 2048 + 100  # inside the first member's data; inside the third header
    # a read spanning a fault returns the bytes before it, so the next read starts right at it
    FlakyFS.read_faults = {paths[0]: [a, a, *sorted([b, c])], paths[1]: [f"eof@{d}", d + 1], paths[2]: [size[2] // 2]}
    FlakyFS.open_faults = {paths[2]: 2}
    FlakyFS.opens.clear()
    with caplog.at_level(logging.WARNING, logger="shards.storage"):
        rd = ShardReader("flaky://" + root, "train", 5, shuffle=True, seed=4, io_base_delay=0.001)
        got = [u for b in rd for u in b["user"].tolist()]
    assert got == expected
    assert rd.io_retries == 9 == len(caplog.records)
    assert all(v == [] for v in FlakyFS.read_faults.values())
    assert FlakyFS.opens[paths[0]] == 5 and FlakyFS.opens[paths[2]] == 4
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"flaky://{root}/{names[0]}: transient ConnectionResetError at byte offset {b} (attempt 1/5)"
               in s for s in msgs)
    assert any(f"offset {a} (attempt 2/5)" in s for s in msgs)  # the same spot twice: a streak
    assert any(f"{names[1]}: transient PrematureEOF at byte offset {d}" in s for s in msgs)
    assert any(f"{names[2]}: transient ConnectionRefusedError at byte offset 0" in s for s in msgs)


def test_retries_exhausted_and_permanent_errors(tmp_path):
    from shards.storage import RetriesExhausted, open_retrying

    root = str(tmp_path / "d")
    m = write_shards(root, [20])
    path = os.path.join(root, m["splits"]["train"]["shards"][0]["name"])
    url = "flaky://" + path
    # 4 failures in a row at one offset: the 5th attempt succeeds; 5 in a row: give up
    FlakyFS.read_faults = {path: [100] * 4}
    assert len(_read_users("flaky://" + root, io_base_delay=0)) == 20
    FlakyFS.read_faults = {path: [100] * 5}
    with pytest.raises(ShardError, match=re.escape(url) + r": storage read failed after 0 sample\(s\).*"
                       r"read failed 5 time\(s\) in a row at byte offset 100") as ei:
        _read_users("flaky://" + root, io_base_delay=0)
    assert isinstance(ei.value.__cause__, RetriesExhausted) and ei.value.url == url
    # io_attempts=1: no retry at all
    FlakyFS.read_faults = {path: [100]}
    with pytest.raises(ShardError, match=re.escape(url)):
        _read_users("flaky://" + root, io_attempts=1)
    FlakyFS.read_faults = {}
    # a missing object / a permission problem is raised at once, never retried
    calls, slept = [], []
    with pytest.raises(FileNotFoundError):
        open_retrying("flaky://" + root + "/nope.tar", on_retry=lambda *a: calls.append(a))
    assert calls == []
    from shards.storage import RetryingFile

    def denied(u):
        raise PermissionError(13, "scripted: access denied", u)

    with pytest.raises(PermissionError):
        RetryingFile(url, opener=denied, on_retry=lambda *a: calls.append(a))
    assert calls == []
    # an object replaced between two opens is not spliced
    from shards.storage import ObjectChanged

    f = open_retrying(url)
    head = f.read(100)
    with open(path, "ab") as g:
        g.write(b"\0" * 512)
    FlakyFS.read_faults = {path: [150]}
    assert len(head + f.read(50)) == 150
    with pytest.raises(ObjectChanged, match=re.escape(url) + ".*changed while being read.*offset 150"):
        f.read(10)
    assert f.retries == 1
    f.close()
    # backoff: exponential, jittered into [0.5, 1) x, capped
    FlakyFS.open_faults = {path: 6}
    with pytest.raises(RetriesExhausted, match="open failed 6 time"):
        RetryingFile(url, attempts=6, base_delay=0.1, max_delay=0.5, sleep=slept.append)
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(slept) == 5 and all(0.5 * c <= d < c for d, c in zip(slept, caps))
    FlakyFS.open_faults = {}


def test_error_classification():
    import errno
    import http.client
    import io as _io

    import aiohttp
    import botocore.exceptions as bx

    from shards.storage import ObjectChanged, RetriesExhausted, is_transient

    transient = [ConnectionResetError(), BrokenPipeError(), ConnectionAbortedError(), TimeoutError(),
                 http.client.IncompleteRead(b"x", 10), aiohttp.ClientPayloadError("cut"),
                 aiohttp.ServerDisconnectedError(), bx.ReadTimeoutError(endpoint_url="http://x"),
                 bx.EndpointConnectionError(endpoint_url="http://x"),
                 bx.ConnectionClosedError(endpoint_url="http://x"), bx.IncompleteReadError(actual_bytes=1,
                 expected_bytes=2), OSError(errno.EIO, "I/O error"), OSError("s3fs: 503 SlowDown")]
    permanent = [FileNotFoundError(), PermissionError(), IsADirectoryError(), ValueError("closed file"),
                 OSError(errno.EINVAL, "bad range"), _io.UnsupportedOperation(), KeyError("x"),
                 RetriesExhausted("u", 0, 1, ConnectionResetError()), ObjectChanged("u: replaced")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_s3_endpoint_comes_from_the_environment(monkeypatch):
    from shards.storage import s3_endpoint_from_env, storage_options

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    assert s3_endpoint_from_env() is None and storage_options("s3://b/k") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage_options("s3://b/k") == {"endpoint_url": "http://127.0.0.1:9"}
    assert storage_options("/local/path") == {} and storage_options("gcs://b/k") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # service-specific wins
    assert storage_options("s3://b/k") == {"endpoint_url": "http://127.0.0.1:10"}
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": "http://cfg"}})
    assert storage_options("s3://b/k") == {}  # fsspec configuration wins, untouched
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage_options("s3://b/k") == {}


# --------------------------------------------------------------------------- S3 tests


def test_two_ranks_two_workers_every_sample_once(s3_data):
    """2 ranks (separate processes) x 2 DataLoader workers reading from S3: every (user, j)
    exactly once per epoch, two epochs with different shuffles; one shard for 4 readers
    (sample-level split) works and does not hang; uneven plans + max_batches give both
    ranks the same batch count, under a per-batch all_reduce like DDP's."""
    url, m = s3_data
    train, val = tar_keys(url, m, "train"), tar_keys(url, m, "val")
    assert sum(train.values()) == m["splits"]["train"]["num_samples"] == 428 and max(train.values()) == 1
    plan = plan_batches(m, "train", 16, 2, 2, drop_last=False)
    steps = steps_per_epoch(m, "train", 16, 2, 2, drop_last=False)
    assert plan == [15, 14] and steps == 14  # rank 0 holds the 28-sample shard too
    specs = [
        ("train", "train", 32, 2, dict(shuffle=True, seed=5, shuffle_buffer=50), [0, 1], False),
        ("val", "val", 8, 2, dict(shuffle=True, seed=5), [0], False),
        ("capped", "train", 16, 2, dict(shuffle=True, seed=5, max_batches=steps), [0], True),
    ]
    res = run_distributed(_rank_reads, 2, url, specs, timeout_s=240)
    for epoch in (0, 1):
        got = Counter(k for r in res for k in r["train"]["runs"][epoch][1])
        assert got == train, f"epoch {epoch}: missing {train - got}, extra {got - train}"
        assert [r["train"]["runs"][epoch][0] for r in res] == plan_batches(m, "train", 32, 2, 2, False)
    assert any(r["train"]["runs"][0][1] != r["train"]["runs"][1][1] for r in res)  # reshuffled
    got = Counter(k for r in res for k in r["val"]["runs"][0][1])
    assert got == val and len(m["splits"]["val"]["shards"]) == 1 < 4
    counts = [r["capped"]["runs"][0][0] for r in res]
    assert counts == [steps, steps]
    capped = Counter(k for r in res for k in r["capped"]["runs"][0][1])
    assert max(capped.values()) == 1 and set(capped) <= set(train)
    used = sum(p["samples"] - p["leftover_samples"] for p in
               (ShardReader(url, "train", 16, rank=r, world_size=2, max_batches=steps).epoch_plan(2) for r in (0, 1)))
    assert sum(capped.values()) == used == 412
    assert all(r[name]["io_retries"] == 0 for r in res for name in ("train", "val", "capped"))


def test_truncated_responses_are_retried(s3_data, s3_server, monkeypatch, caplog):
    """A proxy cuts shard GETs mid-body (after the headers) more often than s3fs retries on
    its own: the reader reopens at the offset reached and still yields every sample once;
    with ``io_attempts=1`` the same fault is a ShardError naming the shard URL."""
    url, m = s3_data
    expected = tar_keys(url, m, "train")
    proxy = FaultyProxy(s3_server.host, s3_server.port)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        # 32 KiB blocks: several ranged GETs per shard, so faults hit the middle of a shard
        monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": 32 * 1024})
        faults = 8  # s3fs itself retries a cut body 5 times (S3FileSystem.retries)
        proxy.reset(faults)
        t0 = time.time()
        with caplog.at_level(logging.WARNING, logger="shards.storage"):
            rd = ShardReader(url, "train", 64, shuffle=True, seed=2, io_base_delay=0.01, io_max_delay=0.05)
            got = Counter(k for b in rd for k in batch_keys(b))
        assert got == expected
        assert len(proxy.faulted) == faults and all(start > 0 for _, start in proxy.faulted)
        assert rd.io_retries >= 1
        msgs = [r.getMessage() for r in caplog.records if r.name == "shards.storage"]
        assert len(msgs) == rd.io_retries
        shard_path = proxy.faulted[-1][0].split("?")[0]
        hit = [s for s in msgs if re.search(r"s3://.*\.tar: transient \w+ at byte offset [1-9]\d* \(attempt 1/5\)", s)]
        assert hit and any(shard_path.rsplit("/", 1)[1] in s for s in hit), msgs
        assert time.time() - t0 < 60

        proxy.reset(faults)
        rd = ShardReader(url, "train", 64, shuffle=True, seed=2, io_attempts=1)
        with pytest.raises(ShardError, match=re.escape(url) + r"/train-\d{5}\.tar: storage read failed") as ei:
            for _ in rd:
                pass
        assert ei.value.url.startswith(url + "/train-") and ei.value.member
        assert rd.io_retries == 0
    finally:
        proxy.close()


def test_missing_shard_object_fails_fast(s3_data, s3_server):
    url, m = s3_data
    fs = fsspec.filesystem("s3")
    src, dst = f"{s3_server.bucket}/{PREFIX}", f"{s3_server.bucket}/missing-one"
    fs.copy(f"{src}/manifest.json", f"{dst}/manifest.json")
    for sh in m["splits"]["train"]["shards"]:
        if sh["name"] != "train-00002.tar":
            fs.copy(f"{src}/{sh['name']}", f"{dst}/{sh['name']}")
    murl = f"s3://{dst}"
    gone = re.escape(f"{murl}/train-00002.tar")
    t0 = time.time()
    rd = ShardReader(murl, "train", 50)
    with pytest.raises(ShardError, match=gone + ": shard file not found"):
        for _ in rd:
            pass
    assert rd.io_retries == 0
    it = iter(DataLoader(ShardReader(murl, "train", 50, shuffle=True), batch_size=None, num_workers=2))
    with pytest.raises(ShardError, match=gone):  # inside DataLoader workers: raised, no hang
        for _ in it:
            pass
    # Shut the workers down now. Left to the garbage collector (the re-raised exception keeps
    # the iterator in a reference cycle), torch's __del__ may run after the index queues were
    # finalized and wait 2 x 5 s for workers that never get the stop message, possibly in
    # fsspec's I/O thread, which stalls every S3 read meanwhile.
    it._shutdown_workers()
    assert time.time() - t0 < 30
    # on_error="skip" reads the rest
    rd = ShardReader(murl, "train", 50, on_error="skip")
    assert sum(b["user"].numel() for b in rd) == 428 - 100 and rd.bad_shards == 1


def test_plain_webdataset_reads_s3_in_spawned_workers(s3_data):
    import webdataset as wds

    from shards.wds import gopen_fsspec, register_fsspec_gopen, webdataset_pipeline

    url, m = s3_data
    assert "s3" in register_fsspec_gopen() and wds.gopen_schemes["s3"] is gopen_fsspec
    expected = tar_keys(url, m, "train")
    ds = webdataset_pipeline(url, "train")
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got, names = Counter(), set()
    for s in dl:
        mt = _KEY.match(s["__key__"])
        assert (int(mt.group(2)), len(s["history"]) + 1) == (s["user"], int(mt.group(3)))
        got[(s["user"], len(s["history"]) + 1)] += 1
    assert got == expected
    # the same samples as ShardReader
    rd = Counter(k for b in ShardReader(url, "train", 100) for k in batch_keys(b))
    assert rd == got


# ---------------------------------------------------------------- training straight from S3

def _fit_from_s3(shards_url, ckpt_url, out_dir):
    from recsys_dist.config import load_config
    from recsys_dist.train.loop import fit

    cfg = load_config(str(REPO_ROOT / "configs/models/sasrec.yaml"), [
        "name=s3job", f"output_dir={out_dir}", "data.dataset=synthetic", f"data.shards_url={shards_url}",
        "data.build_if_missing=false", "data.max_len=10", "data.num_workers=2", "model.dim=16",
        "model.num_blocks=1", "train.batch_size=16", "train.max_steps=12", "train.log_every=4",
        "eval.batch_size=64", f"checkpoint.url={ckpt_url}", "checkpoint.every=6"])
    out = fit(cfg)
    return {"world": out["world_size"], "steps": out["steps"], "test_users": out["test"]["num_users"]}


@pytest.mark.slow
def test_train_two_ranks_two_workers_from_s3(s3_server, tmp_path):
    """The trainer itself (2 ranks x 2 DataLoader workers) streams its shards from S3 and writes
    its checkpoints there."""
    import fsspec
    from distributed_harness import synth_shards

    local = synth_shards(tmp_path / "synth", 300, 200, 150, 15)
    url = f"s3://{s3_server.bucket}/train-from-s3"
    fs = fsspec.filesystem("s3")
    fs.put(str(local) + "/", url + "/", recursive=True)
    ckpt = f"s3://{s3_server.bucket}/train-from-s3-ckpt"
    out = run_distributed(_fit_from_s3, 2, url, ckpt, str(tmp_path / "runs"))
    assert out[0] == out[1] == {"world": 2, "steps": 12, "test_users": 200}
    assert fs.exists(f"{ckpt}/step-00000012/checkpoint.json") and fs.exists(f"{ckpt}/step-00000006/checkpoint.json")
