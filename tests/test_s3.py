"""``recsys-dist/seq-v2`` shards on a real S3-protocol server (moto's, see ``s3_server`` in conftest.py).

Built straight to ``s3://`` by the synthetic builder through fsspec; read by 2 ranks x 2
DataLoader workers in separate processes (the same batches as a local single-process read,
every sample once per epoch); a scripted fsspec filesystem (``flaky://``) and a TCP proxy
that cuts responses mid-body exercise the reopen-at-offset path of :mod:`shards.storage`
under the streaming tar reader; plain ``webdataset`` (no code of ours) reads the same
shards as ordinary samples, one per block.

Every expected sample is derived by definition from the records that plain webdataset
decodes (leave-one-out: ``target = items[j]``, ``history = items[:j]``, train ``j`` in
``[1, n - 2)``), not from our reader.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import socket
import tarfile
import threading
import time
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader

import shards.stream
from distributed_harness import run_distributed
from recsys_dist.config import REPO_ROOT
from shards.dataset import SequenceDataset
from shards.format import BLOCK_MEMBERS, ShardError, block_entries, load_manifest
from shards.plan import plan_batches, rank_plan, split_sizes
from shards.storage import open_retrying

pytest.importorskip("s3fs")
pytest.importorskip("moto")
wds = pytest.importorskip("webdataset")

MAX_LEN = 12  # < max_seq_len (20): long histories are truncated to their newest MAX_LEN items
PREFIX = "synth-v2"
NUM_USERS, RPB, BPS = 60, 8, 2  # 8 blocks (the last holds 4 records) in 4 shards


# --------------------------------------------------------------------------- data and helpers


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    """webdataset opener for ``s3://`` through plain fsspec, at the endpoint the AWS environment
    names (passed explicitly: fsspec caches instances by their arguments, and the proxy test
    changes the environment's endpoint for a while)."""
    return fsspec.open(url, mode, endpoint_url=os.environ["AWS_ENDPOINT_URL"]).open()


def register_s3_gopen(*_):
    """Also the DataLoader ``worker_init_fn`` (a spawned worker starts with webdataset's own table)."""
    wds.gopen_schemes["s3"] = _gopen_fsspec


def wds_blocks(urls):
    """Plain webdataset over ``urls``: one decoded sample per block (``.npy`` -> arrays)."""
    register_s3_gopen()
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())


def records_of(blocks):
    """{record id: (items, (train_end, valid_end))} from webdataset samples of blocks."""
    out = {}
    for s in blocks:
        off, items = s["offsets.npy"], s["items.npy"]
        for i, u in enumerate(s["records.npy"].tolist()):
            assert u not in out
            out[u] = (items[off[i]:off[i + 1]].tolist(), tuple(s["bounds.npy"][i].tolist()))
    return out


def expected_samples(recs, split, max_len=MAX_LEN):
    """Counter of (user, target, history) by the leave-one-out definition (n = sequence length):
    train j in [1, n - 2), valid j = n - 2, test j = n - 1; history = newest max_len of items[:j]."""
    out = Counter()
    for u, (s, bounds) in recs.items():
        n = len(s)
        assert bounds == (n - 2, n - 1)
        js = {"train": range(1, n - 2), "valid": [n - 2], "test": [n - 1]}[split]
        for j in js:
            h = s[:j][-max_len:]
            out[(u, s[j], (0,) * (max_len - len(h)) + tuple(h))] += 1
    return out


def rows(b):
    """(user, target, history) of every row of a batch (tensors or numpy arrays)."""
    return [(int(u), int(t), tuple(int(x) for x in h))
            for u, t, h in zip(np.asarray(b["user"]), np.asarray(b["target"]), np.asarray(b["history"]))]


def batches(ds, num_workers=0):
    dl = ds if num_workers == 0 else DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [rows(b) for b in dl]


def flat(bs):
    return [r for b in bs for r in b]


def s3fs_(s3_server):
    """An S3 filesystem on the server itself (explicit endpoint: never a cached proxied one)."""
    return fsspec.filesystem("s3", endpoint_url=s3_server.endpoint)


