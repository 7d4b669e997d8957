"""Fetching byte ranges of one blob: single flight, coalescing, worker threads, bounded waits.

Knows nothing of chunks or formats: it moves planned `Request`s of `Extent`s (a key, a byte range,
what to do with the bytes) from the source into flights. The `ChunkReader` plans the requests and
says how to verify what arrives.

Invariants:
- a key is fetched by at most one flight at a time (`FlightTable`); whoever claims a key lands it,
  with a value or an error, whatever happens (no waiter is ever left without an answer);
- requests run on worker threads; callers only wait, with a deadline, so a stalled source turns
  into `LayerReadError` after the caller's timeout instead of a hung caller;
- an extent that reached the cache between planning and sending is not fetched again, and
  neither are the bytes it spans: the request is cut there.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from .. import metrics
from ..logs import Throttled
from .errors import LayerReadError
from .flight import Flight, FlightTable
from .ranges import Extent, Request, split_into_batches
from .scheduler import FetchScheduler
from .sources import BlobSource

log = logging.getLogger(__name__)
_repeated = Throttled(log)  # per-request warnings: once per cause and minute


class Counters:
    """Thread-safe integer counters (a lock per increment is cheap next to any fetch)."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


FETCH_COUNTERS = ("fetched_bytes", "requests", "fetch_calls", "fetch_errors", "verify_failures", "timeouts",
                  "background_bytes")


# A streamed request's buffer drops bytes no pending extent needs once this many have piled up.
_STREAM_TRIM = 1 << 20


class _StreamLander:
    """Receives the pieces of one streamed request and lands each extent once its bytes are in.

    Holds only the bytes pending extents still need: from the earliest start among them on.
    Pieces already seen (a retried request starts over) are skipped."""

    def __init__(self, fetcher: Fetcher, req: Request, flights: dict[str, Flight],
                 count: Callable[[int], None], progress: Callable[[int], None] | None = None) -> None:
        self.fetcher = fetcher
        self.count = count  # told the bytes received, before any extent of them lands
        self.progress = progress  # told each piece's count of new bytes as it arrives
        self.counted = 0
        self.flights = flights
        self.extents = sorted(req.extents, key=lambda e: e.end)
        earliest = []
        low = req.end
        for ext in reversed(self.extents):
            low = min(low, ext.start)
            earliest.append(low)
        self.earliest_start = earliest[::-1]  # [i]: the lowest start among extents[i:]
        self.base = req.start  # blob offset of buf[0]
        self.end = req.start  # blob offset just past the last byte received
        self.buf = bytearray()
        self.next = 0  # extents[:next] are landed
        self.received = 0

    def feed(self, offset: int, piece: bytes) -> None:
        if offset + len(piece) <= self.end:
            return
        if offset > self.end:
            raise LayerReadError(f"stream skipped bytes [{self.end}, {offset})")
        fresh = memoryview(piece)[self.end - offset :]
        self.buf += fresh
        self.end += len(fresh)
        self.received += len(fresh)
        if self.progress is not None:
            self.progress(len(fresh))
        extents = self.extents
        if self.next < len(extents) and extents[self.next].end <= self.end:
            self.flush_count()
        while self.next < len(extents) and extents[self.next].end <= self.end:
            ext = extents[self.next]
            self.next += 1
            with memoryview(self.buf) as view:
                raw = bytes(view[ext.start - self.base : ext.end - self.base])
            self.fetcher._land(ext, self.flights, memoryview(raw))
        cut = (self.earliest_start[self.next] if self.next < len(extents) else self.end) - self.base
        if cut >= _STREAM_TRIM or (cut > 0 and self.next == len(extents)):
            del self.buf[:cut]
            self.base += cut

    def flush_count(self) -> None:
        """Count the bytes received since the last call. Called before an extent lands, so a
        reader that got its bytes (or `status`, or a metrics scrape after it) never sees them
        uncounted while the rest of a long stream is still coming."""
        fresh = self.received - self.counted
        if fresh:
            self.counted = self.received
            self.count(fresh)


