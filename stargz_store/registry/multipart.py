"""Byte-range helpers: Content-Range parsing, region merging and multipart/byteranges bodies.

Parts are located by their own Content-Range and length, never by request order, because servers
may reorder or coalesce ranges (RFC 9110 §14.6); a preamble before the first boundary is ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class MultipartError(ValueError):
    """The multipart/byteranges body does not match its own headers."""


@dataclass(frozen=True)
class ContentRange:
    first: int
    last: int  # inclusive
    total: int | None

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def parse_content_range(value: str | None) -> ContentRange | None:
    """`bytes a-b/total` (total may be `*`); None when absent or not a satisfied range."""
    if not value:
        return None
    m = _CONTENT_RANGE_RE.match(value)
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if last < first:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return ContentRange(first, last, total)


def merge_regions(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) pairs -> sorted, non-overlapping, non-adjacent (offset, length) regions."""
    spans = sorted((off, off + length) for off, length in ranges if length > 0)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


def range_header(regions: list[tuple[int, int]]) -> str:
    return "bytes=" + ",".join(f"{off}-{off + length - 1}" for off, length in regions)


def boundary_of(content_type: str) -> str | None:
    """The boundary parameter of a `multipart/byteranges` Content-Type, else None."""
    kind, _, rest = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    for param in rest.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


def parse_byteranges(body: bytes, boundary: str) -> list[tuple[int, bytes]]:
    """Parts of a multipart/byteranges body as (first byte offset, data); raise MultipartError."""
    delim = b"--" + boundary.encode("latin-1")
    parts: list[tuple[int, bytes]] = []
    pos = body.find(delim)
    if pos < 0:
        raise MultipartError("no boundary in multipart body")
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise MultipartError("truncated multipart body (no line end after boundary)")
        pos = eol + 2
        header_end = pos if body.startswith(b"\r\n", pos) else body.find(b"\r\n\r\n", pos)
        if header_end < 0:
            raise MultipartError("truncated multipart part headers")
        content_range = None
        for line in body[pos:header_end].split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                content_range = parse_content_range(value)
        if content_range is None:
            raise MultipartError("multipart part without a valid Content-Range")
        start = header_end + (2 if header_end == pos else 4)
        data = body[start:start + content_range.length]
        if len(data) != content_range.length:
            raise MultipartError(
                f"multipart part {content_range.first}-{content_range.last} has {len(data)} bytes")
        parts.append((content_range.first, data))
        pos = body.find(delim, start + content_range.length)
        if pos < 0:
            raise MultipartError("multipart body ends without a closing boundary")


def slice_from_parts(parts: list[tuple[int, bytes]], offset: int, length: int) -> bytes | None:
    """Bytes [offset, offset+length) if a single part covers them, else None."""
    for start, data in parts:
        if start <= offset and offset + length <= start + len(data):
            return data[offset - start:offset - start + length]
    return None