@pytest.fixture(scope="module")
def s3_data(s3_server, tmp_path_factory):
    """Tiny synthetic dataset written to S3 by the regular (fsspec) builder: 60 users in 8
    blocks of 8 records (the last 4) in 4 shards, users generated in chunks of 25 (the
    writer carries records over chunk ends). Returns (url, manifest, records decoded by
    plain webdataset, a local copy of the folder)."""
    from shards.synthetic import synth_shards

    url = f"s3://{s3_server.bucket}/{PREFIX}"
    m = synth_shards(url, num_items=300, num_users=NUM_USERS, min_seq_len=5, max_seq_len=20, num_interests=5,
                     seed=5, records_per_block=RPB, blocks_per_shard=BPS, chunk_users=25, progress=False)
    assert [len(sh["blocks"]) for sh in m["shards"]] == [2, 2, 2, 2]
    assert [b["num_records"] for _, _, b in block_entries(m)] == [8] * 7 + [4]
    local = tmp_path_factory.mktemp("s3copy") / "synth"
    s3fs_(s3_server).get(f"{s3_server.bucket}/{PREFIX}/", str(local) + "/", recursive=True)
    recs = records_of(wds_blocks([f"{url}/{sh['name']}" for sh in m["shards"]]))
    assert sorted(recs) == list(range(NUM_USERS))
    return url, m, recs, str(local)


# --------------------------------------------------------------------------- 2 ranks x 2 workers


def _rank_reads(url, specs, log_path):
    """Runs in each rank process (gloo): for each spec read the given epochs through one
    DataLoader (fresh workers each epoch, as the trainer's; persistent workers see ``set_epoch``
    too: test_set_epoch_reaches_persistent_workers); ``sync`` adds one all_reduce per batch, as DDP's
    gradient sync does (a rank with more batches would leave the other blocked).
    Warnings of shards.storage (retries) go to ``log_path``, from the DataLoader workers too."""
    import torch.distributed as dist

    h = logging.FileHandler(log_path)
    h.setLevel(logging.WARNING)
    logging.getLogger("shards.storage").addHandler(h)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, split, batch_size, num_workers, kw, epochs, sync in specs:
        ds = SequenceDataset(url, split, batch_size, rank, world, max_len=MAX_LEN, **kw)
        # fork as under torchrun (the harness's start method would otherwise be inherited)
        dl = DataLoader(ds, batch_size=None, num_workers=num_workers,
                        multiprocessing_context="fork" if num_workers > 0 else None)
        runs = []
        for epoch in epochs:
            ds.set_epoch(epoch)
            bs = []
            for b in dl:
                bs.append(rows(b))
                if sync:
                    t = torch.ones(1)
                    dist.all_reduce(t)
                    assert int(t) == world
            runs.append(bs)
        out[name] = {"runs": runs, "len": len(ds)}
    dist.barrier()
    return out


