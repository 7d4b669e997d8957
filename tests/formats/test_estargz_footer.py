"""Footers at byte level (estargz.md §3) and chunk decompression corner cases."""
from __future__ import annotations

import gc
import gzip
import hashlib
import io
import struct
import zlib

import pytest

from stargz_store.formats.errors import BadFooterError, DigestMismatchError, NotLazyFormatError
from stargz_store.formats.estargz import build_estargz, decompress_chunk, parse_footer, read_file, read_toc
from stargz_store.formats.estargz_footer import FOOTER_SIZE, LEGACY_FOOTER_SIZE, build_footer
from stargz_store.formats.toc import Chunk

from .tarfixtures import small_tar

SPEC_EXAMPLE = bytes.fromhex(
    "1f8b08040000000000ff1a0053471600"
    "30303030303030303030303132333435"
    "5354415247 5a 0100 00ffff 0000000000000000".replace(" ", "")
)


def legacy_footer(toc_offset: int) -> bytes:
    header = b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + struct.pack("<H", 22)
    return header + b"%016x" % toc_offset + b"STARGZ" + b"\x01\x00\x00\xff\xff" + b"\x00" * 8


def test_footer_matches_the_spec_example():
    assert build_footer(0x12345) == SPEC_EXAMPLE
    assert len(SPEC_EXAMPLE) == FOOTER_SIZE


def test_footer_is_an_empty_gzip_member():
    assert gzip.decompress(build_footer(987654321)) == b""
    assert gzip.decompress(legacy_footer(5)) == b""
    assert len(legacy_footer(5)) == LEGACY_FOOTER_SIZE


@pytest.mark.parametrize("offset", [0, 1, 0x12345, 2**40 + 7])
def test_footer_round_trip(offset):
    assert parse_footer(b"prefix bytes" + build_footer(offset)) == (offset, FOOTER_SIZE)
    assert parse_footer(b"prefix bytes" + legacy_footer(offset)) == (offset, LEGACY_FOOTER_SIZE)


def test_uppercase_hex_is_accepted():
    footer = build_footer(0xABCDEF).replace(b"abcdef", b"ABCDEF")
    assert parse_footer(footer) == (0xABCDEF, FOOTER_SIZE)


@pytest.mark.parametrize(
    "tail",
    [b"", b"short", gzip.compress(b"plain layer " * 100), b"\x00" * 51],
)
def test_no_footer(tail):
    with pytest.raises(NotLazyFormatError):
        parse_footer(tail)


def test_external_toc_footer_is_reported_as_not_lazy():
    payload = b"STARGZEXTERNALTOC"
    sub = b"SG" + struct.pack("<H", len(payload)) + payload
    footer = b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + struct.pack("<H", len(sub)) + sub + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
    assert len(footer) == 46
    with pytest.raises(NotLazyFormatError, match="external TOC"):
        parse_footer(b"x" * 10 + footer)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda f: f[:12] + b"XX" + f[14:],  # subfield id
        lambda f: f[:14] + struct.pack("<H", 21) + f[16:],  # subfield length
        lambda f: f[:32] + b"STARGY" + f[38:],  # magic
        lambda f: f[:16] + b"-000000000000001" + f[32:],  # sign in the offset
    ],
)
def test_bad_footer_fields(corrupt):
    with pytest.raises(BadFooterError):
        parse_footer(corrupt(build_footer(1234)))


def test_a_bad_footer_leaves_no_reference_cycle():
    """The error must not hold the frame that holds the error: such cycles outlive a refused
    lookup until a full collection, and forever once a later TOC build freezes them."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises(BadFooterError):
                parse_footer(build_footer(1234)[:32] + b"STARGY" + build_footer(1234)[38:])
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()


def test_legacy_footer_blob_reads(tmp_path):
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(small_tar()), out)
    blob = out.getvalue()
    toc_offset = parse_footer(blob)[0]
    legacy = blob[:-FOOTER_SIZE] + legacy_footer(toc_offset)
    parsed = read_toc(lambda o, n: legacy[o : o + n], len(legacy), expected_toc_digest=result.toc_digest)
    e = parsed.toc.lookup("a/one.txt")
    assert read_file(parsed, lambda o, n: legacy[o : o + n], e) == b"one\n" * 100


def _chunk(payload: bytes, *, inner: int, compressed_len: int) -> Chunk:
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    return Chunk(file_offset=0, size=len(payload), blob_offset=100, blob_end=100 + compressed_len, inner_offset=inner, digest=digest)


def test_inner_offset_skips_bytes_of_a_shared_member():
    payload = b"payload bytes " * 50
    member = zlib.compress(b"H" * 700 + payload + b"\0" * 300 + b"next header", 6, wbits=31)
    assert decompress_chunk(member, _chunk(payload, inner=700, compressed_len=len(member))) == payload


def test_decompression_stops_after_the_chunk():
    """The member may go on with headers of later entries; nothing past the chunk is inflated."""
    payload = b"a" * 1000
    member = zlib.compress(payload + b"\0" * 24 + b"Z" * 10_000_000, 9, wbits=31)
    d = zlib.decompressobj(31)
    assert decompress_chunk(member, _chunk(payload, inner=0, compressed_len=len(member))) == payload
    assert len(d.decompress(member, 2000)) == 2000  # sanity: the member really holds more


def test_chunk_straddling_two_members():
    payload = b"first half|second half"
    data = zlib.compress(payload[:11], 6, wbits=31) + zlib.compress(payload[11:] + b"tail", 6, wbits=31)
    assert decompress_chunk(data, _chunk(payload, inner=0, compressed_len=len(data))) == payload


def test_chunk_with_wrong_digest():
    payload = b"content"
    member = zlib.compress(payload, 6, wbits=31)
    chunk = Chunk(0, len(payload), 0, len(member), 0, "sha256:" + "2" * 64)
    with pytest.raises(DigestMismatchError):
        decompress_chunk(member, chunk)
