"""Background fetch: every chunk not cached yet, in blob order, at low priority, on one thread.

A batch (`background_batch_size` compressed bytes) goes out only inside the scheduler's
`background_turn`: no on-demand or prefetch fetch in flight on any layer, none for
`background_quiet_period` seconds, fewer than `background_slots` batches running. So a read waits
for at most one batch. Chunks someone else is fetching are theirs; the batch's requests are cut
around them and around cached chunks (no byte twice). Its chunks take the cache's direct path
(disk only), so a whole layer streaming in does not evict what containers read. A failed batch
is retried with backoff, then given up ("failed"); closing the layer stops it ("stopped").
"""
from __future__ import annotations

import logging
import os
import threading

from ...formats.toc import Chunk
from .base import FetchPolicy, PolicyHost

log = logging.getLogger(__name__)

_MAX_FAILURES = 5


class BackgroundFetch(FetchPolicy):
    name = "background"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.toc = layer.toc
        self.config = layer.config
        self.scheduler = layer.scheduler
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._start_lock = threading.Lock()
        self.state = "not started"

    def on_open(self) -> None:
        self.scheduler.note_activity()
        self.start()

    def start(self) -> None:
        with self._start_lock:
            if self._thread is not None or self.reader.closed.is_set():
                return
            self.state = "running"
            self._thread = threading.Thread(
                target=self._main, name=f"bgfetch-{self.reader.blob_digest[7:19]}", daemon=True
            )
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the background fetch has ended (complete, failed or stopped)."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Called after the reader is closed: the loop sees it and stops."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        if thread is None:
            self._done.set()

    def _main(self) -> None:
        try:
            _lower_thread_priority()
            state = self._loop()
        except Exception:
            log.exception("layer %s: background fetch failed", self.reader.blob_digest)
            state = "failed"
        self.state = state
        log.debug("layer %s: background fetch %s", self.reader.blob_digest, state)
        self._done.set()

    def _loop(self) -> str:
        closed = self.reader.closed
        seen: set[str] = set()
        batch: dict[str, Chunk] = {}
        batch_bytes = 0
        for entry in self.toc.files_in_blob_order():
            for c in entry.chunks:
                if closed.is_set():
                    return "stopped"
                if c.digest in seen:
                    continue
                seen.add(c.digest)
                if self.reader.cache.contains(c.digest):
                    continue
                if c.zeros and self.reader.synthesize_zeros(c, keep_in_memory=False) is not None:
                    continue  # a hole is made on demand, never fetched
                batch[c.digest] = c
                batch_bytes += c.blob_end - c.blob_offset
                if batch_bytes >= self.config.background_batch_size:
                    if not self._batch(batch):
                        return "stopped" if closed.is_set() else "failed"
                    batch, batch_bytes = {}, 0
        if batch and not self._batch(batch):
            return "stopped" if closed.is_set() else "failed"
        return "done"

    def _batch(self, batch: dict[str, Chunk]) -> bool:
        """Fetch one batch when the scheduler allows, retrying with backoff; False when stopped
        or given up."""
        closed = self.reader.closed
        failures = 0
        while True:
            with self.scheduler.background_turn(closed, self.config.background_idle_wait) as allowed:
                if not allowed:
                    return False
                fetcher = self.reader.fetcher
                mine, _ = fetcher.claim(batch)  # chunks someone else is fetching are theirs
                if not mine:
                    return True
                extents = [self.reader.chunk_extent(batch[k], keep_in_memory=False) for k in mine]
                flights = dict(mine)
                requests = self.reader.plan_requests(extents, flights, gap=self.config.coalesce_gap,
                                                     max_size=self.config.max_request_size)
                fetcher.run_batch(requests, flights)
            failed = {k: batch[k] for k, f in mine.items() if f.error is not None}
            if not failed:
                return True
            failures += 1
            if failures >= _MAX_FAILURES:
                log.warning("layer %s: background fetch gives up after %d failures", self.reader.blob_digest, failures)
                return False
            batch = failed
            if closed.wait(min(30.0, 0.5 * 2**failures)):
                return False


def _lower_thread_priority() -> None:
    """Background fetch decompresses and hashes: let on-demand work have the CPU first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
