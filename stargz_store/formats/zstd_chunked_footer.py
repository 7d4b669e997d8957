"""The binary pieces of a zstd:chunked blob: skippable frames and the footer (`zstd-chunked.md` §1, §2.3, §2.4).

Shared by the reader and the writer; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BadFooterError, NotLazyFormatError

MEDIA_TYPE_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
SKIPPABLE_HEADER_SIZE = 8
FOOTER_MAGIC = b"GNUlInUx"  # containers/storage >= v1.50, at [56:64] of the 64-byte footer
LEGACY_FOOTER_MAGIC = b"GnUlInUx"  # older writers and stargz-snapshotter, at [32:40]
FOOTER_SIZE = 64
FOOTER_SIZE_V1_47 = 56
LEGACY_FOOTER_SIZE = 40
MANIFEST_TYPE_CRFS = 1
# The whole footer frame of the current layout: what a reader without annotations must fetch.
MIN_TAIL = SKIPPABLE_HEADER_SIZE + FOOTER_SIZE


class NoZstdChunkedFooterError(NotLazyFormatError, BadFooterError):
    """The blob's tail holds no zstd:chunked footer magic: a plain layer, or a damaged one."""


def skippable_frame_header(size: int) -> bytes:
    return SKIPPABLE_MAGIC + size.to_bytes(4, "little")


def skippable_frame(payload: bytes) -> bytes:
    return skippable_frame_header(len(payload)) + payload


@dataclass(frozen=True)
class ZstdChunkedFooter:
    """What a footer of any generation says. `size` is the payload size: 40, 56 or 64."""

    toc_offset: int
    toc_size: int
    toc_uncompressed_size: int
    manifest_type: int
    size: int
    tar_split_offset: int = 0
    tar_split_size: int = 0
    tar_split_uncompressed_size: int = 0


def _u64s(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]


def parse_footer(tail: bytes) -> ZstdChunkedFooter:
    """Parse the footer at the end of `tail` (the last bytes of the blob, at least 48 of them).

    Generations (`zstd-chunked.md` §2.4): 64 bytes with `GNUlInUx` at the end (current); 40 bytes
    with `GnUlInUx` at the end (containers/storage <= v1.46 and stargz-snapshotter); 56 bytes
    with `GnUlInUx` at [32:40] and 16 zero bytes (v1.47-v1.49). Each must sit in a skippable frame
    of the matching length.
    """
    if tail.endswith(FOOTER_MAGIC):
        size = FOOTER_SIZE
    elif tail.endswith(LEGACY_FOOTER_MAGIC):
        size = LEGACY_FOOTER_SIZE
    elif tail.endswith(bytes(16)) and tail[-24:-16] == LEGACY_FOOTER_MAGIC:
        size = FOOTER_SIZE_V1_47
    else:
        raise NoZstdChunkedFooterError(f"no zstd:chunked footer magic at the end of the blob (last bytes {tail[-8:].hex()})")
    if len(tail) < size + SKIPPABLE_HEADER_SIZE:
        raise BadFooterError(f"{size}-byte footer, but only {len(tail)} tail bytes available")
    header = tail[-size - SKIPPABLE_HEADER_SIZE : -size]
    if header != skippable_frame_header(size):
        raise BadFooterError(f"{size}-byte footer is not in a skippable frame of that size (header {header.hex()})")
    fields = _u64s(tail[-size:])
    if fields[3] != MANIFEST_TYPE_CRFS:
        raise BadFooterError(f"unsupported zstd:chunked manifest type {fields[3]}")
    if size == FOOTER_SIZE:
        return ZstdChunkedFooter(fields[0], fields[1], fields[2], fields[3], size, fields[4], fields[5], fields[6])
    return ZstdChunkedFooter(fields[0], fields[1], fields[2], fields[3], size)


def build_footer(
    toc_offset: int,
    toc_size: int,
    toc_uncompressed_size: int,
    tar_split_offset: int,
    tar_split_size: int,
    tar_split_uncompressed_size: int,
) -> bytes:
    """The current 64-byte footer payload (containers/storage >= v1.50, `footerDataToBlob`)."""
    fields = (
        toc_offset,
        toc_size,
        toc_uncompressed_size,
        MANIFEST_TYPE_CRFS,
        tar_split_offset,
        tar_split_size,
        tar_split_uncompressed_size,
    )
    return b"".join(v.to_bytes(8, "little") for v in fields) + FOOTER_MAGIC
