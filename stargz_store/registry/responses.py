"""Reading registry responses: bounded bodies, exact single ranges, multi-range answers.

Consumers raise `TransientError` for anything a retry may fix (a body cut short, a server that
answered another range), so `Transport.call` retries them under its bounds.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
import urllib3

from .auth import TransientError
from .errors import (
    DigestMismatchError,
    InvalidReferenceError,
    RangeNotSatisfiableError,
    RegistryTimeoutError,
    ShortReadError,
    UnsupportedManifestError,
    redact_url,
)
from .multipart import MultipartError, boundary_of, parse_byteranges, parse_content_range
from .transport import check_status

READ_CHUNK = 1 << 20


def hasher_for(digest: str) -> Any:
    """A hashlib object for the digest's algorithm (sha256, sha384 or sha512)."""
    algorithm = digest.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512", "sha384"):
        raise InvalidReferenceError(f"unsupported digest algorithm in {digest!r}")
    return hashlib.new(algorithm)


def url_host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1]


def check_same_digest(expected: str, raw: bytes, what: str) -> None:
    h = hasher_for(expected)
    h.update(raw)
    actual = f"{expected.split(':', 1)[0]}:{h.hexdigest()}"
    if actual != expected:
        raise DigestMismatchError(f"{what}: content hashes to {actual}")


def read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise UnsupportedManifestError(f"{what}: {length} bytes exceeds the {limit}-byte limit")
    data = read_exact_body(resp, limit + 1)
    if len(data) > limit:
        raise UnsupportedManifestError(f"{what}: larger than the {limit}-byte limit")
    return data


def read_exact_body(resp: requests.Response, limit: int) -> bytes:
    """Read the body (up to `limit`); a connection cut short surfaces as a transient error."""
    try:
        # Decoding only when the server encoded: urllib3's decoder path costs extra copies.
        return resp.raw.read(limit, decode_content="Content-Encoding" in resp.headers)
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError, OSError) as exc:
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            raise TransientError(RegistryTimeoutError(f"reading {redact(resp)} timed out")) from None
        raise TransientError(ShortReadError(f"connection broken while reading {redact(resp)}")) from None
    except urllib3.exceptions.HTTPError as exc:
        raise TransientError(ShortReadError(f"reading {redact(resp)} failed ({type(exc).__name__})")) from None


def read_exactly(resp: requests.Response, length: int, what: str) -> bytes:
    """`length` body bytes; fewer (a body cut short) is a transient ShortReadError."""
    data = read_exact_body(resp, length)
    if len(data) < length:
        raise TransientError(ShortReadError(f"{what}: got {len(data)} of {length} bytes"))
    return data


def redact(resp: requests.Response) -> str:
    return redact_url(resp.url)


# How much of a streamed range is handed on at a time: small enough that the first chunks of a
# large prefetch are usable a few milliseconds after they arrive, large enough to cost nothing.
STREAM_PIECE = 128 << 10

# Receives `(blob offset, bytes)` pieces of a range, in order, as they arrive. After a retry the
# range starts over, so a sink can see bytes again that it already has.
RangeSink = Callable[[int, bytes], None]


def consume_single_range(
    resp: requests.Response, offset: int, length: int, what: str, sink: RangeSink | None = None
) -> bytes:
    """The `length` bytes at `offset`; with a `sink`, they are handed to it piece by piece as they
    arrive instead, and b"" is returned."""
    check_status(resp, what, ok=(200, 206))
    if resp.status_code == 206:
        cr = parse_content_range(resp.headers.get("Content-Range"))
        if cr is None or cr.first != offset:
            raise TransientError(ShortReadError(f"{what}: server answered a different range "
                                                f"({resp.headers.get('Content-Range')!r})"))
        if cr.length < length:
            if cr.total is not None and cr.total < offset + length:
                raise RangeNotSatisfiableError(f"{what}: beyond the end of the {cr.total}-byte blob")
            raise TransientError(ShortReadError(f"{what}: server sent only {cr.length} bytes"))
        if sink is not None:
            return _stream_body(resp, offset, length, what, sink)
        return read_exactly(resp, length, what)
    # 200: the server ignored Range; skip to the offset in the stream and stop after the range.
    skipped = 0
    while skipped < offset:
        got = read_exact_body(resp, min(READ_CHUNK, offset - skipped))
        if not got:
            raise RangeNotSatisfiableError(f"{what}: blob ends at byte {skipped}")
        skipped += len(got)
    if sink is not None:
        return _stream_body(resp, offset, length, what, sink)
    data = read_exact_body(resp, length)
    if len(data) < length:
        total = resp.headers.get("Content-Length")
        if total and total.isdigit() and int(total) < offset + length:
            raise RangeNotSatisfiableError(f"{what}: beyond the end of the {total}-byte blob")
        raise TransientError(ShortReadError(f"{what}: got {len(data)} of {length} bytes"))
    return data