def test_two_ranks_two_workers_every_sample_once(s3_data, tmp_path):
    """2 ranks (separate processes) x 2 DataLoader workers reading from S3, 2 blocks a
    shuffle window: every training sample exactly once per epoch, two epochs shuffled
    differently, batch for batch what one local process reads from a copy of the shards for
    each rank; batch counts = plan_batches; with uneven plans, ``max_batches`` gives both
    ranks the same count (under a per-batch all_reduce like DDP's) and drops only the tail."""
    url, m, recs, local = s3_data
    train, valid = expected_samples(recs, "train"), expected_samples(recs, "valid")
    n = sum(train.values())
    assert m["num_samples"]["train"] == n and max(train.values()) == 1
    bs = 16
    plan = plan_batches(m, "train", bs, 2, drop_last=False)
    assert plan[0] == plan[1] + 1, (n, plan)  # uneven: rank 0's last batch is a single sample
    cap = min(plan)
    kw = dict(shuffle=True, seed=5, window_blocks=2)
    specs = [
        ("train", "train", bs, 2, kw, [0, 1], False),
        ("val", "val", 8, 2, {}, [0], False),
        ("capped", "train", bs, 2, dict(kw, max_batches=cap), [0], True),
    ]
    log_path = tmp_path / "storage-warnings.log"
    res = run_distributed(_rank_reads, 2, url, specs, str(log_path), timeout_s=300)
    for epoch in (0, 1):
        got = Counter(flat(b for r in res for b in r["train"]["runs"][epoch]))
        assert got == train, f"epoch {epoch}: missing {train - got}, extra {got - train}"
        assert [len(r["train"]["runs"][epoch]) for r in res] == plan == [r["train"]["len"] for r in res]
        for rank, r in enumerate(res):  # the same batches as one local process, any worker count
            ref = SequenceDataset(local, "train", bs, rank, 2, max_len=MAX_LEN, epoch=epoch, **kw)
            assert r["train"]["runs"][epoch] == batches(ref), (rank, epoch)
    for r in res:
        assert flat(r["train"]["runs"][0]) != flat(r["train"]["runs"][1])  # reshuffled
        assert Counter(flat(r["train"]["runs"][0])) == Counter(flat(r["train"]["runs"][1]))  # same samples
    assert Counter(flat(b for r in res for b in r["val"]["runs"][0])) == valid
    assert [len(r["capped"]["runs"][0]) for r in res] == [cap, cap]
    for r in res:  # the cap drops only the tail of the rank's stream
        assert r["capped"]["runs"][0] == r["train"]["runs"][0][:cap]
    assert sum(len(b) for r in res for b in r["capped"]["runs"][0]) == n - 1
    assert log_path.read_text() == ""  # no retry anywhere


def test_set_epoch_reaches_persistent_workers(tmp_path):
    root = str(tmp_path / "d")
    local_shards(root)
    ds = SequenceDataset(root, "train", 8, shuffle=True, seed=0)
    dl = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = [rows(b) for b in dl]
    assert got == batches(SequenceDataset(root, "train", 8, shuffle=True, seed=0, epoch=1))


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


@pytest.fixture
def flaky():
    FlakyFS.read_faults, FlakyFS.open_faults = {}, {}
    FlakyFS.opens.clear()
    yield FlakyFS
    FlakyFS.read_faults, FlakyFS.open_faults = {}, {}


@pytest.fixture
def fast_retries(monkeypatch):
    """The reader's retries with a 1 ms base delay (SequenceDataset exposes only io_attempts)."""
    monkeypatch.setattr(shards.stream, "open_retrying", functools.partial(open_retrying, base_delay=0.001))


def local_shards(root, compress=False):
    """22 users in 6 blocks of 4 records (the last 2) in 3 shards on local disk."""
    from shards.synthetic import synth_shards

    m = synth_shards(str(root), num_items=200, num_users=22, min_seq_len=5, max_seq_len=30, num_interests=4,
                     seed=3, records_per_block=4, blocks_per_shard=2, compress=compress, progress=False)
    assert len(m["shards"]) == 3
    return m


def _read(url, **kw):
    return batches(SequenceDataset(url, "train", 5, max_len=MAX_LEN, **kw))


