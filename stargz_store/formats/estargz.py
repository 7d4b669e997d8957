"""Reading eStargz (and legacy stargz) layers: locate, authenticate and parse the TOC; decompress chunks.

The caller supplies the I/O as a `ReadAt` (a registry range request or a local file), so this
module stays free of network and disk. `read_toc` costs one request for most layers: the tail
window usually holds the whole TOC member as well as the footer (`estargz.md` §4).
"""
from __future__ import annotations

import io
import logging
import posixpath
import tarfile

from .errors import (
    BadFooterError,
    DigestMismatchError,
    InvalidTocError,
    NotLazyFormatError,
    TocTooLargeError,
)
from .estargz_footer import FOOTER_SIZE, LEGACY_FOOTER_SIZE, build_footer, parse_footer
from .file_reader import read_file
from . import inflate
from .inflate import INFLATE_ERRORS
from .layer_toc import COMPRESSION_GZIP, FORMAT_ESTARGZ, ParsedToc, ReadAt, read_exact, sha256_digest, verified_parse
from .toc import DIR, REG, TOC_TAR_NAME, Chunk, Toc, TocEntry, parse_toc_document

log = logging.getLogger(__name__)

DEFAULT_MAX_TOC_SIZE = 150 << 20
DEFAULT_TAIL_SIZE = 512 << 10
# Room for the TOC entry's tar header(s) (a PAX header included) on top of the JSON itself.
_TAR_HEADER_SLACK = 64 << 10

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






def _extract_toc_json(member: bytes, max_toc_size: int) -> bytes:
    """The JSON payload of the TOC member: a gzip member holding a tar entry `stargz.index.json`.

    Only that one member is decompressed (the footer member after it is never touched), and no
    more output than the cap allows is produced, so a hostile member cannot exhaust memory.
    The usual member (one plain ustar header, then the JSON) is inflated header first and then
    straight into the JSON bytes, so a 25 MB TOC is not held twice (tar stream + extracted copy)
    at the resolve's peak; anything else (PAX headers, GNU long names) takes the tarfile path.
    """
    direct = _extract_toc_json_direct(member, max_toc_size)
    if direct is not None:
        return direct
    limit = max_toc_size + _TAR_HEADER_SLACK
    d = inflate.decompressobj(31)
    try:
        tar_bytes = d.decompress(member, limit)
    except INFLATE_ERRORS as e:
        raise InvalidTocError(f"TOC member is not valid gzip: {e}") from None
    if not d.eof and d.unconsumed_tail and len(tar_bytes) >= limit:
        raise TocTooLargeError(f"TOC member decompresses to more than {limit} bytes (cap {max_toc_size})")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:", encoding="utf-8") as tar:
            info = tar.next()
            if info is None:
                raise InvalidTocError("TOC member holds no tar entry")
            if info.name != TOC_TAR_NAME:
                raise InvalidTocError(f"first entry of the TOC member is {info.name!r}, expected {TOC_TAR_NAME!r}")
            if not info.isreg():
                raise InvalidTocError(f"{TOC_TAR_NAME} in the TOC member is not a regular file")
            if info.size > max_toc_size:
                raise TocTooLargeError(f"TOC is {info.size} bytes, over the cap of {max_toc_size}")
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
    except tarfile.TarError as e:
        raise InvalidTocError(f"TOC member is not a valid tar stream: {e}") from None
    if len(data) != info.size:
        raise InvalidTocError(f"TOC member is truncated: {len(data)} of {info.size} JSON bytes")
    return data


def _extract_toc_json_direct(member: bytes, max_toc_size: int) -> bytes | None:
    """The JSON when the member starts with a plain regular-file header for it; None otherwise
    (the caller then decodes the member generically, which also produces the precise errors)."""
    d = inflate.decompressobj(31)
    try:
        header = d.decompress(member, tarfile.BLOCKSIZE)
        if len(header) != tarfile.BLOCKSIZE:
            return None
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except (*INFLATE_ERRORS, tarfile.TarError):
        return None
    if info.name != TOC_TAR_NAME or info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.size > max_toc_size:
        return None
    try:
        data = d.decompress(d.unconsumed_tail, info.size) if info.size else b""
    except INFLATE_ERRORS:
        return None
    if len(data) != info.size:
        return None
    return data


def parse_toc_json(toc_json: bytes, *, data_end: int) -> Toc:
    """Decode the TOC JSON and build the validated tree (`toc.parse_toc_document`)."""
    return parse_toc_document(toc_json, data_end=data_end)


def read_toc(
    read_at: ReadAt,
    blob_size: int,
    *,
    expected_toc_digest: str | None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    tail_size: int = DEFAULT_TAIL_SIZE,
) -> ParsedToc:
    """Locate, authenticate and parse the TOC of an eStargz blob of `blob_size` bytes.

    Reads the last `min(blob_size, tail_size)` bytes once; a second read happens only when the
    TOC starts before that window. The JSON is checked against `expected_toc_digest` (the
    layer's `toc.digest` annotation, or the ALS lookup key) before any of it is trusted; `None`
    skips the check for callers that have no digest (schema-2 manifests).
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
    if compressed_size > max_toc_size + _TAR_HEADER_SLACK + (max_toc_size >> 8) + 1024:
        raise TocTooLargeError(f"compressed TOC is {compressed_size} bytes, over the cap of {max_toc_size}")
    if toc_offset >= window_start:
        member = tail[toc_offset - window_start : toc_end - window_start]
    else:
        log.debug("TOC at %d starts before the %d-byte tail window; second read", toc_offset, window)
        head = read_exact(read_at, toc_offset, window_start - toc_offset)
        member = head + tail[: toc_end - window_start]
    toc_json = _extract_toc_json(member, max_toc_size)
    toc, toc_digest = verified_parse(
        toc_json, expected_toc_digest, "eStargz TOC", lambda data: parse_toc_json(data, data_end=toc_offset)
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
    ) -> None:
        self._read_at = read_at
        self.blob_size = blob_size
        self.parsed = read_toc(
            read_at, blob_size, expected_toc_digest=expected_toc_digest, max_toc_size=max_toc_size, tail_size=tail_size
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
