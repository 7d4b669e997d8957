"""Reads hold background fetch back: a read served from the cache restarts the quiet period too.

The scheduler lets background batches run only after `background_quiet_period` seconds without
an on-demand fetch (scheduler.py). On a lazily pulled image that is the right signal; once the
prioritized region has been prefetched it is not: the container then reads file after file from
the cache, computing in between (an interpreter compiling or parsing what it imports, a compiler
parsing headers), no fetch for seconds, and background batches (decompressed, hashed and written
by this process) take the CPU and the daemon's lock from the reads the container waits for. The
startup corpus showed it on the held-out images (pyaws, node, cxx, optimized: 11-30 MB of
background fetch before the first output).

So every read of a layer counts as activity, whether or not it fetched: background fetch waits
until the container has stopped reading for the quiet period. The signal is the kernel's reads,
not anything about an image. The Go store prioritizes only the reads that reach the blob (its
`DoPrioritizedTask` wraps the blob reader), so the baseline policy has this off.
"""
from __future__ import annotations

import threading
import time

from ...formats.toc import TocEntry
from .base import FetchPolicy, PolicyHost

# At most one scheduler notification per this many seconds per layer: a warm read costs a clock
# read, not a lock (the quiet period is a second; 50 ms of slack in it is nothing).
_NOTE_EVERY = 0.05


class ReadsHoldBackground(FetchPolicy):
    name = "reads_hold_background"

    def __init__(self, layer: PolicyHost) -> None:
        self.scheduler = layer.scheduler
        self.counters = layer.counters
        self._last = float("-inf")
        self._lock = threading.Lock()

    def on_read(self, entry: TocEntry, offset: int, size: int, last_index: int) -> None:
        now = time.monotonic()
        if now - self._last < _NOTE_EVERY:
            return
        with self._lock:
            if now - self._last < _NOTE_EVERY:
                return
            self._last = now
        self.counters.add("reads_holding_background")
        self.scheduler.note_activity()
