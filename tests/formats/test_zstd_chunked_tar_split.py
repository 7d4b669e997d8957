"""The pieces under the zstd:chunked writer: raw tar splitting, tar-split NDJSON, CRC-64/ISO."""
from __future__ import annotations

import io
import os
import random
import tarfile

import pytest

from stargz_store.formats.crc64 import Crc64, crc64_iso
from stargz_store.formats.tar_split import (
    FileEntry,
    Segment,
    TarFormatError,
    TarSplitError,
    TarSplitPacker,
    assemble_tar,
    parse_tar_split,
    split_tar,
)

from stargz_store.formats.toc import normalize_name

from .tarfixtures import all_types_tar, random_bytes

_GO_ISO_POLY_REVERSED = 0xD800000000000000


def _reference_crc64(data: bytes) -> int:
    """Go's `crc64.Update` with `MakeTable(ISO)`, byte at a time."""
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ _GO_ISO_POLY_REVERSED if crc & 1 else crc >> 1
        table.append(crc)
    crc = (1 << 64) - 1
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ ((1 << 64) - 1)


def test_crc64_iso_check_value():
    assert crc64_iso(b"123456789") == 0xB90956C775A41001  # CRC-64/GO-ISO catalogue check value
    assert crc64_iso(b"") == 0


@pytest.mark.parametrize("size", [1, 7, 8, 9, 63, 64, 65, 127, 1000, 4096, 70_001])
def test_crc64_matches_byte_at_a_time_reference(size):
    data = random.Random(size).randbytes(size)
    assert crc64_iso(data) == _reference_crc64(data)
    c = Crc64()
    for i in range(0, size, 997):
        c.update(data[i : i + 997])
    assert c.value == _reference_crc64(data)
    assert c.digest() == _reference_crc64(data).to_bytes(8, "big")


def _split(tar_bytes: bytes):
    items = []
    for item in split_tar(io.BytesIO(tar_bytes)):
        if isinstance(item, FileEntry):
            items.append((item.header, item.read(item.header.payload_size)))
        else:
            items.append(item)
    return items


def _concat(items) -> bytes:
    return b"".join(i.data if isinstance(i, Segment) else i[1] for i in items)


def _tar(fmt: int, *, long_names: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        name = ("p" * 60 + "/") * 2 + "file" if long_names else "dir/file"
        data = random_bytes(3000, 5)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 1_234_567_890, 0o640, 12, 34
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dir/link")
        link.type, link.linkname = tarfile.SYMTYPE, "file"
        tar.addfile(link)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("long_names", [False, True])
def test_split_is_lossless_and_parses_headers(fmt, long_names):
    tar_bytes = _tar(fmt, long_names=long_names) + b"trailing garbage"
    items = _split(tar_bytes)
    assert _concat(items) == tar_bytes
    headers = [i[0] for i in items if isinstance(i, tuple)]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
    assert [h.name for h in headers] == [m.name for m in members]
    h = headers[0]
    assert (h.type_name, h.mode, h.uid, h.gid, h.size, h.mtime_ns) == ("reg", 0o640, 12, 34, 3000, 1_234_567_890 * 10**9)
    assert (headers[1].type_name, headers[1].link_name) == ("symlink", "file")
    assert items[-1].data.endswith(b"trailing garbage")  # after tarfile's record padding


def test_split_keeps_raw_names_and_all_fields():
    tar_bytes = all_types_tar(4096)
    items = _split(tar_bytes)
    assert _concat(items) == tar_bytes
    raw_names = [i[0].name for i in items if isinstance(i, tuple)]
    assert "./dir/" in raw_names and "./dev/null" in raw_names  # names exactly as in the tar
    headers = {normalize_name(h.name): h for h in (i[0] for i in items if isinstance(i, tuple))}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), encoding="utf-8", errors="surrogateescape") as tar:
        members = {normalize_name(m.name): m for m in tar.getmembers()}
        assert set(members) == set(headers)
        for name, m in members.items():
            h = headers[name]
            assert h.type_name == ("hardlink" if m.islnk() else "symlink" if m.issym() else "dir" if m.isdir()
                                   else "char" if m.ischr() else "block" if m.isblk() else "fifo" if m.isfifo() else "reg")
            assert (h.uid, h.gid, h.mode, h.link_name) == (m.uid, m.gid, m.mode, m.linkname)
            assert h.mtime_ns == round(float(m.pax_headers.get("mtime", m.mtime)) * 10**9)
            if m.ischr() or m.isblk():
                assert (h.dev_major, h.dev_minor) == (m.devmajor, m.devminor)
            xattrs = {k[13:]: v.encode("utf-8", "surrogateescape") for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            assert h.xattrs == xattrs


def test_tar_without_end_blocks_is_accepted():
    tar_bytes = _tar(tarfile.PAX_FORMAT)[:-1024]
    assert _concat(_split(tar_bytes)) == tar_bytes


def _corrupt(tar_bytes: bytes, offset: int, value: bytes) -> bytes:
    return tar_bytes[:offset] + value + tar_bytes[offset + len(value) :]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: _corrupt(t, 0, b"X"), "checksum"),
        (lambda t: t[:700], "ends inside"),
        (lambda t: t[:300], "ends inside a header"),
        (lambda t: bytes(512) + t, "zero block followed"),
    ],
)
def test_broken_tars_raise_typed_errors(mutate, match):
    with pytest.raises(TarFormatError, match=match):
        _split(mutate(_tar(tarfile.USTAR_FORMAT)))


