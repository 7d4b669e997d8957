"""Background fetch: every chunk not cached yet, in blob order, at low priority, on one thread.

A batch (`background_batch_size` compressed bytes) goes out only inside the scheduler's
`background_turn`: no on-demand or prefetch fetch in flight on any layer, none for
`background_quiet_period` seconds, fewer than `background_slots` batches running. So a read waits
for at most one batch. Chunks someone else is fetching are theirs; the batch's requests are cut
around them and around cached chunks (no byte twice). Its chunks take the cache's direct path
(disk only), so a whole layer streaming in does not evict what containers read. A failed batch
is retried with backoff, then given up ("failed"); closing the layer stops it ("stopped").

A blob whose source prefers it (`streams_whole_blob`: a registry behind a mirror) is fetched
instead as one streamed GET from its first missing chunk, chunks landed as they pass
(background_stream.py): a pull-through mirror answers ranges of a blob it is still filling with
whole bodies from the origin, so batches would cost the origin a copy each.
"""
from __future__ import annotations

import logging
import os
import threading

from ...formats.toc import Chunk
from .background_stream import ChunkStream, StreamEnded, uncached_in_blob_order
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
        if getattr(self.reader.source, "streams_whole_blob", False):
            return self._stream_loop()
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

    def _stream_loop(self) -> str:
        """One streamed request per turn, until every chunk has landed; a request that ends
        early (reads kept the link busy, a long run of cached chunks) is followed by another
        from the next chunk needed; one that fails is retried with backoff, then given up."""
        closed = self.reader.closed
        queue = uncached_in_blob_order(self.reader, (c for e in self.toc.files_in_blob_order() for c in e.chunks))
        stream_blob = self.reader.source.stream_blob  # type: ignore[attr-defined]
        failures = 0
        while True:
            failed: BaseException | None = None
            with self.scheduler.background_turn(closed, self.config.background_idle_wait) as allowed:
                if not allowed:
                    return "stopped"
                stream = ChunkStream(self.reader, self.config, self.scheduler, queue)
                start = stream.begin()
                if start is None:
                    return "done"
                self.reader.counters.add("fetch_calls")
                self.reader.counters.add("requests")
                try:
                    stream_blob(start, stream.feed)
                except StreamEnded as e:
                    log.debug("layer %s: background stream from %d ends: %s", self.reader.blob_digest, start, e.reason)
                except Exception as e:
                    failed = e
                    self.reader.counters.add("fetch_errors")
                    log.warning("layer %s: background stream from %d failed after %d bytes: %s",
                                self.reader.blob_digest, start, stream.received, e)
                finally:
                    left = stream.release(failed)
                if failed is None and left:
                    failed = RuntimeError("the blob ended before its chunks")
            if closed.is_set():
                return "stopped"
            if failed is None:
                failures = 0
                continue
            failures += 1
            if failures >= _MAX_FAILURES:
                log.warning("layer %s: background fetch gives up after %d failures", self.reader.blob_digest, failures)
                return "failed"
            if closed.wait(min(30.0, 0.5 * 2**failures)):
                return "stopped"


def _lower_thread_priority() -> None:
    """Background fetch decompresses and hashes: let on-demand work have the CPU first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