def consume_suffix_range(
    resp: requests.Response, length: int, what: str, full_body_limit: int = 0
) -> tuple[int, int, bytes]:
    """The answer to `Range: bytes=-length`: (offset of the first byte, blob size, the bytes).

    A 206 with a complete Content-Range, or a 200 (a server that ignored the range) whose whole
    body is at most `full_body_limit` bytes: a larger one is left unread (it could be gigabytes)."""
    check_status(resp, what, ok=(200, 206))
    if resp.status_code == 200:
        total = content_length(resp)
        if total is not None and total <= full_body_limit:
            start = max(0, total - length)
            return start, total, read_exactly(resp, total, what)[start:]
        raise ShortReadError(f"{what}: no usable suffix range in the answer (HTTP 200 with the whole "
                             f"{total if total is not None else '?'}-byte blob)")
    cr = parse_content_range(resp.headers.get("Content-Range"))
    if cr is None or cr.total is None or cr.last != cr.total - 1 or cr.length > length:
        raise ShortReadError(f"{what}: no usable suffix range in the answer (HTTP {resp.status_code}, "
                             f"Content-Range {resp.headers.get('Content-Range')!r})")
    return cr.first, cr.total, read_exactly(resp, cr.length, what)


def content_length(resp: requests.Response) -> int | None:
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _stream_body(resp: requests.Response, offset: int, length: int, what: str, sink: RangeSink) -> bytes:
    done = 0
    while done < length:
        piece = read_exact_body(resp, min(STREAM_PIECE, length - done))
        if not piece:
            raise TransientError(ShortReadError(f"{what}: got {done} of {length} bytes"))
        sink(offset + done, piece)
        done += len(piece)
    return b""


def consume_multi_range(resp: requests.Response, regions: list[tuple[int, int]], what: str) -> list[tuple[int, bytes]]:
    check_status(resp, what, ok=(200, 206))
    if resp.status_code == 200:
        end = max(off + length for off, length in regions)
        parts: list[tuple[int, bytes]] = []
        data = read_exact_body(resp, end)
        if len(data) < end:
            raise TransientError(ShortReadError(f"{what}: body ended at byte {len(data)}"))
        for off, length in regions:
            parts.append((off, data[off:off + length]))
        return parts
    boundary = boundary_of(resp.headers.get("Content-Type", ""))
    if boundary is None:
        cr = parse_content_range(resp.headers.get("Content-Range"))
        if cr is None:
            raise TransientError(ShortReadError(f"{what}: 206 without Content-Range"))
        return [(cr.first, read_exactly(resp, cr.length, what))]
    expected = resp.headers.get("Content-Length")
    limit = int(expected) if expected and expected.isdigit() else sum(l for _, l in regions) + 4096 * len(regions) + 65536
    body = read_exact_body(resp, limit)
    if expected and expected.isdigit() and len(body) != int(expected):
        raise TransientError(ShortReadError(f"{what}: got {len(body)} of {expected} multipart bytes"))
    try:
        return parse_byteranges(body, boundary)
    except MultipartError as exc:
        raise TransientError(ShortReadError(f"{what}: bad multipart body ({exc})")) from None

