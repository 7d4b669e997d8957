"""Reading eStargz (and legacy stargz) layers: locate, authenticate and parse the TOC; decompress chunks.

The caller supplies the I/O as a `ReadAt` (a registry range request or a local file), so this
module stays free of network and disk. `read_toc` costs one request for most layers: the tail
window usually holds the whole TOC member as well as the footer (`estargz.md` §4).
"""
from __future__ import annotations

import logging
import posixpath

from .errors import BadFooterError, DigestMismatchError, NotLazyFormatError, TocTooLargeError
from .estargz_footer import FOOTER_SIZE, LEGACY_FOOTER_SIZE, build_footer, parse_footer
from .file_reader import read_file
from . import inflate
from .inflate import INFLATE_ERRORS
from .layer_toc import COMPRESSION_GZIP, FORMAT_ESTARGZ, ParsedToc, ReadAt, read_exact, sha256_digest, verified_parse
from .toc import DEFAULT_LIMITS, DIR, REG, Chunk, Toc, TocEntry, TocLimits, parse_toc_document
from .toc_member import TAR_HEADER_SLACK, extract_toc_json

log = logging.getLogger(__name__)

DEFAULT_MAX_TOC_SIZE = 150 << 20
DEFAULT_TAIL_SIZE = 512 << 10

__all__ = [
    "DEFAULT_MAX_TOC_SIZE",
    "EStargzReader",
    "DEFAULT_TAIL_SIZE",
    "FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "build_footer",
    "decompress_chunk",
    "parse_footer",
    "parse_toc_json",
    "read_file",
    "read_toc",
]


def parse_toc_json(toc_json: bytes | bytearray, *, data_end: int, limits: TocLimits = DEFAULT_LIMITS) -> Toc:
    """Decode the TOC JSON and build the validated tree (`toc.parse_toc_document`)."""
    return parse_toc_document(toc_json, data_end=data_end, limits=limits)


def read_toc(
    read_at: ReadAt,
    blob_size: int,
    *,
    expected_toc_digest: str | None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    tail_size: int = DEFAULT_TAIL_SIZE,
    limits: TocLimits = DEFAULT_LIMITS,
) -> ParsedToc:
    """Locate, authenticate and parse the TOC of an eStargz blob of `blob_size` bytes.

    Reads the last `min(blob_size, tail_size)` bytes once; a second read happens only when the
    TOC starts before that window. The JSON is checked against `expected_toc_digest` (the
    layer's `toc.digest` annotation, or the ALS lookup key) before any of it is trusted; `None`
    skips the check for callers that have no digest (schema-2 manifests). `max_toc_size` caps
    the compressed member and its JSON (checked while inflating), `limits` the tree.
    """
    if blob_size < LEGACY_FOOTER_SIZE:
        raise NotLazyFormatError(f"blob of {blob_size} bytes is too small to be eStargz")
    window = min(blob_size, max(tail_size, FOOTER_SIZE))
    window_start = blob_size - window
    tail = read_exact(read_at, window_start, window)
    toc_offset, footer_size = parse_footer(tail)
    toc_end = blob_size - footer_size
    if not 0 <= toc_offset < toc_end:
        raise BadFooterError(f"footer points at TOC offset {toc_offset}, outside the blob data [0, {toc_end})")
    compressed_size = toc_end - toc_offset
    # A gzip member is never much bigger than its content; this bounds the second read.
    if compressed_size > max_toc_size + TAR_HEADER_SLACK + (max_toc_size >> 8) + 1024:
        raise TocTooLargeError(f"compressed TOC is {compressed_size} bytes, over the cap of {max_toc_size}")
    tail_view = memoryview(tail)
    if toc_offset >= window_start:
        member: list[bytes | memoryview] = [tail_view[toc_offset - window_start : toc_end - window_start]]
    else:
        log.debug("TOC at %d starts before the %d-byte tail window; second read", toc_offset, window)
        head = read_exact(read_at, toc_offset, window_start - toc_offset)
        member = [head, tail_view[: toc_end - window_start]]
    toc_json = extract_toc_json(member, max_toc_size)
    del member, tail_view
    toc, toc_digest = verified_parse(
        toc_json, expected_toc_digest, "eStargz TOC",
        lambda data: parse_toc_json(data, data_end=toc_offset, limits=limits),
    )
    return ParsedToc(
        toc=toc,
        toc_digest=toc_digest,
        format=FORMAT_ESTARGZ,
        compression=COMPRESSION_GZIP,
        toc_offset=toc_offset,
        decompress_chunk=decompress_chunk,
        toc_size=len(toc_json),
    )


