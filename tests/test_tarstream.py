"""shards.tarstream.TarStream reads what tarfile writes, member for member, and refuses what
tarfile refuses: every archive here is built by the standard library and read back by both."""

import gzip
import io
import tarfile

import pytest

from shards.tarstream import TarFormatError, TarStream


def _archive(members, fmt=tarfile.PAX_FORMAT, compress=False, dirs=()):
    """Tar bytes holding ``members`` [(name, data)] (and empty directories) in ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def _with_tarfile(raw):
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tf:
        return [(ti.name, ti.isfile(), tf.extractfile(ti).read() if ti.isfile() else None) for ti in tf]


def _with_tarstream(raw, chunk=1 << 20):
    ts = TarStream(io.BytesIO(raw), chunk=chunk)
    return [(m.name, m.isfile, ts.read(m) if m.isfile else None) for m in ts]


MEMBERS = [(f"train-000001-{i:04d}.{ext}", bytes(range(i % 7 + n)) * (i + 1))
           for i in range(40) for n, ext in ((3, "history.i32"), (4, "target.i32"), (0, "user.i32"))]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("chunk", [1 << 20, 700])  # 700: headers and data straddle refills
def test_reads_what_tarfile_reads(fmt, compress, chunk):
    raw = _archive(MEMBERS, fmt, compress)
    expected = _with_tarfile(raw)
    assert len(expected) == len(MEMBERS)
    assert _with_tarstream(raw, chunk) == expected


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_and_unicode_names_and_directories(fmt):
    members = [("d/" + "x" * 150 + ".history.i32", b"abc"), ("ü/é.target.i32", b"\x01\x02"),
               ("a" * 90 + "/" + "b" * 90 + ".user.i32", b"")]
    raw = _archive(members, fmt, dirs=["some/dir"])
    got = _with_tarstream(raw)
    assert got == _with_tarfile(raw)
    assert got[0] == ("some/dir", False, None) and got[1][0].startswith("d/xxx")


def test_unread_members_are_skipped():
    raw = _archive(MEMBERS, compress=True)
    ts = TarStream(io.BytesIO(raw), chunk=1000)
    got = [(m.name, ts.read(m)) for i, m in enumerate(ts) if i % 5 == 0]
    assert got == [(n, d) for i, (n, d) in enumerate(MEMBERS) if i % 5 == 0]


def test_concatenated_gzip_members():
    plain = _archive(MEMBERS[:30])
    cut = 512 * 7  # split the tar bytes inside the archive, gzip each part separately
    raw = gzip.compress(plain[:cut], mtime=0) + gzip.compress(plain[cut:], mtime=0)
    assert _with_tarstream(raw, chunk=999) == _with_tarfile(gzip.compress(plain, mtime=0))


FIXED = [(f"k{i:04d}.{ext}", bytes([i % 256]) * 8) for i in range(30) for ext in ("history.i32", "target.i32")]


@pytest.mark.parametrize("compress", [False, True])
def test_truncation_inside_member_data_raises(compress):
    plain = _archive([("a.history.i32", b"x" * 5000)] + FIXED)
    cut = plain[: 512 + 3000]  # inside the first member's data
    raw = gzip.compress(cut, mtime=0) if compress else cut
    with pytest.raises(EOFError, match="unexpected end of data"):
        _with_tarstream(raw)
    with pytest.raises(tarfile.ReadError):
        _with_tarfile(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_truncation_inside_a_header_raises_where_tarfile_stops_silently(compress):
    plain = _archive(FIXED)
    cut = plain[: 1024 * 10 + 100]  # 10 whole members (header + one data block), then part of a header
    raw = gzip.compress(cut, mtime=0) if compress else cut
    with pytest.raises(EOFError, match="unexpected end of data"):
        _with_tarstream(raw)
    assert len(_with_tarfile(raw)) == 10  # tarfile ends the archive there without a word


def test_truncated_gzip_stream_raises():
    raw = _archive(MEMBERS, compress=True)
    with pytest.raises(EOFError, match="truncated"):
        _with_tarstream(raw[: len(raw) // 2], chunk=512)


def test_cut_on_a_member_boundary_ends_the_archive_like_tarfile():
    cut = _archive(FIXED)[: 1024 * 9]  # 9 whole members, no end-of-archive blocks
    got = _with_tarstream(cut)
    assert got == _with_tarfile(cut) and [n for n, _, _ in got] == [n for n, _ in FIXED[:9]]


def test_bad_checksum_raises_where_tarfile_stops_silently():
    raw = bytearray(_archive(FIXED))
    raw[1024 * 4 + 10] ^= 0x55  # a byte of the fifth header's name
    with pytest.raises(TarFormatError, match="bad header checksum at offset 4096"):
        _with_tarstream(bytes(raw))
    assert len(_with_tarfile(bytes(raw))) == 4


def test_reading_a_member_twice_or_late_is_refused():
    ts = TarStream(io.BytesIO(_archive(MEMBERS[:3])))
    it = iter(ts)
    first = next(it)
    assert ts.read(first) == MEMBERS[0][1]
    with pytest.raises(ValueError, match="not the current unread member"):
        ts.read(first)
    next(it)
    with pytest.raises(ValueError):
        ts.read(first)


class _ShortReads(io.BytesIO):
    """A file object whose reads return at most ``n`` bytes, as a socket or object store may."""

    def __init__(self, data, n):
        super().__init__(data)
        self.n = n

    def read(self, size=-1):
        return super().read(self.n if size is None or size < 0 else min(size, self.n))


@pytest.mark.parametrize("n", [1, 2, 511, 513])
def test_short_reads(n):
    raw = _archive(MEMBERS[:20], compress=True)
    ts = TarStream(_ShortReads(raw, n), chunk=4096)
    assert [(m.name, ts.read(m)) for m in ts] == MEMBERS[:20]


def test_concatenated_gzip_with_the_next_magic_split_across_reads():
    plain = _archive(MEMBERS[:20])
    g1, g2 = gzip.compress(plain[:5120], mtime=0), gzip.compress(plain[5120:], mtime=0)
    assert _with_tarstream(g1 + g2, chunk=len(g1) + 1) == [(n, True, d) for n, d in MEMBERS[:20]]


def test_ustar_prefix_names():
    members = [("a" * 90 + "/" + "b" * 90 + ".user.i32", b"xyz")]
    raw = _archive(members, tarfile.USTAR_FORMAT)
    assert _with_tarstream(raw) == _with_tarfile(raw) == [(members[0][0], True, b"xyz")]


def _header(name, size_field, kind=b"0"):
    """A raw 512-byte header with a valid checksum and a given 12-byte size field."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:263] = b"ustar\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@pytest.mark.parametrize("kind", [b"0", b"L"])
def test_negative_size_is_refused(kind):
    negative = b"\xff" + (2**88 - 512).to_bytes(11, "big")  # base-256: -512
    raw = _header(b"x.a", negative, kind) + _archive(FIXED)
    with pytest.raises(TarFormatError, match="negative"):
        _with_tarstream(raw)


def test_long_name_header_at_the_end_is_refused():
    name = b"n" * 200 + b"\0"
    raw = _header(b"././@LongLink", b"%011o\0" % len(name), b"L") + name + bytes(-len(name) % 512) + bytes(1024)
    with pytest.raises(TarFormatError, match="long-name or pax header"):
        _with_tarstream(raw)
