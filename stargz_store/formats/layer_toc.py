"""What the format readers and writers hand to the rest of the program.

`ParsedToc` is a verified TOC together with the codec that can decompress and verify its chunks;
`BuildResult` is what a writer produced. Both are format-neutral so `layer`, `fs` and `convert`
never branch on the format.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, TypeVar

from .errors import DigestMismatchError, OutOfBoundsError
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


_T = TypeVar("_T")

# Below this many bytes a second thread costs more than hashing on this one.
_CONCURRENT_HASH_MIN = 1 << 20


def verified_parse(data: bytes, expected: str | None, what: str, parse: Callable[[bytes], _T]) -> tuple[_T, str]:
    """`(parse(data), sha256_digest(data))`, raising `DigestMismatchError` when `expected` is
    given and differs; the mismatch wins over any error of `parse`.

    A large TOC is hashed on another thread while this one parses it: hashlib releases the GIL,
    so on a multi-core machine the hash (~15 ms for a 25 MB TOC) costs no time. Parsing bytes
    not yet authenticated is safe (the parsers validate hostile input anyway); nothing parsed is
    returned unless the digest matched.
    """
    if len(data) < _CONCURRENT_HASH_MIN:
        digest = sha256_digest(data)
        if expected is not None and digest != expected:
            raise DigestMismatchError(what, expected, digest)
        return parse(data), digest
    result: list[str] = []
    hasher = threading.Thread(target=lambda: result.append(sha256_digest(data)), name="toc-hash", daemon=True)
    hasher.start()
    try:
        parsed = parse(data)
    except BaseException:
        hasher.join()
        if result and expected is not None and result[0] != expected:
            raise DigestMismatchError(what, expected, result[0]) from None
        raise
    hasher.join()
    digest = result[0]
    if expected is not None and digest != expected:
        raise DigestMismatchError(what, expected, digest)
    return parsed, digest


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
    # The prioritized paths (normalised) this layer holds, in their order: what a converter
    # checks a record against (a recorded path in no layer at all is worth a warning).
    prioritized_found: tuple[str, ...] = ()
