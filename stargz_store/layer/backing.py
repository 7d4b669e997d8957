"""Backing files for passthrough: which file has one, and making them from verified chunks.

A regular file gets a backing file (`cache.backing_files`) once every chunk of it is in the chunk
cache: a file opened through the store is offered (`offer`) at its open and at its release; one
worker thread checks whether all its chunks are cached and, if so, copies them (each read through
`ChunkCache.get`, so hashed again) into a backing file checked against the TOC's file digest.
Nothing is fetched for it: a partly cached file stays served by the store, chunk by chunk.

Files smaller than `min_size` are not offered (`[store] passthrough_min_kb`). The queue is
bounded: offers beyond it are dropped (the file is offered again at its next open). The bound is
far above what one start or walk releases while its copies wait (below): at 4,096 a walk of 20,000
small files kept 4,101 copies and the next walk had 16,000 files served by the store, READ by READ.
A queued file costs its key (a 64-character hex string) in the pending set, about 160 bytes: 10 MB
at the bound, only while that many wait.

A copy waits until the layers' fetches have gone quiet (`defer_to`: no foreground fetch in flight
and none for the scheduler's quiet period), at most `wait` seconds: a starting container's files
are released as it reads them, and copying them then (reading, hashing and writing each file
again) takes a share of the cores from the start itself; a file the container opens again before
its copy exists is served by the store, as before.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

from ..cache.backing_files import BackingFile, BackingFileError, BackingFileStore
from ..cache.chunk_cache import ChunkCache
from ..formats.toc import REG, TocEntry
from .scheduler import FetchScheduler

log = logging.getLogger(__name__)

MAX_QUEUED = 65536


class BackingFiles:
    """One per daemon, shared by its layers (thread-safe)."""

    def __init__(self, store: BackingFileStore, cache: ChunkCache, *, min_size: int = 0) -> None:
        self.store = store
        self.cache = cache
        self.min_size = max(0, min_size)
        self._queue: queue.Queue[TocEntry | None] = queue.Queue(MAX_QUEUED)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stats = dict.fromkeys(("offered", "incomplete", "failed", "deferred"), 0)
        self._scheduler: FetchScheduler | None = None
        self._wait = 0.0
        self._never = threading.Event()  # (the worker is a daemon thread: nothing stops its waits early)

    def defer_to(self, scheduler: FetchScheduler, wait: float) -> None:
        """Copies wait, at most `wait` seconds each (0: not at all), until `scheduler`'s fetches
        have gone quiet (the resolver's, shared by every layer)."""
        self._scheduler = scheduler
        self._wait = max(0.0, wait)

    def key(self, entry: TocEntry) -> str:
        return self.store.key_for(entry.digest, (c.digest for c in entry.chunks), entry.size)

    def eligible(self, entry: TocEntry) -> bool:
        return entry.type == REG and entry.size > 0 and entry.size >= self.min_size

    def lookup(self, entry: TocEntry) -> BackingFile | None:
        """The backing file of `entry`, if it has one (not checked yet: `BackingFileStore.open`)."""
        if not self.eligible(entry):
            return None
        return self.store.get(self.key(entry))

    def open(self, backing: BackingFile) -> int | None:
        """A checked read-only descriptor (see `BackingFileStore.open`); None: serve it by chunks."""
        return self.store.open(backing)

    def offer(self, entry: TocEntry) -> None:
        """`entry` was opened or released without a backing file: make one if all of it is cached."""
        if not self.eligible(entry):
            return
        key = self.key(entry)
        with self._lock:
            if key in self._pending or self.store.known(key):
                return
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                return
            self._pending.add(key)
            self._stats["offered"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="backing-files", daemon=True)
                self._thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every offer so far is done (tests, benchmarks)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["queued"] = len(self._pending)
        out.update(self.store.stats())
        return out

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            key = self.key(entry)
            self._wait_for_quiet()
            try:
                self._make(key, entry)
            except Exception as e:  # noqa: BLE001 - one file must not stop the worker
                self._count("failed")
                log.warning("backing file for %s not made: %s", entry.name, e)
            finally:
                with self._lock:
                    self._pending.discard(key)
                    if not self._pending:
                        self._idle.notify_all()

    def _wait_for_quiet(self) -> None:
        scheduler = self._scheduler
        if scheduler is None or self._wait <= 0:
            return
        if scheduler.foreground_busy():
            self._count("deferred")
            scheduler.pause_for_foreground(self._never, self._wait)

    def _make(self, key: str, entry: TocEntry) -> None:
        if self.store.get(key) is not None:  # made meanwhile (here, or by the process before a restart)
            return
        if not all(c.zeros or self.cache.contains(c.digest) for c in entry.chunks):
            self._count("incomplete")
            return
        try:
            self.store.make(key, entry.size, entry.digest, self._pieces(entry))
        except _ChunkGone:
            self._count("incomplete")  # evicted or damaged meanwhile: served by chunks until cached again
            return
        on_write = self.cache.on_write  # the janitor counts it like any cache file
        if on_write is not None:
            on_write(entry.size)

    def _pieces(self, entry: TocEntry) -> Iterator[bytes]:
        for c in entry.chunks:
            if c.zeros:
                yield bytes(c.size)
                continue
            data = self.cache.get(c.digest, c.size, keep_in_memory=False)
            if data is None:
                raise _ChunkGone(c.digest)
            yield data

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


class _ChunkGone(BackingFileError):
    """A chunk left the cache (or failed its hash) while its file was being copied."""
