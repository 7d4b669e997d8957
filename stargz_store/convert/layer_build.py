"""Converting one layer blob file into one eStargz or zstd:chunked blob file.

A plain function over paths so it runs the same on a thread or in a worker process. The source
is hashed while the writer reads it: a layer whose bytes do not match the manifest's digest is
refused even though its conversion succeeded.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import zstandard

from ..formats.errors import FormatError
from ..formats.layer_toc import FORMAT_ESTARGZ, FORMAT_ZSTD_CHUNKED, BuildResult
from .errors import BlobDigestMismatchError, UnsupportedImageError

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 20
# What a corrupt or non-tar layer makes the input side raise.
_BAD_INPUT = (FormatError, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


@dataclass(frozen=True)
class LayerBuildOptions:
    format: str = FORMAT_ESTARGZ
    prioritized: tuple[str, ...] = ()
    chunk_size: int | None = None  # None: the writer's default
    compression_level: int | None = None  # None: the writer's default
    writer_workers: int = 1


class _HashingReader:
    """Read-through sha256 of everything the writer consumes (plus what it leaves, via `finish`)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        return data

    def readinto(self, buf: Any) -> int:
        n = self._raw.readinto(buf)
        if n:
            self._hash.update(memoryview(buf)[:n])
        return n or 0

    def readable(self) -> bool:
        return True

    def finish(self) -> str:
        while chunk := self._raw.read(_READ_SIZE):
            self._hash.update(chunk)
        return "sha256:" + self._hash.hexdigest()


def _writer(fmt: str) -> Callable[..., BuildResult]:
    if fmt == FORMAT_ESTARGZ:
        try:
            from ..formats.estargz import build_estargz
        except ImportError:
            from ..formats.estargz_writer import build_estargz
        return build_estargz
    if fmt == FORMAT_ZSTD_CHUNKED:
        try:
            from ..formats.zstd_chunked import build_zstd_chunked
        except ImportError:
            from ..formats.zstd_chunked_writer import build_zstd_chunked  # type: ignore[no-redef]
        return build_zstd_chunked
    raise ValueError(f"unknown layer format {fmt!r}")


def _writer_kwargs(writer: Callable[..., BuildResult], options: LayerBuildOptions, tmpdir: Path) -> dict[str, Any]:
    """Only the options this writer takes (a writer without `prioritized` gets no record)."""
    wanted: dict[str, Any] = {"workers": options.writer_workers, "tmpdir": str(tmpdir)}
    if options.prioritized:
        wanted["prioritized"] = options.prioritized
    if options.chunk_size is not None:
        wanted["chunk_size"] = options.chunk_size
    if options.compression_level is not None:
        wanted["compression_level"] = options.compression_level
    accepted = inspect.signature(writer).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def unsupported_options(options: LayerBuildOptions) -> list[str]:
    """The command-line flags set in `options` that the chosen writer has no parameter for."""
    accepted = inspect.signature(_writer(options.format)).parameters
    flags = {"prioritized": ("--record-in", bool(options.prioritized)),
             "chunk_size": ("--chunk-size", options.chunk_size is not None),
             "compression_level": ("--compression-level", options.compression_level is not None)}
    return [flag for name, (flag, given) in flags.items() if given and name not in accepted]


def build_layer(src_path: str, expected_digest: str, dst_path: str, options: LayerBuildOptions) -> BuildResult:
    """Convert `src_path` (any tar layer) into `dst_path`; raise when the source is not what the digest says."""
    writer = _writer(options.format)
    kwargs = _writer_kwargs(writer, options, Path(dst_path).parent)
    with open(src_path, "rb") as raw, open(dst_path, "wb") as dst:
        src = _HashingReader(raw)
        try:
            result = writer(src, dst, **kwargs)
        except Exception as exc:
            actual = src.finish()
            if actual != expected_digest:
                raise BlobDigestMismatchError(
                    f"layer {expected_digest}: content is {actual}, the source is corrupt") from None
            if isinstance(exc, _BAD_INPUT):
                raise UnsupportedImageError(f"layer {expected_digest} is not a valid layer tar: {exc}") from None
            raise
        actual = src.finish()
    if actual != expected_digest:
        raise BlobDigestMismatchError(f"layer {expected_digest}: content is {actual}, the source is corrupt")
    size = Path(dst_path).stat().st_size
    if size != result.size:
        raise RuntimeError(f"writer reported {result.size} bytes for layer {expected_digest}, wrote {size}")
    # A plain dict pickles (worker processes) and cannot be changed under us.
    return dataclasses.replace(result, annotations=dict(result.annotations))
