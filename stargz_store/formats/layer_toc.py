"""What the format readers and writers hand to the rest of the program.

`ParsedToc` is a verified TOC together with the codec that can decompress and verify its chunks;
`BuildResult` is what a writer produced. Both are format-neutral so `layer`, `fs` and `convert`
never branch on the format.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from .errors import OutOfBoundsError
from .toc import Chunk, Toc

# containers/storage `archive.Compression` values, as the ALS `info` file reports them.
COMPRESSION_GZIP = 2
COMPRESSION_ZSTD = 4

FORMAT_ESTARGZ = "estargz"
FORMAT_ZSTD_CHUNKED = "zstd:chunked"

# Layer descriptor annotations (estargz.md §9, zstd-chunked.md §2.5).
ANNOTATION_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ANNOTATION_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ANNOTATION_ZSTD_MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ANNOTATION_ZSTD_MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ANNOTATION_ZSTD_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ANNOTATION_ZSTD_OLD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"

# Reads `length` bytes of the blob at `offset` (the caller's I/O: a registry range or a file).
ReadAt = Callable[[int, int], bytes]


def sha256_digest(data: bytes) -> str:
    """`sha256:<hex>`, the only digest algorithm these formats use."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_exact(read_at: ReadAt, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, or `OutOfBoundsError`: a short read means the blob is not what its TOC says."""
    data = read_at(offset, length)
    if len(data) != length:
        raise OutOfBoundsError(f"short read: wanted {length} bytes at {offset}, got {len(data)}")
    return data


class ChunkDecompressor(Protocol):
    def __call__(self, compressed: bytes, chunk: Chunk) -> bytes:
        """Decompress one chunk's compressed extent and return exactly its verified bytes.

        Raises `DigestMismatchError` when the bytes do not hash to `chunk.digest`.
        """


@dataclass(frozen=True)
class ParsedToc:
    """A TOC that has been authenticated, and how to read the chunks it describes.

    `toc_digest` is the layer's TOC digest as containers/image computes it (`GetTOCDigest`):
    sha256 of the uncompressed JSON for eStargz and stargz-flavoured zstd, sha256 of the
    compressed TOC for containers/storage zstd:chunked. It is the ALS lookup key of podman 5.1+.
    """

    toc: Toc
    toc_digest: str
    format: str
    compression: int
    toc_offset: int
    decompress_chunk: ChunkDecompressor
    toc_size: int = 0


@dataclass(frozen=True)
class BuildResult:
    """A layer blob written by one of our writers, with everything its descriptor needs."""

    digest: str
    size: int
    toc_digest: str
    diff_id: str
    diff_size: int
    media_type: str
    annotations: Mapping[str, str] = field(default_factory=dict)
