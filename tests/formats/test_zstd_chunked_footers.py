"""Every zstd:chunked footer generation, and each way a blob can be refused with a typed error.

The old layouts (40-byte footer of containers/storage <= v1.46 and stargz-snapshotter, 56-byte
footer of v1.47-v1.49) are constructed here from the pieces of a blob our writer made, exactly
as `zstd-chunked.md` §2.4 describes them.
"""
from __future__ import annotations

import hashlib
import io
import json

import pytest
import zstandard

from stargz_store.formats import zstd_chunked as z
from stargz_store.formats.errors import (
    BadFooterError,
    DigestMismatchError,
    InvalidTocError,
    NotLazyFormatError,
    OutOfBoundsError,
    TocTooLargeError,
)
from stargz_store.formats.file_reader import read_file
from stargz_store.formats.layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_OLD_MANIFEST_POSITION,
)
from stargz_store.formats.zstd_chunked_writer import build_zstd_chunked

from .expected import assert_layer_matches, expected_layer_from_tar
from .tarfixtures import small_tar


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _u64(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little") for v in values)


@pytest.fixture(scope="module")
def layer():
    tar_bytes = small_tar()
    out = io.BytesIO()
    result = build_zstd_chunked(io.BytesIO(tar_bytes), out, chunk_size=4096)
    return tar_bytes, out.getvalue(), result


def _pieces(blob: bytes, annotations) -> tuple[bytes, dict]:
    offset, size, _ = z.manifest_position(annotations)
    doc = json.loads(zstandard.ZstdDecompressor().decompress(blob[offset : offset + size]))
    return blob[: offset - 8], doc


def _old_blob(blob: bytes, annotations, generation: int) -> tuple[bytes, bytes, str]:
    """A blob in the layout of an older writer: (blob, compressed TOC, uncompressed TOC JSON)."""
    data, doc = _pieces(blob, annotations)
    doc.pop("tarSplitDigest", None)
    toc_json = json.dumps(doc, separators=(",", ":")).encode()
    toc = zstandard.ZstdCompressor().compress(toc_json)
    toc_offset = len(data) + 8
    out = data + z.skippable_frame(toc)
    if generation == 40:
        out += z.skippable_frame(_u64(toc_offset, len(toc), len(toc_json), 1) + b"GnUlInUx")
    elif generation == 56:
        out += z.skippable_frame(zstandard.ZstdCompressor().compress(b'{"type":2,"payload":null,"position":0}\n'))
        out += z.skippable_frame(_u64(toc_offset, len(toc), len(toc_json), 1) + b"GnUlInUx" + bytes(16))
    else:
        raise ValueError(generation)
    return out, toc, toc_json


def _reader(blob: bytes):
    reads = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return blob[offset : offset + length]

    read_at.reads = reads  # type: ignore[attr-defined]
    return read_at


@pytest.mark.parametrize("generation", [40, 56])
def test_old_footer_generations_without_annotations(layer, generation):
    tar_bytes, blob, result = layer
    old, toc, _ = _old_blob(blob, result.annotations, generation)
    footer = z.parse_footer(old[-64:])
    assert footer.size == generation and old[footer.toc_offset : footer.toc_offset + footer.toc_size] == toc
    parsed = z.read_toc_any(_reader(old), len(old), {}, key_digest=_sha(toc))
    assert parsed.flavour == z.FLAVOUR_CONTAINERS and parsed.toc_digest == _sha(toc)
    assert_layer_matches(parsed, _reader(old), expected_layer_from_tar(tar_bytes))
    direct = z.read_toc(_reader(old), len(old), {}, expected_toc_digest=_sha(toc))
    assert direct.toc_offset == parsed.toc_offset


def test_footer_fields_of_each_generation(layer):
    _, blob, result = layer
    current = z.parse_footer(blob[-100:])
    assert current.size == 64 and current.tar_split_size > 0
    for generation in (40, 56):
        old, toc, toc_json = _old_blob(blob, result.annotations, generation)
        f = z.parse_footer(old[-100:])
        assert (f.size, f.toc_size, f.toc_uncompressed_size, f.manifest_type) == (generation, len(toc), len(toc_json), 1)
        assert old[f.toc_offset : f.toc_offset + f.toc_size] == toc
        assert f.tar_split_size == 0


def test_old_annotation_names_are_understood(layer):
    tar_bytes, blob, result = layer
    old, toc, toc_json = _old_blob(blob, result.annotations, 40)
    toc_offset = z.parse_footer(old[-48:]).toc_offset
    annotations = {
        ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM: _sha(toc),
        ANNOTATION_ZSTD_OLD_MANIFEST_POSITION: f"{toc_offset}:{len(toc)}:{len(toc_json)}:1",
    }
    read_at = _reader(old)
    parsed = z.read_toc_any(read_at, len(old), annotations)
    assert read_at.reads == [(toc_offset - 8, len(toc) + 8)]
    assert parsed.toc_digest == _sha(toc)
    assert_layer_matches(parsed, read_at, expected_layer_from_tar(tar_bytes))


def test_stargz_flavour_rule_uses_uncompressed_digest(layer):
    """A 40-byte-footer blob keyed by its uncompressed TOC is read as stargz-snapshotter's flavour."""
    _, blob, result = layer
    old, toc, toc_json = _old_blob(blob, result.annotations, 40)
    parsed = z.read_toc_any(_reader(old), len(old), {ANNOTATION_TOC_DIGEST: _sha(toc_json)})
    assert parsed.flavour == z.FLAVOUR_STARGZ and parsed.toc_digest == _sha(toc_json)
    parsed = z.read_toc_any(_reader(old), len(old), {}, key_digest=_sha(toc_json))
    assert parsed.flavour == z.FLAVOUR_STARGZ
    with pytest.raises(DigestMismatchError):
        z.read_stargz_toc(_reader(old), len(old), {ANNOTATION_TOC_DIGEST: _sha(toc)}, expected_toc_digest=None)


def test_position_annotation_is_preferred_over_a_broken_footer(layer):
    _, blob, result = layer
    broken = blob[:-8] + b"XXXXXXXX"
    parsed = z.read_toc_any(_reader(broken), len(broken), result.annotations)
    assert parsed.toc_digest == result.toc_digest
    with pytest.raises(BadFooterError):
        z.read_toc_any(_reader(broken), len(broken), {}, key_digest=result.toc_digest)


def test_bad_footer_magic(layer):
    _, blob, result = layer
    for bad in (blob[:-1] + b"y", blob[:-8] + b"gnulinux"):
        with pytest.raises(BadFooterError) as info:
            z.read_toc(_reader(bad), len(bad), {}, expected_toc_digest=result.toc_digest)
        assert isinstance(info.value, NotLazyFormatError)  # no magic: a plain zstd layer
    # Right magic, wrong frame around it.
    wrong_len = blob[:-68] + (60).to_bytes(4, "little") + blob[-64:]
    with pytest.raises(BadFooterError, match="skippable frame"):
        z.parse_footer(wrong_len[-100:])
    wrong_type = blob[:-40] + (2).to_bytes(8, "little") + blob[-32:]
    with pytest.raises(BadFooterError, match="manifest type"):
        z.parse_footer(wrong_type[-100:])


def test_toc_digest_mismatch(layer):
    _, blob, result = layer
    wrong = dict(result.annotations)
    wrong[ANNOTATION_ZSTD_MANIFEST_CHECKSUM] = "sha256:" + "1" * 64
    with pytest.raises(DigestMismatchError, match="TOC"):
        z.read_toc_any(_reader(blob), len(blob), wrong)
    offset, _, _ = z.manifest_position(result.annotations)
    tampered = blob[: offset + 20] + bytes([blob[offset + 20] ^ 1]) + blob[offset + 21 :]
    with pytest.raises(DigestMismatchError):
        z.read_toc_any(_reader(tampered), len(tampered), result.annotations)


def test_chunk_digest_mismatch(layer):
    _, blob, result = layer
    parsed = z.read_toc_any(_reader(blob), len(blob), result.annotations)
    entry = parsed.toc.lookup("a/two.bin")
    chunk = entry.chunks[1]
    good = blob[chunk.blob_offset : chunk.blob_end]
    assert z.decompress_chunk(good, chunk) == read_file(parsed, _reader(blob), entry)[chunk.file_offset : chunk.file_offset + chunk.size]
    # Same length, other content: a valid frame of different bytes.
    other = zstandard.ZstdCompressor().compress(bytes(chunk.size))
    with pytest.raises(DigestMismatchError, match="chunk"):
        z.decompress_chunk(other, chunk)
    # Garbage that does not decode is refused the same way.
    with pytest.raises(DigestMismatchError):
        z.decompress_chunk(good[:4] + bytes(len(good) - 4), chunk)
    # Through the file reader on a tampered blob.
    tampered = bytearray(blob)
    tampered[chunk.blob_end - 5] ^= 0xFF
    with pytest.raises(DigestMismatchError):
        read_file(parsed, _reader(bytes(tampered)), entry)


def test_zero_chunk_with_lying_digest_is_refused():
    chunk = z.Chunk(file_offset=0, size=4096, blob_offset=8, blob_end=30, inner_offset=0, digest=_sha(b"x" * 4096), zeros=True)
    with pytest.raises(DigestMismatchError):
        z.decompress_chunk(b"", chunk)


def test_toc_over_the_cap(layer):
    _, blob, result = layer
    _, size, usize = z.manifest_position(result.annotations)
    with pytest.raises(TocTooLargeError):
        z.read_toc_any(_reader(blob), len(blob), result.annotations, max_toc_size=usize - 1)
    with pytest.raises(TocTooLargeError):
        z.read_toc_any(_reader(blob), len(blob), {}, key_digest=result.toc_digest, max_toc_size=size - 1)


@pytest.mark.parametrize("declared, error", [(100, "more than the 100 bytes its position declares"),
                                             (0, "more than the cap of 1048576 bytes")])
def test_toc_that_decompresses_past_the_cap_is_stopped(declared, error):
    """A position that understates the TOC size stops the inflation one byte past what it
    declares; without a declared size, one byte past the cap."""
    bomb = zstandard.ZstdCompressor().compress(b'{"version":1,"entries":[]' + b" " * (4 << 20) + b"}")
    blob = zstandard.ZstdCompressor().compress(bytes(1024)) + z.skippable_frame(bomb)
    offset = len(blob) - len(bomb)
    annotations = {
        ANNOTATION_ZSTD_MANIFEST_CHECKSUM: _sha(bomb),
        ANNOTATION_ZSTD_MANIFEST_POSITION: f"{offset}:{len(bomb)}:{declared}:1",
    }
    with pytest.raises(InvalidTocError, match=error):
        z.read_toc_any(_reader(blob), len(blob), annotations, max_toc_size=1 << 20)


def test_positions_outside_the_blob(layer):
    _, blob, result = layer
    offset, size, usize = z.manifest_position(result.annotations)
    for position in (f"{len(blob)}:{size}:{usize}:1", f"4:{size}:{usize}:1", f"{offset}:{len(blob)}:{usize}:1"):
        ann = {**result.annotations, ANNOTATION_ZSTD_MANIFEST_POSITION: position}
        with pytest.raises((OutOfBoundsError, TocTooLargeError)):
            z.read_toc_any(_reader(blob), len(blob), ann)
    shifted = {**result.annotations, ANNOTATION_ZSTD_MANIFEST_POSITION: f"{offset + 1}:{size}:{usize}:1"}
    with pytest.raises(BadFooterError, match="skippable frame"):
        z.read_toc_any(_reader(blob), len(blob), shifted)


@pytest.mark.parametrize("value", ["1:2:3", "a:b:c:1", "1:2:3:2", ""])
def test_malformed_position_annotation(layer, value):
    _, blob, result = layer
    ann = {**result.annotations, ANNOTATION_ZSTD_MANIFEST_POSITION: value}
    if not value:
        ann.pop(ANNOTATION_ZSTD_MANIFEST_POSITION)
        assert z.read_toc_any(_reader(blob), len(blob), ann).toc_digest == result.toc_digest  # footer fallback
        return
    with pytest.raises(z.InvalidAnnotationError):
        z.read_toc_any(_reader(blob), len(blob), ann)


def test_both_flavour_digests_is_an_error(layer):
    _, blob, result = layer
    ann = {**result.annotations, ANNOTATION_TOC_DIGEST: result.toc_digest}
    with pytest.raises(z.InvalidAnnotationError, match="both"):
        z.read_toc_any(_reader(blob), len(blob), ann)


def test_tar_split_is_verified(layer):
    _, blob, result = layer
    parsed = z.read_toc_any(_reader(blob), len(blob), result.annotations)
    assert z.read_tar_split(_reader(blob), parsed).startswith(b'{"type":2')
    tampered = bytearray(blob)
    tampered[parsed.tar_split_offset + 3] ^= 1
    with pytest.raises(DigestMismatchError, match="tar-split"):
        z.read_tar_split(_reader(bytes(tampered)), parsed)
    old, toc, _ = _old_blob(blob, result.annotations, 56)
    old_parsed = z.read_toc_any(_reader(old), len(old), {}, key_digest=_sha(toc))
    with pytest.raises(z.TarSplitUnavailableError):
        z.read_tar_split(_reader(old), old_parsed)


def test_tiny_or_plain_blobs_are_not_lazy():
    plain = zstandard.ZstdCompressor().compress(b"not a tar at all" * 100)
    key = "sha256:" + "2" * 64
    with pytest.raises(NotLazyFormatError):
        z.read_toc_any(_reader(plain), len(plain), {}, key_digest=key)
    with pytest.raises(NotLazyFormatError):
        z.read_toc_any(_reader(b"tiny"), 4, {}, key_digest=key)


def test_decompress_chunk_skips_inner_offset_and_crosses_frames():
    """stargz-snapshotter may pack pieces into one frame (`innerOffset`); a piece may also span frames."""
    header, payload, rest = b"h" * 700, bytes(range(256)) * 40, b"trailing tar bytes"
    one_frame = zstandard.ZstdCompressor().compress(header + payload + rest)
    chunk = z.Chunk(
        file_offset=0, size=len(payload), blob_offset=0, blob_end=len(one_frame), inner_offset=len(header), digest=_sha(payload)
    )
    assert z.decompress_chunk(one_frame, chunk) == payload
    # Streaming encoders omit the content size; split over two frames the piece still reads whole.
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    two_frames = cctx.compress(header + payload[:5000]) + cctx.compress(payload[5000:] + rest)
    assert z.decompress_chunk(two_frames, chunk) == payload
    with pytest.raises(DigestMismatchError):
        z.decompress_chunk(two_frames[: len(two_frames) // 2], chunk)  # truncated extent
