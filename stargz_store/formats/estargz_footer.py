"""The eStargz footers (`estargz.md` §3): where the TOC starts, in an empty gzip member.

Two generations are read: the 51-byte eStargz footer (RFC 1952 extra subfield `SG`) and the
47-byte legacy stargz footer (the extra field is the bare 22-byte payload). Only the first is
written. Both end the blob, so a reader tries each length on the blob's last bytes.
"""
from __future__ import annotations

import struct

from .errors import BadFooterError, NotLazyFormatError

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46

_MAGIC = b"STARGZ"
_EXTERNAL_TOC_MAGIC = b"STARGZEXTERNALTOC"
_GZIP_FEXTRA_HEADER = b"\x1f\x8b\x08\x04"
# An empty final stored deflate block, then CRC32 = 0 and ISIZE = 0: the member holds no data.
_EMPTY_DEFLATE_AND_TRAILER = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


def build_footer(toc_offset: int) -> bytes:
    """The 51-byte footer pointing at `toc_offset`, byte-identical to the Go writer's."""
    if not 0 <= toc_offset < 1 << 63:
        raise ValueError(f"TOC offset {toc_offset} does not fit the footer")
    payload = b"%016x" % toc_offset + _MAGIC
    subfield = b"SG" + struct.pack("<H", len(payload)) + payload
    header = _GZIP_FEXTRA_HEADER + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", len(subfield))
    footer = header + subfield + _EMPTY_DEFLATE_AND_TRAILER
    assert len(footer) == FOOTER_SIZE
    return footer


def _parse_hex_offset(text: bytes, what: str) -> int:
    try:
        value = int(text.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise BadFooterError(f"{what}: TOC offset {text!r} is not hexadecimal") from None
    if text[:1] in (b"+", b"-") or b"_" in text or b" " in text:
        raise BadFooterError(f"{what}: TOC offset {text!r} is not plain hexadecimal")
    return value


def _parse_estargz(footer: bytes) -> int:
    """Rules of `GzipDecompressor.ParseFooter`: SG subfield of length 22 ending in STARGZ."""
    xlen = struct.unpack_from("<H", footer, 10)[0]
    if xlen < 4 or 12 + xlen > len(footer):
        raise BadFooterError(f"eStargz footer: extra field length {xlen} is invalid")
    extra = footer[12 : 12 + xlen]
    if extra[:2] != b"SG":
        raise BadFooterError(f"eStargz footer: extra subfield id {extra[:2]!r}, expected b'SG'")
    sublen = struct.unpack_from("<H", extra, 2)[0]
    if sublen != 22 or len(extra) < 4 + 22:
        raise BadFooterError(f"eStargz footer: subfield length {sublen}, expected 22")
    payload = extra[4 : 4 + 22]
    if payload[16:] != _MAGIC:
        raise BadFooterError(f"eStargz footer: magic {payload[16:]!r}, expected {_MAGIC!r}")
    return _parse_hex_offset(payload[:16], "eStargz footer")


def _parse_legacy(footer: bytes) -> int:
    xlen = struct.unpack_from("<H", footer, 10)[0]
    if xlen != 22:
        raise BadFooterError(f"legacy stargz footer: extra field length {xlen}, expected 22")
    payload = footer[12:34]
    if payload[16:] != _MAGIC:
        raise BadFooterError(f"legacy stargz footer: magic {payload[16:]!r}, expected {_MAGIC!r}")
    return _parse_hex_offset(payload[:16], "legacy stargz footer")


def parse_footer(tail: bytes) -> tuple[int, int]:
    """`(toc_offset, footer_size)` from the last bytes of a blob (at least 47 of them).

    Raises `NotLazyFormatError` when the tail carries no gzip footer at all (a plain layer, the
    common case), `BadFooterError` when a footer-shaped gzip header is there but its fields or
    magic are wrong. The offset is not checked against the blob size here.
    """
    candidates = [
        (size, tail[-size:])
        for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE)
        if len(tail) >= size and tail[-size:].startswith(_GZIP_FEXTRA_HEADER)
    ]
    if len(tail) >= EXTERNAL_TOC_FOOTER_SIZE:
        ext = tail[-EXTERNAL_TOC_FOOTER_SIZE:]
        if ext.startswith(_GZIP_FEXTRA_HEADER) and _EXTERNAL_TOC_MAGIC in ext:
            raise NotLazyFormatError("blob uses an external TOC (STARGZEXTERNALTOC), which is not supported")
    if not candidates:
        raise NotLazyFormatError("no eStargz or stargz footer at the end of the blob")
    first_error: BadFooterError | None = None
    for size, footer in candidates:
        try:
            offset = _parse_estargz(footer) if size == FOOTER_SIZE else _parse_legacy(footer)
        except BadFooterError as e:
            first_error = first_error or e
            continue
        return offset, size
    assert first_error is not None
    try:
        raise first_error
    finally:
        del first_error  # else this frame, held by the error's traceback, holds the error: a cycle
