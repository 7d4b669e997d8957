"""The source side of the writers: a layer tar that may be plain, gzip or zstd compressed.

Converters accept whatever a registry holds (`estargz.md` §8.3: compression is detected by magic
bytes, never by media type), so both writers start from `open_tar_stream`, which hands back the
uncompressed tar as a forward-only stream. `iter_tar_members` walks it with `tarfile` in stream
mode so a layer of any size is read without holding it in memory.
"""
from __future__ import annotations

import gzip
import io
import logging
import tarfile
from typing import BinaryIO, Iterator

import zlib

import zstandard

from .errors import FormatError

log = logging.getLogger(__name__)

# What a corrupt or truncated input layer raises while it is decompressed and parsed.
INPUT_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


class InputTarError(FormatError):
    """The input layer is not a readable (optionally gzip/zstd compressed) tar stream."""

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zstd skippable frame (0x184D2A50..5F) may open a zstd:chunked blob before any data frame.
_ZSTD_SKIPPABLE_LOW = 0x184D2A50
_ZSTD_SKIPPABLE_HIGH = 0x184D2A5F

COMPRESSION_NONE = "none"
COMPRESSION_GZIP = "gzip"
COMPRESSION_ZSTD = "zstd"


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were already consumed for sniffing, put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        view = memoryview(buf)
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        if not data:
            return 0
        view[: len(data)] = data
        return len(data)


def detect_compression(head: bytes) -> str:
    """Which codec the first bytes of a layer blob announce (`none` when neither magic matches)."""
    if head.startswith(GZIP_MAGIC):
        return COMPRESSION_GZIP
    if head.startswith(ZSTD_MAGIC):
        return COMPRESSION_ZSTD
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        if _ZSTD_SKIPPABLE_LOW <= magic <= _ZSTD_SKIPPABLE_HIGH:
            return COMPRESSION_ZSTD
    return COMPRESSION_NONE


def _read_exactly_up_to(src: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        b = src.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def open_tar_stream(src: BinaryIO) -> BinaryIO:
    """The uncompressed tar stream of `src` (plain, gzip incl. multi-member, or zstd).

    Reading is forward-only; the result is buffered, so small reads are cheap.
    """
    head = _read_exactly_up_to(src, 4)
    kind = detect_compression(head)
    raw: BinaryIO = io.BufferedReader(_Prefixed(head, src), buffer_size=1 << 20)  # type: ignore[arg-type]
    log.debug("layer input compression: %s", kind)
    if kind == COMPRESSION_GZIP:
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 20)  # type: ignore[arg-type]
    if kind == COMPRESSION_ZSTD:
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    return raw


class _ZstdFrames(io.RawIOBase):
    """Every frame of a zstd stream, decompressed in order; a stream cut inside a frame is an error.

    `zstandard`'s stream reader ends quietly at a truncated frame, which would turn a cut-off
    layer into a shorter one. Feeding a frame decoder small input blocks keeps the output of
    one step bounded while letting us see whether the last frame was complete.
    """

    _INPUT_BLOCK = 4096

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._frame_started = False
        self._pending = b""
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        while not self._out:
            data = self._pending or self._src.read(self._INPUT_BLOCK)
            self._pending = b""
            if not data:
                if self._frame_started:
                    raise InputTarError("zstd input is truncated: the last frame is incomplete")
                return 0
            self._frame_started = True
            self._out = self._frame.decompress(data)
            if self._frame.eof:
                self._pending = self._frame.unused_data
                self._frame = self._dctx.decompressobj()
                self._frame_started = False
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Every member of an uncompressed tar stream, in order, with the archive to read its data.

    The data of a member must be read (`tar.extractfile(info)`) before advancing, as the stream
    is not seekable. PAX headers (long names, xattrs, big ids) are merged into the `TarInfo`.
    """
    with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
        while True:
            info = tar.next()
            if info is None:
                return
            yield info, tar
            # A stream-mode TarFile still remembers every member; the caller keeps what it needs.
            tar.members.clear()
