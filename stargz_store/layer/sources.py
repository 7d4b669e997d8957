"""Where a Layer's bytes come from: the `BlobSource` protocol, and a local-file source (converter
outputs, tests, benchmarks). The registry source is `resolver.RegistryBlobSource`."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Protocol


class BlobSource(Protocol):
    """What a Layer reads from. `read_ranges` returns exactly the bytes of each (offset, length),
    in order, or raises; it may take as long as its own timeouts allow (the Layer bounds how long
    a reader waits)."""

    size: int

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]: ...


class StreamingBlobSource(BlobSource, Protocol):
    """A source that can also hand a single range over piece by piece as it arrives
    (`sink(offset, piece)`, in order; after a retry the range may start over)."""

    def stream_range(self, offset: int, length: int, sink: Callable[[int, bytes], None]) -> None: ...



STREAM_PIECE = 128 << 10


class FileBlobSource:
    """A blob in a local file, read with `pread`. Counts calls, ranges and bytes like a registry
    source would see them, so tests can assert what the data path asked for."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False
        self.calls = 0
        self.requests = 0
        self.bytes_read = 0
        self.log: list[tuple[int, int]] = []  # every (offset, length) asked for, in order

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        with self._lock:
            if self._fd < 0:
                raise OSError(f"blob source {self.path} is closed")
            self._users += 1  # the fd stays open while a read uses it (a closed fd number can be reused)
            self.calls += 1
            self.requests += len(ranges)
            self.log.extend(ranges)
        try:
            out = []
            for offset, length in ranges:
                if offset < 0 or length < 0 or offset + length > self.size:
                    raise ValueError(f"range ({offset}, {length}) outside blob of {self.size} bytes")
                data = os.pread(self._fd, length, offset)
                if len(data) != length:
                    raise OSError(f"short read from {self.path}: {len(data)} of {length} bytes at {offset}")
                out.append(data)
        finally:
            with self._lock:
                self._users -= 1
                self.bytes_read += sum(len(d) for d in out)
                self._close_if_unused()
        return out

    def stream_range(self, offset: int, length: int, sink: Callable[[int, bytes], None]) -> None:
        """One range as one request (counted once), handed to `sink` in `STREAM_PIECE` pieces."""
        with self._lock:
            if self._fd < 0:
                raise OSError(f"blob source {self.path} is closed")
            self._users += 1
            self.calls += 1
            self.requests += 1
            self.log.append((offset, length))
        try:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise ValueError(f"range ({offset}, {length}) outside blob of {self.size} bytes")
            done = 0
            while done < length:
                n = min(STREAM_PIECE, length - done)
                piece = os.pread(self._fd, n, offset + done)
                if len(piece) != n:
                    raise OSError(f"short read from {self.path}: {len(piece)} of {n} bytes at {offset + done}")
                with self._lock:
                    self.bytes_read += n
                sink(offset + done, piece)
                done += n
        finally:
            with self._lock:
                self._users -= 1
                self._close_if_unused()

    def reset_counters(self) -> None:
        with self._lock:
            self.calls = self.requests = self.bytes_read = 0
            self.log.clear()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._closing and self._users == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
