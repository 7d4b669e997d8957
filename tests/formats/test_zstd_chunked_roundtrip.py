"""Our zstd:chunked writer: byte-exact tar inside, every entry type in the TOC, readable by our reader.

Each case is checked four ways: `zstd -d` gives back the input tar, our reader sees the tree the
tar describes (same checker as the reference images), the tar-split re-assembles the input tar
from TOC-served file contents, and every chunk is exactly one zstd frame.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tracemalloc

import pytest
import zstandard

from stargz_store.formats import zstd_chunked
from stargz_store.formats.errors import EntryEscapesRootError
from stargz_store.formats.file_reader import read_file
from stargz_store.formats.layer_toc import (
    ANNOTATION_UNCOMPRESSED_SIZE,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_TARSPLIT_POSITION,
)
from stargz_store.formats.tar_input import InputTarError
from stargz_store.formats.tar_split import TarSplitError, assemble_tar, parse_tar_split
from stargz_store.formats.toc import normalize_name
from stargz_store.formats.zstd_chunked_writer import MAX_ZERO_CHUNK, build_zstd_chunked, go_time

from .expected import assert_layer_matches, expected_layer_from_tar
from .tarfixtures import TarBuilder, all_types_tar, random_bytes, small_tar

CHUNK = 16 << 10  # small chunks so modest files still have many


def _build(tar_bytes: bytes, **kw) -> tuple[bytes, object]:
    out = io.BytesIO()
    result = build_zstd_chunked(io.BytesIO(tar_bytes), out, **kw)
    return out.getvalue(), result


def _read_at(blob: bytes):
    return lambda offset, length: blob[offset : offset + length]


def _zero_run_tar() -> bytes:
    t = TarBuilder()
    t.dir("./")
    t.file("./holes", random_bytes(5000, 11) + bytes(100_000) + random_bytes(70_000, 12) + bytes(3000))
    t.file("./short-zero-runs", (random_bytes(700, 13) + bytes(1023)) * 40)
    t.file("./all-zeros", bytes(MAX_ZERO_CHUNK + 12345))
    return t.getvalue()


def _gnu_tar() -> bytes:
    """GNU format: long names and link targets as `L`/`K` records, base-256 ids."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("gnu/")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(d)
        data = random_bytes(50_000, 21)
        f = tarfile.TarInfo("gnu/" + "x" * 150)
        f.size, f.mode, f.mtime, f.uid = len(data), 0o600, 1_700_000_000, 0o7777777 + 5
        tar.addfile(f, io.BytesIO(data))
        s = tarfile.TarInfo("gnu/long-link")
        s.type, s.linkname, s.mtime = tarfile.SYMTYPE, "y" * 130, 1_700_000_000
        tar.addfile(s)
    return buf.getvalue() + bytes(10240)  # trailing zero padding beyond the end blocks


CASES = {
    "all-types": lambda: all_types_tar(CHUNK),
    "small": small_tar,
    "zero-runs": _zero_run_tar,
    "gnu": _gnu_tar,
    "empty-archive": lambda: bytes(1024),
}


def _assert_round_trip(tar_bytes: bytes, blob: bytes, result) -> zstd_chunked.ZstdChunkedToc:
    assert result.size == len(blob)
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    assert result.diff_size == len(tar_bytes)
    assert result.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    ann = result.annotations
    assert ann[ANNOTATION_ZSTD_MANIFEST_CHECKSUM] == result.toc_digest
    assert ann[ANNOTATION_UNCOMPRESSED_SIZE] == str(len(tar_bytes))
    assert set(ann) == {
        ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
        ANNOTATION_ZSTD_MANIFEST_POSITION,
        ANNOTATION_ZSTD_TARSPLIT_POSITION,
        ANNOTATION_UNCOMPRESSED_SIZE,
    }

    # A plain zstd decoder skips the metadata frames and yields the input byte for byte.
    plain = subprocess.run(["zstd", "-dc"], input=blob, check=True, capture_output=True).stdout
    assert plain == tar_bytes

    read_at = _read_at(blob)
    parsed = zstd_chunked.read_toc_any(read_at, len(blob), ann)
    assert parsed.flavour == zstd_chunked.FLAVOUR_CONTAINERS and parsed.toc_digest == result.toc_digest
    assert_layer_matches(parsed, read_at, expected_layer_from_tar(tar_bytes))

    # The 64-byte footer alone leads to the same TOC.
    by_footer = zstd_chunked.read_toc_any(read_at, len(blob), {}, key_digest=result.toc_digest)
    assert by_footer.toc_offset == parsed.toc_offset and by_footer.tar_split_offset == parsed.tar_split_offset

    # Every chunk is one whole zstd frame holding exactly its bytes.
    for _, entry in parsed.toc.entries():
        for c in entry.chunks:
            d = zstandard.ZstdDecompressor().decompressobj()
            content = d.decompress(blob[c.blob_offset : c.blob_end])
            assert d.eof and not d.unused_data and len(content) == c.size

    # tar-split + file contents served through the TOC = the original tar.
    entries = parse_tar_split(zstd_chunked.read_tar_split(read_at, parsed))

    def open_file(name: str):
        entry = parsed.toc.lookup(normalize_name(name))
        yield read_file(parsed, read_at, entry)

    names = [normalize_name(e.name) for e in entries if e.type == 1]
    if len(names) == len(set(names)):
        assert b"".join(assemble_tar(entries, open_file)) == tar_bytes
    else:
        # The TOC serves only the later of two same-named files; the CRC check catches that.
        with pytest.raises(TarSplitError):
            b"".join(assemble_tar(entries, open_file))
    return parsed


