"""Test blobs made by our eStargz writer, and sources that misbehave the ways a registry can."""
from __future__ import annotations

import io
import random
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from stargz_store.formats.estargz import build_estargz
from stargz_store.formats.layer_toc import BuildResult
from stargz_store.layer import FileBlobSource
from stargz_store.layer.scheduler import FetchScheduler
from tests.fixtures.waiting import wait_for


def make_tar(files: dict[str, bytes], executables: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({n.rsplit("/", 1)[0] for n in files if "/" in n})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o755 if name in executables else 0o644
            ti.mtime = 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class BuiltLayer:
    path: Path
    result: BuildResult
    files: dict[str, bytes]

    @property
    def descriptor(self) -> dict:
        return {
            "mediaType": self.result.media_type,
            "digest": self.result.digest,
            "size": self.result.size,
            "annotations": dict(self.result.annotations),
        }

    def source(self) -> FileBlobSource:
        return FileBlobSource(self.path)


def build_layer(
    path: Path,
    files: dict[str, bytes],
    *,
    prioritized: tuple[str, ...] = (),
    chunk_size: int = 64 << 10,
    executables: tuple[str, ...] = (),
) -> BuiltLayer:
    with open(path, "wb") as dst:
        result = build_estargz(
            io.BytesIO(make_tar(files, executables)), dst, prioritized=list(prioritized), chunk_size=chunk_size
        )
    return BuiltLayer(path, result, files)


def sample_files(seed: int = 1) -> dict[str, bytes]:
    """Random (incompressible) and text files, several of them multi-chunk at 64 KiB chunks."""
    rnd = random.Random(seed)
    return {
        "etc/hello.txt": b"hello world\n" * 300,
        "bin/app": rnd.randbytes(700_000),
        "usr/share/doc/text": b"".join(f"line {i} of some text\n".encode() for i in range(40_000)),
        "usr/lib/lib.so": rnd.randbytes(250_000),
        "small": b"s",
        "empty": b"",
    }


class FaultySource(FileBlobSource):
    """A local blob source that can fail like a network: raise, stall, or flip a byte.

    `stall` blocks each read until `release` is set (at most a minute), to exercise timeouts.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail_with: BaseException | None = None
        self.flip_bytes = False
        self.stall = False
        self.release = threading.Event()
        self.entered = threading.Event()
        self.delay = 0.0
        self.started = 0  # read_ranges calls begun (stalled ones included)

    def _misbehave(self) -> None:
        with self._lock:
            self.started += 1
        self.entered.set()
        if self.stall:
            self.release.wait(60)  # bounded, so a broken test fails instead of hanging the suite
        if self.delay:
            self.release.wait(self.delay)
        if self.fail_with is not None:
            with self._lock:
                self.calls += 1
            raise self.fail_with

    def stream_range(self, offset, length, sink):
        self._misbehave()
        middle = offset + length // 2  # the byte read_ranges would flip

        def flipping(off, piece):
            if self.flip_bytes and off <= middle < off + len(piece):
                changed = bytearray(piece)
                changed[middle - off] ^= 0xFF
                piece = bytes(changed)
            sink(off, piece)

        super().stream_range(offset, length, flipping)

    def read_ranges(self, ranges):
        self._misbehave()
        out = super().read_ranges(ranges)
        if self.flip_bytes:
            out = [bytes(b[: len(b) // 2]) + bytes([b[len(b) // 2] ^ 0xFF]) + bytes(b[len(b) // 2 + 1 :]) for b in out]
        return out

    def reset_counters(self) -> None:
        super().reset_counters()
        self.entered.clear()
        self.started = 0


def build_zstd_layer(path: Path, files: dict[str, bytes]) -> BuiltLayer:
    """A containers/storage-style zstd:chunked blob (content-defined chunks, zero holes)."""
    from stargz_store.formats.zstd_chunked_writer import build_zstd_chunked

    with open(path, "wb") as dst:
        result = build_zstd_chunked(io.BytesIO(make_tar(files)), dst)
    return BuiltLayer(path, result, files)


def wait_until(predicate, timeout: float = 30.0) -> None:
    """Wait for a condition the test needs before going on (not a timing assertion)."""
    if not wait_for(predicate, timeout):
        raise AssertionError("condition not reached")


class WatchedScheduler(FetchScheduler):
    """The real scheduler, with its "background fetch must wait" answers made observable.

    A test that asserts background fetch did *not* start waits for `refused` (a background batch
    asked for its turn and was told to wait) instead of sleeping "long enough": once a batch has
    been refused, it cannot fetch until the scheduler lets it.
    """

    def __init__(self, background_slots: int = 2, quiet_period: float = 0.0) -> None:
        super().__init__(background_slots, quiet_period)
        self.refused = threading.Event()

    def _background_must_wait(self) -> bool:
        must_wait = super()._background_must_wait()
        if must_wait:
            self.refused.set()
        return must_wait


class WholeStreamFileSource(FileBlobSource):
    """A local blob that offers what a registry behind a mirror does: the blob from an offset
    to its end in one request (`stream_blob`), which background fetch then prefers. Each such
    request is logged in `log` as (offset, bytes to the end), like a ranged one."""

    streams_whole_blob = True

    def stream_blob(self, offset, sink) -> int:
        self.stream_range(offset, self.size - offset, sink)
        return self.size


def layer_of(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> BuiltLayer:
    """An eStargz layer at `path` of exactly these tar members (in this order), 64 KiB chunks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti in members:
            tf.addfile(ti, io.BytesIO(data[ti.name]) if ti.isreg() else None)
    with open(path, "wb") as dst:
        result = build_estargz(io.BytesIO(buf.getvalue()), dst, chunk_size=64 << 10)
    return BuiltLayer(path, result, data)


def tar_member(name: str, kind=tarfile.REGTYPE, size: int = 0, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    """One tar header: a file, directory or link of `layer_of`."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode = kind, size, link, mode
    return ti