def test_sparse_entries_are_refused():
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    tar_bytes = info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(TarFormatError, match="sparse"):
        _split(tar_bytes)


def test_packer_round_trip_and_raw_names():
    out = io.BytesIO()
    packer = TarSplitPacker(out.write)
    packer.add_segment(b"header bytes")
    packer.add_file("ok/name", 3, Crc64().digest())
    bad_name = b"bad\xffname".decode("utf-8", "surrogateescape")
    packer.add_file(bad_name, 0, None)
    packer.add_segment(b"")
    lines = out.getvalue().splitlines()
    assert lines[0] == b'{"type":2,"payload":"aGVhZGVyIGJ5dGVz","position":0}'
    assert b'"name_raw":"YmFk/25hbWU="' in lines[2] and b'"name"' not in lines[2]
    entries = parse_tar_split(out.getvalue())
    assert [e.position for e in entries] == [0, 1, 2, 3]
    assert entries[2].name == bad_name and entries[1].size == 3
    with pytest.raises(TarSplitError, match="line 2"):
        parse_tar_split(b'{"type":2,"payload":null,"position":0}\n{"type":9}\n')


def test_assemble_checks_each_file():
    out = io.BytesIO()
    packer = TarSplitPacker(out.write)
    packer.add_segment(b"H")
    crc = Crc64()
    crc.update(b"abc")
    packer.add_file("f", 3, crc.digest())
    entries = parse_tar_split(out.getvalue())
    assert b"".join(assemble_tar(entries, lambda name: [b"ab", b"c"])) == b"Habc"
    with pytest.raises(TarSplitError, match="'f'"):
        b"".join(assemble_tar(entries, lambda name: [b"abd"]))


def test_split_of_a_real_gnu_tar_of_a_directory(tmp_path):
    """GNU tar's own output (with its 10 KiB record padding) splits losslessly."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(5000))
    (src / "d" / ("long" * 40)).write_bytes(b"x")
    os.symlink("f", src / "d" / "l")
    tar_path = tmp_path / "t.tar"
    import subprocess

    subprocess.run(["tar", "-cf", str(tar_path), "-C", str(src), "."], check=True)
    tar_bytes = tar_path.read_bytes()
    items = _split(tar_bytes)
    assert _concat(items) == tar_bytes
    names = sorted(i[0].name for i in items if isinstance(i, tuple))
    assert names == sorted(["./", "./d/", "./d/f", "./d/l", "./d/" + "long" * 40])