@pytest.mark.parametrize("chunk_size", [None, CHUNK], ids=["rollsum", "fixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case, chunk_size):
    tar_bytes = CASES[case]()
    blob, result = _build(tar_bytes, chunk_size=chunk_size)
    _assert_round_trip(tar_bytes, blob, result)


def _without_duplicates(tar_bytes: bytes) -> bytes:
    """The same archive with only the last member of each name (re-written by `tarfile`)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), encoding="utf-8", errors="surrogateescape") as src:
        members = [(m, src.extractfile(m).read() if m.isreg() else None) for m in src.getmembers()]
    last = {m.name: i for i, (m, _) in enumerate(members)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as dst:
        for i, (m, data) in enumerate(members):
            if last[m.name] == i:
                dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_tar_split_reassembles_every_entry_type():
    tar_bytes = _without_duplicates(all_types_tar(CHUNK))
    blob, result = _build(tar_bytes, chunk_size=CHUNK)
    _assert_round_trip(tar_bytes, blob, result)


def test_round_trip_all_entry_types():
    tar_bytes = all_types_tar(CHUNK)
    blob, result = _build(tar_bytes, chunk_size=CHUNK)
    parsed = _assert_round_trip(tar_bytes, blob, result)
    toc = parsed.toc
    assert len(toc.lookup("dir/big.bin").chunks) == 4
    assert len(toc.lookup("dir/exact-two-chunks.bin").chunks) == 2
    assert toc.lookup("dir/empty").chunks == ()
    assert toc.lookup("dir/hard") is toc.lookup("dir/small.txt") is toc.lookup("other/hard2")
    assert toc.lookup("dir/small.txt").nlink == 3
    assert (toc.lookup("dev/null").type, toc.lookup("dev/null").dev_major, toc.lookup("dev/null").dev_minor) == ("char", 1, 3)
    assert toc.lookup("dev/loop0").type == "block" and toc.lookup("dev/fifo").type == "fifo"
    assert toc.lookup("wh/.wh.gone") is not None and toc.lookup("wh/opq/.wh..wh..opq") is not None
    assert toc.lookup("xattr/file").xattrs["user.binary"] == b"\x00\x01\xfe\xff\x00"
    assert toc.lookup("times/frac").mtime_ns == 1_600_000_000_500_000_000  # sub-second kept
    assert toc.lookup("times/pre1970").mtime_ns == -86400 * 1_000_000_000
    assert toc.lookup("owners/big-ids").uid == 3_000_000
    assert toc.lookup("utf8/new\nline") is not None
    # The duplicated name keeps the later content, as extraction would.
    assert read_file(parsed, _read_at(blob), toc.lookup("dup.txt")) == b"second version wins\n"


def test_toc_json_has_containers_storage_shape():
    blob, result = _build(all_types_tar(CHUNK), chunk_size=CHUNK)
    offset, size, usize = zstd_chunked.manifest_position(result.annotations)
    doc = json.loads(zstandard.ZstdDecompressor().decompress(blob[offset : offset + size]))
    assert doc["version"] == 1 and doc["tarSplitDigest"].startswith("sha256:")
    by_name = {}
    for e in doc["entries"]:
        by_name.setdefault(e["name"], []).append(e)
    assert by_name["./dir/"][0]["type"] == "dir"  # names exactly as in the tar
    big = by_name["./dir/big.bin"]
    assert [e["type"] for e in big] == ["reg", "chunk", "chunk", "chunk"]
    assert all("chunkSize" in e and "chunkDigest" in e for e in big)
    assert big[0]["endOffset"] > big[-1]["offset"]
    small = by_name["./dir/small.txt"][0]
    assert set(small) >= {"digest", "offset", "endOffset"} and "chunkSize" not in small
    assert "offset" not in by_name["./dir/empty"][0] and "digest" not in by_name["./dir/empty"][0]
    assert by_name["./times/frac"][0]["modtime"] == "2020-09-13T12:26:40.5Z"
    assert by_name["./times/epoch0"][0]["modtime"] == "1970-01-01T00:00:00Z"
    assert by_name["./dir/hard"][0] == {
        "type": "hardlink", "name": "./dir/hard", "linkName": "./dir/small.txt", "mode": 0o644,
        "uid": 1000, "gid": 1000, "modtime": "2023-11-14T22:13:20Z",
    }


def test_zero_runs_become_zero_chunks():
    blob, result = _build(_zero_run_tar(), chunk_size=CHUNK)
    parsed = zstd_chunked.read_toc_any(_read_at(blob), len(blob), result.annotations)
    holes = parsed.toc.lookup("holes")
    assert [(c.file_offset, c.size) for c in holes.chunks if c.zeros] == [(5000, 100_000), (175_000, 3000)]
    # Runs shorter than 1 KiB stay data.
    assert not any(c.zeros for c in parsed.toc.lookup("short-zero-runs").chunks)
    zeros = parsed.toc.lookup("all-zeros")
    assert all(c.zeros for c in zeros.chunks) and max(c.size for c in zeros.chunks) == MAX_ZERO_CHUNK


@pytest.mark.parametrize("compress", [gzip.compress, lambda b: zstandard.ZstdCompressor().compress(b)])
def test_compressed_input_gives_the_same_layer(compress):
    tar_bytes = small_tar()
    plain_blob, plain = _build(tar_bytes)
    blob, result = _build(compress(tar_bytes))
    assert blob == plain_blob and result == plain


def test_footer_is_the_current_64_byte_generation():
    blob, result = _build(small_tar())
    footer = zstd_chunked.parse_footer(blob[-72:])
    offset, size, usize = zstd_chunked.manifest_position(result.annotations)
    ts = result.annotations[ANNOTATION_ZSTD_TARSPLIT_POSITION]
    assert footer.size == 64 and (footer.toc_offset, footer.toc_size, footer.toc_uncompressed_size) == (offset, size, usize)
    assert f"{footer.tar_split_offset}:{footer.tar_split_size}:{footer.tar_split_uncompressed_size}" == ts


def test_names_escaping_the_root_are_refused():
    t = TarBuilder()
    t.file("../evil", b"x")
    with pytest.raises(EntryEscapesRootError):
        _build(t.getvalue())


class _NonSeekable(io.RawIOBase):
    """A forward-only source producing one large file, never materialised."""

    def __init__(self, size: int) -> None:
        header = tarfile.TarInfo("big")
        header.size = size
        self._parts = [header.tobuf(format=tarfile.PAX_FORMAT)]
        block = random_bytes(1 << 20, 99)
        self._left = size
        self._block = block
        self._tail = bytes(-size % 512) + bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._parts:
            data = self._parts.pop(0)
        elif self._left:
            data = self._block[: min(self._left, len(b), len(self._block))]
            self._left -= len(data)
        else:
            data, self._tail = self._tail[: len(b)], self._tail[len(b) :]
        b[: len(data)] = data
        return len(data)


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def test_large_layer_is_streamed_in_bounded_memory():
    """A 32 MiB file from a forward-only source converts with well under 32 MiB allocated."""
    size = 32 << 20
    tracemalloc.start()
    try:
        result = build_zstd_chunked(io.BufferedReader(_NonSeekable(size)), _Discard())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.diff_size > size
    assert peak < 20 << 20, f"peak {peak} bytes for a {size}-byte file"


def test_go_time_formatting():
    assert go_time(0) == "1970-01-01T00:00:00Z"
    assert go_time(1_600_000_000_500_000_000) == "2020-09-13T12:26:40.5Z"
    assert go_time(-1_500_000_000) == "1969-12-31T23:59:58.5Z"
    assert go_time(1_000_000_000_000 * 1_000_000_000) is None  # year > 9999 cannot be marshalled


def _flip(data: bytes, start: int, count: int) -> bytes:
    return data[:start] + bytes(b ^ 0x55 for b in data[start : start + count]) + data[start + count :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda tar: gzip.compress(tar)[:-100],  # truncated gzip
        lambda tar: _flip(zstandard.ZstdCompressor(write_checksum=True).compress(tar), 100, 20),  # corrupt zstd
        lambda tar: tar[:600],  # plain tar cut inside a payload
    ],
    ids=["gzip", "zstd", "plain"],
)
def test_damaged_input_raises_input_tar_error(damage):
    with pytest.raises(InputTarError):
        _build(damage(small_tar()))
