"""Where a Layer's bytes come from: the `BlobSource` protocol, and a local-file source (converter
outputs, tests, benchmarks). The registry source is `resolver.RegistryBlobSource`."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Protocol

from ..registry.responses import STREAM_PIECE


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


class WholeBlobSource(BlobSource, Protocol):
    """A source that can hand the blob from an offset to its end over in one request
    (`stream_blob`), for background fetch when `streams_whole_blob` is true (a registry
    behind a mirror); `sink(offset, piece)` in order, resumed from the next byte after a break."""

    @property
    def streams_whole_blob(self) -> bool: ...

    def stream_blob(self, offset: int, sink: Callable[[int, bytes], None]) -> int: ...


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

    @contextlib.contextmanager
    def _request(self, ranges: list[tuple[int, int]]) -> Iterator[None]:
        """One call's bookkeeping: counted and logged as a registry would see it, its ranges
        checked, and the fd kept open while it reads (a closed fd number can be reused)."""
        with self._lock:
            if self._fd < 0:
                raise OSError(f"blob source {self.path} is closed")
            self._users += 1
            self.calls += 1
            self.requests += len(ranges)
            self.log.extend(ranges)
        try:
            for offset, length in ranges:
                if offset < 0 or length < 0 or offset + length > self.size:
                    raise ValueError(f"range ({offset}, {length}) outside blob of {self.size} bytes")
            yield
        finally:
            with self._lock:
                self._users -= 1
                self._close_if_unused()

    def _pread_exact(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read from {self.path}: {len(data)} of {length} bytes at {offset}")
        with self._lock:
            self.bytes_read += length
        return data

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        with self._request(ranges):
            return [self._pread_exact(offset, length) for offset, length in ranges]

    def stream_range(self, offset: int, length: int, sink: Callable[[int, bytes], None]) -> None:
        """One range as one request (counted once), handed to `sink` in `STREAM_PIECE` pieces."""
        with self._request([(offset, length)]):
            for done in range(0, length, STREAM_PIECE):
                sink(offset + done, self._pread_exact(offset + done, min(STREAM_PIECE, length - done)))

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