@pytest.mark.parametrize("compress", [False, True])
def test_reopen_at_offset_is_transparent_to_streaming_tar(tmp_path, caplog, flaky, fast_retries, compress):
    """Resets mid-member, mid-header, right at a read boundary, a silently short body and
    refused opens: the tar stream (plain or gzip) never notices (the same batches as a read
    without faults); each reopen is logged with URL and offset."""
    root = str(tmp_path / "d")
    m = local_shards(root, compress)
    names = [sh["name"] for sh in m["shards"]]
    assert all(n.endswith(".tar.gz" if compress else ".tar") for n in names)
    paths = [os.path.join(root, n) for n in names]
    kw = dict(shuffle=True, seed=4)  # every shard is opened once per epoch (then reopened per fault)
    expected = _read(root, **kw)
    size = [sh["bytes"] for sh in m["shards"]]
    a, b, c, d = size[0] // 7, size[0] // 2, size[0] * 3 // 4, size[1] // 3
    if not compress:
        with tarfile.open(paths[0]) as tf:
            mem = tf.getmembers()
        a, c = mem[0].offset_data + 50, mem[2].offset + 100  # inside the first member's data; the third header
        assert a < mem[0].offset_data + mem[0].size and mem[2].offset < c < mem[2].offset_data
    # a read spanning a fault returns the bytes before it, so the next read starts right at it
    flaky.read_faults = {paths[0]: [a, a, *sorted([b, c])], paths[1]: [f"eof@{d}", d + 1], paths[2]: [size[2] // 2]}
    flaky.open_faults = {paths[2]: 2}
    with caplog.at_level(logging.WARNING, logger="shards.storage"):
        got = _read("flaky://" + root, **kw)
    assert got == expected
    msgs = [r.getMessage() for r in caplog.records if r.name == "shards.storage"]
    assert len(msgs) == 9, msgs
    assert all(v == [] for v in flaky.read_faults.values()) and flaky.open_faults[paths[2]] == 0
    assert [flaky.opens[p] for p in paths] == [5, 3, 4]
    assert any(f"flaky://{root}/{names[0]}: transient ConnectionResetError at byte offset {b} (attempt 1/5)"
               in s for s in msgs)
    assert any(f"{names[0]}: transient ConnectionResetError at byte offset {a} (attempt 2/5)" in s
               for s in msgs)  # the same spot twice: a streak
    assert any(f"{names[1]}: transient PrematureEOF at byte offset {d}" in s for s in msgs)
    assert any(f"{names[2]}: transient ConnectionRefusedError at byte offset 0 (attempt 2/5)" in s for s in msgs)


def test_retries_exhausted_and_permanent_errors(tmp_path, flaky, fast_retries):
    from shards.storage import ObjectChanged, RetriesExhausted, RetryingFile

    root = str(tmp_path / "d")
    m = local_shards(root)
    name = m["shards"][0]["name"]
    path = os.path.join(root, name)
    url = f"flaky://{root}/{name}"
    expected = _read(root)
    # 4 failures in a row at one offset: the 5th attempt succeeds; 5 in a row: give up
    flaky.read_faults = {path: [100] * 4}
    assert _read("flaky://" + root) == expected
    flaky.read_faults = {path: [100] * 5}
    with pytest.raises(ShardError, match=re.escape(url) + r" \[block block-000000\]: .*"
                       r"read failed 5 time\(s\) in a row at byte offset 100") as ei:
        _read("flaky://" + root)
    assert isinstance(ei.value.__cause__, RetriesExhausted) and ei.value.url == url
    assert ei.value.__cause__.url == url and ei.value.__cause__.offset == 100
    # io_attempts=1: no retry at all
    flaky.read_faults = {path: [100]}
    with pytest.raises(ShardError, match=re.escape(url)) as ei:
        _read("flaky://" + root, io_attempts=1)
    assert isinstance(ei.value.__cause__, RetriesExhausted) and ei.value.__cause__.attempts == 1
    flaky.read_faults = {}
    # a missing object / a permission problem is raised at once, never retried
    calls, slept = [], []
    with pytest.raises(FileNotFoundError):
        open_retrying("flaky://" + root + "/nope.tar", on_retry=lambda *a: calls.append(a))
    assert calls == []

    def denied(u):
        raise PermissionError(13, "scripted: access denied", u)

    with pytest.raises(PermissionError):
        RetryingFile(url, opener=denied, on_retry=lambda *a: calls.append(a))
    assert calls == []
    # an object replaced between two opens is not spliced
    f = open_retrying(url)
    head = f.read(100)
    with open(path, "ab") as g:
        g.write(b"\0" * 512)
    flaky.read_faults = {path: [150]}
    assert len(head + f.read(50)) == 150
    with pytest.raises(ObjectChanged, match=re.escape(url) + ".*changed while being read.*offset 150"):
        f.read(10)
    assert f.retries == 1
    f.close()
    # backoff: exponential, jittered into [0.5, 1) x, capped
    flaky.open_faults = {path: 6}
    with pytest.raises(RetriesExhausted, match="open failed 6 time"):
        RetryingFile(url, attempts=6, base_delay=0.1, max_delay=0.5, sleep=slept.append)
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(slept) == 5 and all(0.5 * c <= d < c for d, c in zip(slept, caps))


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


# --------------------------------------------------------------------------- faults on the wire


class FaultyProxy:
    """Threaded HTTP proxy on 127.0.0.1 in front of the S3 server (a real network fault, no patch).

    Each request is forwarded verbatim on a fresh upstream connection. The first
    ``faults`` GETs of a shard object whose ``Range`` starts at byte >= ``min_start``
    get the full response headers and half of the body, then the client socket is
    closed: the client library sees a truncated body (``ClientPayloadError``).
    """

    def __init__(self, upstream_host, upstream_port, faults=0, min_start=1, path_re=r"/seq-\d+\.tar"):
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


def test_truncated_responses_are_retried(s3_data, s3_server, monkeypatch, caplog):
    """A proxy cuts shard GETs mid-body (after the headers) more often than s3fs retries on
    its own: the reader reopens at the offset reached and still yields every sample once
    (the same batches as without faults); with ``io_attempts=1`` the same fault is a
    ShardError naming the shard URL and block."""
    url, m, recs, local = s3_data
    kw = dict(shuffle=True, seed=2, max_len=MAX_LEN)
    expected = batches(SequenceDataset(local, "train", 64, **kw))
    assert Counter(flat(expected)) == expected_samples(recs, "train")
    proxy = FaultyProxy(s3_server.host, s3_server.port)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        # 4 KiB blocks: several ranged GETs per (~10 KiB) shard, so faults hit the middle of a shard
        monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": 4 * 1024})
        faults = 8  # s3fs itself retries a cut body 5 times (S3FileSystem.retries)
        proxy.reset(faults)
        t0 = time.time()
        with caplog.at_level(logging.WARNING, logger="shards.storage"):
            got = batches(SequenceDataset(url, "train", 64, **kw))
        assert got == expected
        assert len(proxy.faulted) == faults and all(start > 0 for _, start in proxy.faulted)
        msgs = [r.getMessage() for r in caplog.records if r.name == "shards.storage"]
        assert msgs, "no reopen: the faults were all absorbed by s3fs"
        shard_path = proxy.faulted[-1][0].split("?")[0]
        hit = [s for s in msgs if re.search(r"s3://.*/seq-\d{5}\.tar: transient \w+ at byte offset [1-9]\d* "
                                            r"\(attempt 1/5\)", s)]
        assert hit and any(shard_path.rsplit("/", 1)[1] in s for s in hit), msgs
        assert time.time() - t0 < 60

        proxy.reset(faults)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shards.storage"), \
                pytest.raises(ShardError, match=re.escape(url) + r"/seq-\d{5}\.tar \[block block-\d{6}\]: ") as ei:
            batches(SequenceDataset(url, "train", 64, io_attempts=1, **kw))
        assert ei.value.url.startswith(url + "/seq-") and re.fullmatch(r"block-\d{6}", ei.value.key)
        assert [r for r in caplog.records if r.name == "shards.storage"] == []  # not retried
    finally:
        proxy.close()


def test_missing_shard_object_fails_fast(s3_data, s3_server):
    """A shard object gone from the bucket: its readers fail at once with a ShardError naming
    it, in-process and inside DataLoader workers (raised, no hang, nothing retried); a rank
    whose plan does not touch that shard reads all of its samples."""
    url, m, recs, local = s3_data
    fs = s3fs_(s3_server)
    src, dst = f"{s3_server.bucket}/{PREFIX}", f"{s3_server.bucket}/missing-one"
    names = [sh["name"] for sh in m["shards"]]
    fs.copy(f"{src}/manifest.json", f"{dst}/manifest.json")
    for n in names[1:]:
        fs.copy(f"{src}/{n}", f"{dst}/{n}")
    murl = f"s3://{dst}"
    gone = re.escape(f"{murl}/{names[0]}")
    t0 = time.time()
    with pytest.raises(ShardError, match=gone + r" \[block block-000000\]: cannot open shard: FileNotFoundError"):
        batches(SequenceDataset(murl, "train", 50))
    it = iter(DataLoader(SequenceDataset(murl, "train", 50, shuffle=True), batch_size=None, num_workers=2))
    with pytest.raises(ShardError, match=gone):  # inside DataLoader workers: raised, no hang
        for _ in it:
            pass
    # Shut the workers down now. Left to the garbage collector (the re-raised exception keeps
    # the iterator in a reference cycle), torch's __del__ may run after the index queues were
    # finalized and wait 2 x 5 s for workers that never get the stop message, possibly in
    # fsspec's I/O thread, which stalls every S3 read meanwhile.
    it._shutdown_workers()
    assert time.time() - t0 < 30
    # rank 1 of 2 owns no block of the first shard: unaffected
    first_shard = {i for i, (s, _, _) in enumerate(block_entries(m)) if s == 0}
    assert not first_shard & {b for b, _, _ in rank_plan(split_sizes(m, "train"), 1, 2)}
    got = flat(batches(SequenceDataset(murl, "train", 16, 1, 2, max_len=MAX_LEN)))
    assert got == flat(batches(SequenceDataset(local, "train", 16, 1, 2, max_len=MAX_LEN)))
    assert len(got) == plan_batches(m, "train", 1, 2, False)[1]


def test_plain_webdataset_reads_the_shards_from_s3(s3_data):
    """The shards stay ordinary WebDataset tars: plain webdataset (with an fsspec opener for
    ``s3://``, nothing of ours) yields one sample per block, keyed by the block key, with
    exactly the four ``.npy`` members; decoded by webdataset they are the records our reader
    yields (whole records with their segments, and every training sample), also when read
    by 2 DataLoader workers (each its own shards)."""
    url, m, recs, local = s3_data
    urls = [f"{url}/{sh['name']}" for sh in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    register_s3_gopen()
    raw = list(ds)
    assert [s["__key__"] for s in raw] == [b["key"] for _, _, b in block_entries(m)]
    assert [s["__url__"] for s in raw] == [u for u, sh in zip(urls, m["shards"]) for _ in sh["blocks"]]
    assert all(sorted(k for k in s if not k.startswith("__")) == sorted(BLOCK_MEMBERS) for s in raw)
    dec = [{k: np.load(io.BytesIO(v), allow_pickle=False) if k in BLOCK_MEMBERS else v for k, v in s.items()}
           for s in raw]
    assert records_of(dec) == recs  # webdataset's own .npy decoder (the fixture) agrees with numpy's
    dl = DataLoader(ds.decode(), batch_size=None, num_workers=2, worker_init_fn=register_s3_gopen)
    assert records_of(list(dl)) == recs
    # our reader: whole records and their segments ...
    ours = {}
    for b in SequenceDataset(url, "records", 7):
        segs = [b[s] for s in ("train", "valid", "test")]
        for i, u in enumerate(b["user"].tolist()):
            parts = [items[off[i]:off[i + 1]].tolist() for off, items in segs]
            ours[u] = (parts[0] + parts[1] + parts[2], (len(parts[0]), len(parts[0]) + len(parts[1])))
    assert ours == recs
    # ... and its samples
    for split in ("train", "valid", "test"):
        got = Counter(flat(batches(SequenceDataset(url, split, 100, max_len=MAX_LEN))))
        assert got == expected_samples(recs, split), split


# ---------------------------------------------------------------- training straight from S3

def _fit_from_s3(shards_url, ckpt_url, out_dir):
    from recsys_dist.config import load_config
    from recsys_dist.train.trainer import fit

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
    from distributed_harness import synth_shards

    local = synth_shards(tmp_path / "synth", 300, 200, 40, 15)
    url = f"s3://{s3_server.bucket}/train-from-s3"
    fs = s3fs_(s3_server)
    fs.put(str(local) + "/", url + "/", recursive=True)
    assert load_manifest(url)["num_records"] == 200
    ckpt = f"s3://{s3_server.bucket}/train-from-s3-ckpt"
    out = run_distributed(_fit_from_s3, 2, url, ckpt, str(tmp_path / "runs"))
    assert out[0] == out[1] == {"world": 2, "steps": 12, "test_users": 200}
    assert fs.exists(f"{ckpt}/step-00000012/checkpoint.json") and fs.exists(f"{ckpt}/step-00000006/checkpoint.json")