def decompress_chunk(compressed: bytes, chunk: Chunk) -> bytes:
    """Exactly `chunk.size` verified bytes from the gzip data starting at `chunk.blob_offset`.

    `compressed` holds the blob bytes `[chunk.blob_offset, chunk.blob_end)` (more is fine). The
    member may continue past the chunk (tar padding, next headers); that rest is never inflated.
    """
    want = chunk.inner_offset + chunk.size
    try:
        d = inflate.decompressobj(31)
        out = d.decompress(compressed, want)
        if len(out) < want and d.eof and d.unused_data:
            # A piece may, unusually, straddle two members: keep inflating the next ones.
            parts = [out]
            have = len(out)
            rest = d.unused_data
            while have < want and rest:
                d = inflate.decompressobj(31)
                more = d.decompress(rest, want - have)
                parts.append(more)
                have += len(more)
                if not d.eof:
                    break
                rest = d.unused_data
            out = b"".join(parts)
    except INFLATE_ERRORS as e:
        raise DigestMismatchError(
            f"chunk at blob offset {chunk.blob_offset} (file offset {chunk.file_offset})",
            chunk.digest,
            f"undecodable gzip data ({e})",
        ) from None
    payload = out[chunk.inner_offset : want] if chunk.inner_offset else out
    actual = sha256_digest(payload)
    if actual != chunk.digest:
        raise DigestMismatchError(
            f"chunk at blob offset {chunk.blob_offset} (file offset {chunk.file_offset}, {len(payload)}/{chunk.size} bytes)",
            chunk.digest,
            actual,
        )
    return payload


class EStargzReader:
    """An authenticated eStargz blob, read through `read_at` (tarfile-style convenience).

    Opening costs what `read_toc` costs; `read` fetches and verifies whole chunks, uncached.
    """

    def __init__(
        self,
        read_at: ReadAt,
        blob_size: int,
        *,
        expected_toc_digest: str | None,
        max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
        tail_size: int = DEFAULT_TAIL_SIZE,
        limits: TocLimits = DEFAULT_LIMITS,
    ) -> None:
        self._read_at = read_at
        self.blob_size = blob_size
        self.parsed = read_toc(
            read_at, blob_size, expected_toc_digest=expected_toc_digest, max_toc_size=max_toc_size,
            tail_size=tail_size, limits=limits,
        )

    @property
    def toc(self) -> Toc:
        return self.parsed.toc

    @property
    def toc_digest(self) -> str:
        return self.parsed.toc_digest

    def lookup(self, path: str) -> TocEntry | None:
        """The entry at `path` (any spelling: `./a/b`, `/a/b`, `a/b/`); None when absent."""
        return self.parsed.toc.lookup(posixpath.normpath("/" + path).lstrip("/"))

    def read(self, path: str, offset: int = 0, length: int = -1) -> bytes:
        """Verified bytes of regular file `path`; `FileNotFoundError` / `IsADirectoryError` as open() would."""
        entry = self.lookup(path)
        if entry is None:
            raise FileNotFoundError(path)
        if entry.type != REG:
            raise IsADirectoryError(path) if entry.type == DIR else ValueError(f"{path!r} is a {entry.type}, not a file")
        return read_file(self.parsed, self._read_at, entry, offset, length)


from .estargz_writer import build_estargz  # noqa: E402  (re-export; the writer does not import this module)

__all__.append("build_estargz")
