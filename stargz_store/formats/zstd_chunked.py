"""Reading zstd:chunked layers, both flavours (`zstd-chunked.md`).

(A) containers/storage zstd:chunked (podman/buildah `--compression-format zstd:chunked`): the TOC
    is authenticated by the sha256 of its *compressed* bytes (`manifest-checksum`), which is also
    the layer's TOC digest / ALS key. Footers of every generation are understood (40, 56, 64
    bytes, §2.4), but the `manifest-position` annotation is preferred: it is covered by the
    manifest digest and saves the footer round trip.
(B) stargz-snapshotter's "zstdchunked" (`ctr-remote --zstdchunked`): an eStargz TOC in a skippable
    frame with the 40-byte footer; authenticated by the sha256 of the *uncompressed* JSON
    (`containerd.io/snapshot/stargz/toc.digest`), exactly as gzip eStargz.

Both describe files with the same TOC vocabulary, so both build the same `Toc` and read chunks the
same way: each chunk is one or more zstd frames at `[blob_offset, blob_end)`.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import zstandard

from .errors import (
    BadFooterError,
    DigestMismatchError,
    FormatError,
    InvalidTocError,
    NotLazyFormatError,
    OutOfBoundsError,
    TocTooLargeError,
)
from .layer_toc import (
    read_exact,
    sha256_digest,
    verified_parse,
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_OLD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_TARSPLIT_POSITION,
    COMPRESSION_ZSTD,
    FORMAT_ZSTD_CHUNKED,
    ParsedToc,
    ReadAt,
)
from .toc import DEFAULT_LIMITS, Chunk, Toc, TocLimits, read_toc_document
from .zstd_chunked_footer import (
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    MANIFEST_TYPE_CRFS,
    MEDIA_TYPE_LAYER_ZSTD,
    MIN_TAIL,
    SKIPPABLE_HEADER_SIZE,
    NoZstdChunkedFooterError,
    ZstdChunkedFooter,
    parse_footer,
    skippable_frame,
    skippable_frame_header,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOC_SIZE = 150 << 20  # containers/storage `maxTocSize`
DEFAULT_TAIL_SIZE = 512 << 10

FLAVOUR_CONTAINERS = "containers-storage"
FLAVOUR_STARGZ = "stargz-snapshotter"


class UnauthenticatedTocError(NotLazyFormatError):
    """No trusted digest is known for the TOC, so nothing in the blob can be trusted.

    containers/image does not lazily pull such a layer either (`GetTOCDigest` finds nothing).
    """


class InvalidAnnotationError(FormatError):
    """A zstd:chunked position annotation is malformed."""


class TarSplitUnavailableError(FormatError):
    """The tar-split stream cannot be used: absent, or not authenticated by the TOC."""






def parse_position(value: str, *, fields: int) -> tuple[int, ...]:
    """`offset:length:uncompressedLength[:type]` as decimal integers (`zstd-chunked.md` §2.5)."""
    parts = value.split(":")
    if len(parts) != fields or not all(p.isdigit() for p in parts):
        raise InvalidAnnotationError(f"zstd:chunked position {value!r} is not {fields} ':'-separated integers")
    return tuple(int(p) for p in parts)


def manifest_position(annotations: Mapping[str, str]) -> tuple[int, int, int] | None:
    """`(toc_offset, compressed_size, uncompressed_size)` from the new or old annotation name."""
    value = annotations.get(ANNOTATION_ZSTD_MANIFEST_POSITION) or annotations.get(ANNOTATION_ZSTD_OLD_MANIFEST_POSITION)
    if not value:
        return None
    offset, size, usize, mtype = parse_position(value, fields=4)
    if mtype != MANIFEST_TYPE_CRFS:
        raise InvalidAnnotationError(f"unsupported zstd:chunked manifest type {mtype} in {value!r}")
    return offset, size, usize


@dataclass(frozen=True)
class ZstdChunkedToc(ParsedToc):
    """A parsed zstd:chunked TOC, with where its tar-split lives (flavour A, v1.47+ writers).

    `tar_split_digest` comes from the authenticated TOC (`tarSplitDigest`); without it any
    tar-split in the blob is unauthenticated and `read_tar_split` refuses it.
    """

    flavour: str = FLAVOUR_CONTAINERS
    toc_compressed_size: int = 0
    tar_split_digest: str = ""
    tar_split_offset: int = 0
    tar_split_size: int = 0
    tar_split_uncompressed_size: int = 0


@dataclass(frozen=True)
class _TocBytes:
    compressed: bytes
    toc_offset: int
    uncompressed_size: int
    footer: ZstdChunkedFooter | None


def _check_sizes(compressed: int, uncompressed: int, max_toc_size: int) -> None:
    if compressed > max_toc_size or uncompressed > max_toc_size:
        raise TocTooLargeError(
            f"zstd:chunked TOC is {compressed} bytes compressed / {uncompressed} uncompressed, over the cap of {max_toc_size}"
        )


def _fetch_toc(
    read_at: ReadAt,
    blob_size: int,
    position: tuple[int, int, int] | None,
    *,
    max_toc_size: int,
    tail_size: int,
) -> _TocBytes:
    """The compressed TOC bytes: from the position annotation (one exact read), else via the footer.

    Without a position, one tail read of `tail_size` bytes usually holds the footer and the TOC;
    a second read happens only when the TOC starts before that window.
    """
    footer: ZstdChunkedFooter | None = None
    window_start = blob_size
    window = b""
    if position is not None:
        toc_offset, size, usize = position
    else:
        if blob_size < SKIPPABLE_HEADER_SIZE + LEGACY_FOOTER_SIZE:
            raise NoZstdChunkedFooterError(f"blob of {blob_size} bytes is too small for a zstd:chunked footer")
        length = min(blob_size, max(tail_size, MIN_TAIL))
        window_start = blob_size - length
        window = read_exact(read_at, window_start, length)
        footer = parse_footer(window)
        toc_offset, size, usize = footer.toc_offset, footer.toc_size, footer.toc_uncompressed_size
    _check_sizes(size, usize, max_toc_size)
    frame_start = toc_offset - SKIPPABLE_HEADER_SIZE
    data_limit = blob_size - (SKIPPABLE_HEADER_SIZE + footer.size if footer else 0)
    if frame_start < 0 or toc_offset + size > data_limit or size <= 0:
        raise OutOfBoundsError(f"zstd:chunked TOC at {toc_offset} (+{size}) is outside the blob of {blob_size} bytes")
    if frame_start >= window_start:
        frame = window[frame_start - window_start : toc_offset + size - window_start]
    else:
        if footer is not None:
            log.debug("zstd:chunked TOC at %d is before the %d-byte tail window; second read", toc_offset, len(window))
        frame = read_exact(read_at, frame_start, size + SKIPPABLE_HEADER_SIZE)
    if frame[:SKIPPABLE_HEADER_SIZE] != skippable_frame_header(size):
        raise BadFooterError(
            f"no skippable frame of {size} bytes before the zstd:chunked TOC at {toc_offset} (found {frame[:8].hex()})"
        )
    return _TocBytes(frame[SKIPPABLE_HEADER_SIZE:], toc_offset, usize, footer)


def _decompress_bounded(data: bytes, limit: int, what: str, declared: int = 0) -> bytes | bytearray:
    """Decompress zstd `data` (frames may lack a content size), refusing more than `limit`
    bytes, or more than `declared` when the position or footer gave the uncompressed size: a
    bomb is stopped one byte past what it claims, while it is inflated."""
    want = min(limit, declared) if declared > 0 else limit
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as r:
            out = _read_into_buffer(r, want + 1)
    except zstandard.ZstdError as e:
        raise InvalidTocError(f"{what} is not valid zstd: {e}") from None
    if len(out) > limit:
        raise TocTooLargeError(f"{what} decompresses to more than the cap of {limit} bytes")
    if len(out) > want:
        raise InvalidTocError(f"{what} decompresses to more than the {declared} bytes its position declares")
    return out


def _read_into_buffer(reader: Any, n: int) -> bytearray:
    """Up to `n` bytes, read into one buffer in pieces of at most 4 MiB (a TOC is never held
    twice while its pieces are joined)."""
    out = bytearray()
    while len(out) < n:
        b = reader.read(min(n - len(out), 4 << 20))
        if not b:
            break
        out += b
    return out


def _read_up_to(reader: Any, n: int) -> bytes:
    """Up to `n` bytes; each read asks for at most 4 MiB (the reader allocates what it is asked
    for before it knows how much there is)."""
    parts = []
    while n > 0:
        b = reader.read(min(n, 4 << 20))
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _finish(
    toc_bytes: _TocBytes,
    toc_json: bytes | bytearray,
    toc_digest: str,
    flavour: str,
    annotations: Mapping[str, str],
    limits: TocLimits,
) -> ZstdChunkedToc:
    if toc_bytes.uncompressed_size and len(toc_json) != toc_bytes.uncompressed_size:
        raise InvalidTocError(
            f"zstd:chunked TOC decompresses to {len(toc_json)} bytes, its position says {toc_bytes.uncompressed_size}"
        )
    doc = read_toc_document(toc_json, data_end=toc_bytes.toc_offset - SKIPPABLE_HEADER_SIZE, limits=limits)
    toc: Toc = doc.toc
    ts_offset = ts_size = ts_usize = 0
    ts_value = annotations.get(ANNOTATION_ZSTD_TARSPLIT_POSITION)
    if ts_value:
        ts_offset, ts_size, ts_usize = parse_position(ts_value, fields=3)
    elif toc_bytes.footer is not None:
        f = toc_bytes.footer
        ts_offset, ts_size, ts_usize = f.tar_split_offset, f.tar_split_size, f.tar_split_uncompressed_size
    return ZstdChunkedToc(
        toc=toc,
        toc_digest=toc_digest,
        format=FORMAT_ZSTD_CHUNKED,
        compression=COMPRESSION_ZSTD,
        toc_offset=toc_bytes.toc_offset,
        decompress_chunk=decompress_chunk,
        toc_size=len(toc_json),
        flavour=flavour,
        toc_compressed_size=len(toc_bytes.compressed),
        tar_split_digest=doc.tar_split_digest,
        tar_split_offset=ts_offset,
        tar_split_size=ts_size,
        tar_split_uncompressed_size=ts_usize,
    )


def _read_containers(
    toc_bytes: _TocBytes, expected_toc_digest: str, annotations: Mapping[str, str], max_toc_size: int,
    limits: TocLimits,
) -> ZstdChunkedToc:
    toc_digest = sha256_digest(toc_bytes.compressed)
    if toc_digest != expected_toc_digest:
        raise DigestMismatchError("zstd:chunked TOC (compressed)", expected_toc_digest, toc_digest)
    toc_json = _decompress_bounded(toc_bytes.compressed, max_toc_size, "zstd:chunked TOC", toc_bytes.uncompressed_size)
    return _finish(toc_bytes, toc_json, toc_digest, FLAVOUR_CONTAINERS, annotations, limits)


def _read_stargz(
    toc_bytes: _TocBytes, expected_toc_digest: str, annotations: Mapping[str, str], max_toc_size: int,
    limits: TocLimits,
) -> ZstdChunkedToc:
    toc_json = _decompress_bounded(toc_bytes.compressed, max_toc_size, "zstd:chunked TOC", toc_bytes.uncompressed_size)
    parsed, _ = verified_parse(
        toc_json,
        expected_toc_digest,
        "stargz zstd:chunked TOC (uncompressed)",
        lambda data: _finish(toc_bytes, data, expected_toc_digest, FLAVOUR_STARGZ, annotations, limits),
    )
    return parsed


def containers_toc_digest(annotations: Mapping[str, str]) -> str | None:
    """The manifest checksum (new name, else the old name of containers/storage <= v1.43)."""
    return annotations.get(ANNOTATION_ZSTD_MANIFEST_CHECKSUM) or annotations.get(ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM)


def read_toc(
    read_at: ReadAt,
    blob_size: int,
    annotations: Mapping[str, str],
    *,
    expected_toc_digest: str | None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    tail_size: int = DEFAULT_TAIL_SIZE,
    limits: TocLimits = DEFAULT_LIMITS,
) -> ZstdChunkedToc:
    """Read a containers/storage zstd:chunked TOC (flavour A), authenticated by its compressed bytes.

    `expected_toc_digest` defaults to the `manifest-checksum` annotation; with neither, the TOC
    cannot be trusted and `UnauthenticatedTocError` is raised. The position comes from the
    annotation when present, else from the footer.
    """
    expected = expected_toc_digest or containers_toc_digest(annotations)
    if not expected:
        raise UnauthenticatedTocError("zstd:chunked layer has no manifest-checksum and no TOC digest was given")
    toc_bytes = _fetch_toc(
        read_at, blob_size, manifest_position(annotations), max_toc_size=max_toc_size, tail_size=tail_size
    )
    return _read_containers(toc_bytes, expected, annotations, max_toc_size, limits)


def read_stargz_toc(
    read_at: ReadAt,
    blob_size: int,
    annotations: Mapping[str, str],
    *,
    expected_toc_digest: str | None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    tail_size: int = DEFAULT_TAIL_SIZE,
    limits: TocLimits = DEFAULT_LIMITS,
) -> ZstdChunkedToc:
    """Read a stargz-snapshotter zstdchunked TOC (flavour B), authenticated by its uncompressed JSON.

    `expected_toc_digest` defaults to the `containerd.io/snapshot/stargz/toc.digest` annotation.
    """
    expected = expected_toc_digest or annotations.get(ANNOTATION_TOC_DIGEST)
    if not expected:
        raise UnauthenticatedTocError("stargz zstd:chunked layer has no toc.digest and no TOC digest was given")
    toc_bytes = _fetch_toc(
        read_at, blob_size, manifest_position(annotations), max_toc_size=max_toc_size, tail_size=tail_size
    )
    return _read_stargz(toc_bytes, expected, annotations, max_toc_size, limits)


def read_toc_any(
    read_at: ReadAt,
    blob_size: int,
    annotations: Mapping[str, str],
    *,
    key_digest: str | None = None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    tail_size: int = DEFAULT_TAIL_SIZE,
    limits: TocLimits = DEFAULT_LIMITS,
) -> ZstdChunkedToc:
    """Read either flavour, deciding as containers/image does (`GetTOCDigest`).

    With `containerd.io/snapshot/stargz/toc.digest` the layer is flavour B; with a
    manifest-checksum/position annotation (new or old names) flavour A. With no annotation at
    all, the footer decides: a 56/64-byte footer is A; for a 40-byte footer (written by both) the
    `key_digest` decides: it matches the compressed TOC (A) or the uncompressed JSON (B).
    `key_digest` (an ALS lookup key) overrides the annotation digest when given.

    I/O: one exact read of the TOC when a position annotation exists, else one tail read of
    `tail_size` bytes, plus a second read only if the TOC starts before that window.
    """
    stargz_digest = annotations.get(ANNOTATION_TOC_DIGEST)
    containers_digest = containers_toc_digest(annotations)
    if stargz_digest and annotations.get(ANNOTATION_ZSTD_MANIFEST_CHECKSUM):
        raise InvalidAnnotationError("layer has both zstd:chunked and eStargz TOC digests")
    position = manifest_position(annotations)
    if stargz_digest or containers_digest or position:
        toc_bytes = _fetch_toc(read_at, blob_size, position, max_toc_size=max_toc_size, tail_size=tail_size)
        if stargz_digest:
            return _read_stargz(toc_bytes, key_digest or stargz_digest, annotations, max_toc_size, limits)
        expected = key_digest or containers_digest
        if not expected:
            raise UnauthenticatedTocError("zstd:chunked layer has a manifest position but no checksum")
        return _read_containers(toc_bytes, expected, annotations, max_toc_size, limits)
    if not key_digest:
        raise UnauthenticatedTocError("zstd:chunked layer without annotations and no TOC digest given")
    toc_bytes = _fetch_toc(read_at, blob_size, None, max_toc_size=max_toc_size, tail_size=tail_size)
    assert toc_bytes.footer is not None
    if toc_bytes.footer.size != LEGACY_FOOTER_SIZE or sha256_digest(toc_bytes.compressed) == key_digest:
        return _read_containers(toc_bytes, key_digest, annotations, max_toc_size, limits)
    return _read_stargz(toc_bytes, key_digest, annotations, max_toc_size, limits)


def decompress_chunk(compressed: bytes, chunk: Chunk) -> bytes:
    """Exactly `chunk.size` verified bytes of the chunk whose zstd frame(s) start `compressed`.

    `compressed` holds the blob bytes `[chunk.blob_offset, chunk.blob_end)` (more is fine: output
    stops after `inner_offset + size` bytes, which also bounds memory against hostile frames). A
    `zeros` chunk is synthesised without decompressing anything when its digest agrees, so the
    caller may pass `b""` for it.
    """
    what = f"zstd chunk at blob offset {chunk.blob_offset} (file offset {chunk.file_offset}, {chunk.size} bytes)"
    if chunk.zeros:
        payload = bytes(chunk.size)
        if sha256_digest(payload) == chunk.digest or not compressed:
            actual = sha256_digest(payload)
            if actual != chunk.digest:
                raise DigestMismatchError(what, chunk.digest, actual)
            return payload
    want = chunk.inner_offset + chunk.size
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True) as r:
            out = _read_up_to(r, want)
    except zstandard.ZstdError as e:
        raise DigestMismatchError(what, chunk.digest, f"undecodable zstd data ({e})") from None
    payload = out[chunk.inner_offset :] if chunk.inner_offset else out
    actual = sha256_digest(payload)
    if actual != chunk.digest:
        raise DigestMismatchError(f"{what}, got {len(payload)} bytes", chunk.digest, actual)
    return payload


def read_tar_split(read_at: ReadAt, parsed: ZstdChunkedToc, *, max_size: int = DEFAULT_MAX_TOC_SIZE) -> bytes:
    """The uncompressed tar-split stream, verified against the TOC's `tarSplitDigest`.

    Only needed to re-create the exact uncompressed tar (DiffID, push), never to read files.
    """
    if not parsed.tar_split_digest:
        raise TarSplitUnavailableError("the TOC has no tarSplitDigest: any tar-split in the blob is unauthenticated")
    if parsed.tar_split_size <= 0 or parsed.tar_split_offset < SKIPPABLE_HEADER_SIZE:
        raise TarSplitUnavailableError("the TOC names a tar-split digest but its position is unknown")
    _check_sizes(parsed.tar_split_size, parsed.tar_split_uncompressed_size, max_size)
    data = read_exact(read_at, parsed.tar_split_offset, parsed.tar_split_size)
    actual = sha256_digest(data)
    if actual != parsed.tar_split_digest:
        raise DigestMismatchError("zstd:chunked tar-split", parsed.tar_split_digest, actual)
    return bytes(_decompress_bounded(data, max_size, "zstd:chunked tar-split", parsed.tar_split_uncompressed_size))


from .zstd_chunked_writer import build_zstd_chunked  # noqa: E402  (re-export for `convert`)

__all__ = [
    "DEFAULT_MAX_TOC_SIZE",
    "FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "MEDIA_TYPE_LAYER_ZSTD",
    "NoZstdChunkedFooterError",
    "skippable_frame",
    "DEFAULT_TAIL_SIZE",
    "FLAVOUR_CONTAINERS",
    "FLAVOUR_STARGZ",
    "ZstdChunkedFooter",
    "ZstdChunkedToc",
    "build_zstd_chunked",
    "decompress_chunk",
    "manifest_position",
    "parse_footer",
    "read_stargz_toc",
    "read_tar_split",
    "read_toc",
    "read_toc_any",
]