class Fetcher:
    """Ranged reads of one blob for one layer. `max_concurrency` worker threads (created on
    demand); foreground work items report themselves to the shared `FetchScheduler` while they
    run, so background batches of every layer wait for them."""

    def __init__(
        self,
        source: BlobSource,
        *,
        name: str,
        max_concurrency: int,
        scheduler: FetchScheduler,
        counters: Counters,
    ) -> None:
        self.source = source
        self.name = name
        self.max_concurrency = max(1, max_concurrency)
        self.scheduler = scheduler
        self.counters = counters
        self.flights = FlightTable()
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix=f"fetch-{name.rsplit(':', 1)[-1][:12]}"
        )
        self._active = threading.Condition()
        self._active_batches = 0

    def claim(self, keys: Iterable[str]) -> tuple[dict[str, Flight], dict[str, Flight]]:
        return self.flights.claim(keys)

    def submit_requests(self, requests: list[Request], flights: dict[str, Flight], *, batches: int | None = None) -> None:
        """Run planned requests for claimed extents on the worker threads (foreground), spread
        over up to `batches` (default `max_concurrency`) `read_ranges` calls. `flights` is
        copied: the fetcher drops each flight from its copy once landed (see `_land`)."""
        flights = dict(flights)
        for batch in split_into_batches(requests, min(batches or self.max_concurrency, self.max_concurrency)):
            self._submit_foreground(lambda batch=batch: self.run_batch(batch, flights, True), batch, flights)

    def submit(self, batch: list[Request], flights: dict[str, Flight], kind: str = "on_demand") -> None:
        """Run one batch (one `read_ranges` call) on a worker thread, as foreground work; `kind`
        is what the metrics count it as (`metrics.FETCH_KINDS`)."""
        flights = dict(flights)
        self._submit_foreground(lambda: self.run_batch(batch, flights, True, kind), batch, flights)

    def submit_in_order(self, requests: list[Request], flights: dict[str, Flight], kind: str = "on_demand") -> None:
        """Run requests one after the other on one worker thread (each its own `read_ranges`
        call), so a very large region never sits in memory whole."""
        flights = dict(flights)

        def run_all() -> None:
            try:
                for req in requests:
                    self.run_batch([req], flights, True, kind)
            finally:
                err = LayerReadError(f"fetch of {self.name} abandoned")
                self._fail((ext.key for req in requests for ext in req.extents), flights, err)

        self._submit_foreground(run_all, requests, flights)

    def submit_work(self, work: Callable[[], None], requests: list[Request], flights: dict[str, Flight]) -> None:
        """Run `work` on a worker thread as one foreground item; it must land every flight of
        `requests` (`run_batch` does), which are failed here if the layer is closing."""
        self._submit_foreground(work, requests, flights)

    def _submit_foreground(self, work: Callable[[], None], requests: list[Request], flights: dict[str, Flight]) -> None:
        """Queue `work` for a worker thread as one foreground work item.

        Counts are scoped so none can leak: the scheduler's foreground count is taken by the item
        when it starts running on its worker and given back in its own `finally` (as the Go
        store's `DoPrioritizedTask` + `defer Done`), so an item cancelled while queued (`close`)
        never held it; the item's place in `drain`'s count is given back exactly once, by the item
        when it ran, or by its future's callback when it was cancelled unrun."""
        with self._active:
            self._active_batches += 1

        def item() -> None:
            try:
                with self.scheduler.foreground():
                    work()
            finally:
                self._item_ended()

        try:
            future = self._executor.submit(item)
        except RuntimeError as e:  # executor shut down: the layer is closing
            self._item_ended()
            err = LayerReadError(f"{self.name}: closed ({e})")
            self._fail((ext.key for req in requests for ext in req.extents), flights, err)
            return
        future.add_done_callback(lambda f: self._item_ended() if f.cancelled() else None)

    def run_batch(self, batch: list[Request], flights: dict[str, Flight], foreground: bool = False,
                  kind: str | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Fetch one batch with one `read_ranges` call and land every flight in it. Runs on a
        worker thread for foreground work (inside its item's scheduler scope), on the caller's
        thread for background work (inside its `background_turn`). Landed flights are dropped
        from `flights` as they land: pass a dict of the batch's own. `progress`, if given, is told
        the bytes as they arrive (the request is then streamed, even for one extent)."""
        all_keys = [ext.key for req in batch for ext in req.extents]
        kind = kind or ("on_demand" if foreground else "background")
        try:
            live = self._drop_cached(batch, flights)
            if live:
                self._fetch_and_land(live, flights, foreground, kind, progress)
        except BaseException as e:  # never leave a flight unlanded, whatever happened
            log.exception("%s: fetch worker failed", self.name)
            self._fail(all_keys, flights, LayerReadError(f"internal error fetching {self.name}: {e}"))
            raise
        finally:
            self._fail(all_keys, flights, LayerReadError(f"fetch of {self.name} abandoned"))  # what is left

    def _fetch_and_land(self, live: list[Request], flights: dict[str, Flight], foreground: bool, kind: str,
                        progress: Callable[[int], None] | None = None) -> None:
        stream = getattr(self.source, "stream_range", None)
        if stream is not None and len(live) == 1 and (len(live[0].extents) > 1 or progress is not None):
            self._stream_and_land(stream, live[0], flights, foreground, kind, progress)
            return
        ranges = [(r.start, r.end - r.start) for r in live]
        try:
            self.counters.add("fetch_calls")
            self.counters.add("requests", len(ranges))
            with metrics.FetchTimer(kind, len(ranges)) as timer:
                bufs = self.source.read_ranges(ranges)
                timer.received(sum(len(b) for b in bufs))
            if len(bufs) != len(ranges):
                raise LayerReadError(f"source returned {len(bufs)} buffers for {len(ranges)} ranges")
            for (off, length), buf in zip(ranges, bufs):
                if len(buf) != length:
                    raise LayerReadError(f"short read at {off}: {len(buf)} of {length} bytes")
        except Exception as e:
            self.counters.add("fetch_errors")
            _repeated.warning((self.name, type(e).__name__), "%s: fetching %d range(s) failed: %s", self.name,
                              len(ranges), e)
            err = LayerReadError(f"fetching {len(ranges)} range(s) of {self.name} failed: {e}")
            err.__cause__ = e
            self._fail((ext.key for req in live for ext in req.extents), flights, err)
            return
        if progress is not None:
            progress(sum(len(b) for b in bufs))
        for req, buf in zip(live, bufs):
            self.counters.add("fetched_bytes", len(buf))
            if not foreground:
                self.counters.add("background_bytes", len(buf))
            view = memoryview(buf)
            for ext in req.extents:
                self._land(ext, flights, view[ext.start - req.start : ext.end - req.start])

    def _stream_and_land(self, stream, req: Request, flights: dict[str, Flight], foreground: bool, kind: str,
                         progress: Callable[[int], None] | None = None) -> None:
        """One request of many extents (a prefetch, a long read), each landed as soon as its last
        byte has arrived, so a reader of the first file of a 20 MB prefetch waits for that file's
        bytes only. Extents landed before a failure stay landed; the rest get the error."""
        timer = metrics.FetchTimer(kind)

        def count(fresh: int) -> None:
            self.counters.add("fetched_bytes", fresh)
            if not foreground:
                self.counters.add("background_bytes", fresh)
            timer.received(fresh)

        lander = _StreamLander(self, req, flights, count, progress)
        self.counters.add("fetch_calls")
        self.counters.add("requests")
        try:
            with timer:
                try:
                    stream(req.start, req.length, lander.feed)
                finally:
                    lander.flush_count()
            if lander.end < req.end:
                raise LayerReadError(f"short read: {lander.end - req.start} of {req.length} bytes at {req.start}")
        except Exception as e:
            self.counters.add("fetch_errors")
            _repeated.warning((self.name, type(e).__name__), "%s: streaming [%d, %d) failed after %d bytes: %s",
                              self.name, req.start, req.end,
                        lander.received, e)
            err = LayerReadError(f"fetching [{req.start}, {req.end}) of {self.name} failed: {e}")
            err.__cause__ = e
            self._fail((ext.key for ext in req.extents), flights, err)  # landed ones are no longer there

    def _drop_cached(self, batch: list[Request], flights: dict[str, Flight]) -> list[Request]:
        """Land extents that reached the cache since they were planned (another flight finished
        between the caller's cache check and its claim); cut each request into the runs of
        extents left between them, so the bytes of a landed extent are not fetched after all."""
        live: list[Request] = []
        for req in batch:
            runs: list[list[Extent]] = [[]]
            for ext in req.extents:
                hit = ext.cached() if ext.cached is not None else None
                if hit is not None:
                    self.flights.finish(ext.key, flights.pop(ext.key), result=hit)
                    if runs[-1]:
                        runs.append([])
                else:
                    runs[-1].append(ext)
            if len(runs) == 1 and len(runs[0]) == len(req.extents):
                live.append(req)
                continue
            live.extend(Request(min(e.start for e in run), max(e.end for e in run), run) for run in runs if run)
        return live

    def _land(self, ext: Extent, flights: dict[str, Flight], raw: memoryview) -> None:
        """Verify and land `ext`, then drop it from the request's `flights`: a landed flight holds
        the chunk's bytes, and only its waiters (who hold it themselves) still need them. Kept in
        the request's table until the request ends, a 64 MB prefetch held every inflated chunk
        of it at once (java image: 288 MB peak RSS)."""
        self.land(ext, flights.pop(ext.key), raw)

    def land(self, ext: Extent, flight: Flight, raw: memoryview) -> None:
        """Finish (verify, cache) `ext` from its fetched bytes and wake its waiters; bytes that
        do not verify land as an error for this extent alone."""
        try:
            value = ext.finish(raw)
        except Exception as e:
            self.counters.add("verify_failures")
            metrics.verify_failures.inc()
            log.error("%s: bytes [%d, %d) rejected: %s", self.name, ext.start, ext.end, e)
            err = LayerReadError(f"{self.name} bytes [{ext.start}, {ext.end}): {e}")
            err.__cause__ = e
            self.flights.finish(ext.key, flight, error=err)
        else:
            self.flights.finish(ext.key, flight, result=value)
            if ext.persist is not None:
                ext.persist(value)

    def _fail(self, keys: Iterable[str], flights: dict[str, Flight], error: LayerReadError) -> None:
        """Land the flights of `keys` still in the request's `flights` with `error` (those landed
        are gone from it; finishing a landed flight is a no-op anyway)."""
        for key in keys:
            flight = flights.get(key)
            if flight is not None:
                self.flights.finish(key, flight, error=error)

    def wait(self, flights: dict[str, Flight], deadline: float, timeout: float) -> dict[str, bytes]:
        """Every flight's value, or LayerReadError (its error, or none landed by `deadline`)."""
        out: dict[str, bytes] = {}
        for key, f in flights.items():
            if not f.wait(deadline - time.monotonic()):
                self.counters.add("timeouts")
                raise LayerReadError(f"timed out after {timeout:g}s waiting for data of {self.name}")
            if f.error is not None:
                raise LayerReadError(str(f.error)) from f.error
            assert f.result is not None
            out[key] = f.result
        return out

    def drain(self, timeout: float) -> bool:
        """Wait until no foreground batch is running (its cache writes included); True if that
        happened within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._active:
            while self._active_batches > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._active.wait(remaining)
        return True

    def close(self, error: LayerReadError) -> None:
        """Fail every pending flight and stop the workers (a running request is not interrupted;
        its result is dropped)."""
        self.flights.fail_all(error)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _item_ended(self) -> None:
        with self._active:
            self._active_batches -= 1
            self._active.notify_all()
