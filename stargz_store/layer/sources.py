"""Blob sources besides the registry: a local file (converter outputs, tests, benchmarks)."""
from __future__ import annotations

import os
import threading
from pathlib import Path


class FileBlobSource:
    """A blob in a local file, read with `pread`. Counts calls, ranges and bytes like a registry
    source would see them, so tests can assert what the data path asked for."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self.calls = 0
        self.requests = 0
        self.bytes_read = 0
        self.log: list[tuple[int, int]] = []  # every (offset, length) asked for, in order

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        with self._lock:
            self.calls += 1
            self.requests += len(ranges)
            self.log.extend(ranges)
        out = []
        for offset, length in ranges:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise ValueError(f"range ({offset}, {length}) outside blob of {self.size} bytes")
            data = os.pread(self._fd, length, offset)
            if len(data) != length:
                raise OSError(f"short read from {self.path}: {len(data)} of {length} bytes at {offset}")
            out.append(data)
        with self._lock:
            self.bytes_read += sum(len(d) for d in out)
        return out

    def reset_counters(self) -> None:
        with self._lock:
            self.calls = self.requests = self.bytes_read = 0
            self.log.clear()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
