"""The verified chunk reader: a layer's chunks through the cache, fetched at most once at a time.

Invariants:
- no chunk's bytes are handed out unless they were decompressed from its own compressed extent
  and hashed to its digest (the format's `decompress_chunk`) before they were cached, or read
  back from the disk cache and hashed again there (`ChunkCache.get`);
- at most one fetch per chunk is in the air at a time (the `Fetcher`'s flight table): whoever
  needs a chunk someone is fetching (a read, a policy, the prefetch, the background fetch) waits
  for that flight;
- every wait is bounded by `LayerConfig.fetch_timeout` (fetches run on worker threads; callers
  only wait on their results), so a stalled registry is a `LayerReadError`, not a hung reader;
- no byte of the blob is fetched twice (`plan_requests`): a request never spans the extent of a
  chunk that is cached, being fetched by someone else, or planned elsewhere; the chunks in the
  gaps it does span are claimed and landed with it, so nothing fetched is thrown away and
  fetched again later. (A retried request may resend bytes on the wire; they are not counted
  or landed twice.)

What to fetch beyond the chunks a read needs is not decided here: the fetch policies add to a
`FetchPlan` (layer/policies/). zstd:chunked holes are made locally, never fetched.

With `fetch_block_size` set (the `baseline` fetch policy), a chunk is fetched as the fixed-size
aligned blocks of the blob that hold it, as the Go store does; every block fetched is kept on
disk, so a chunk whose blocks are all there needs no request.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Mapping

from ..cache.chunk_cache import ChunkCache
from ..logs import Throttled
from ..formats.layer_toc import ParsedToc
from ..formats.toc import Chunk
from .blob_index import BlobIndex
from .config import LayerConfig
from .errors import LayerReadError
from .fetcher import Counters, Fetcher
from .flight import Flight
from .ranges import Extent, Request, coalesce
from .scheduler import FetchScheduler
from .sources import BlobSource

log = logging.getLogger(__name__)
_repeated = Throttled(log)  # per-request warnings: once per cause and minute


class FetchPlan:
    """The chunks claimed for one fetch being planned, as extents and their flights.

    `want` claims what a reader needs (kept in the memory LRU); policies `add` what they guess
    is needed soon, to the same request (`alongside=False`, streamed behind the wanted bytes) or
    to a request of its own sent at the same time (`alongside=True`). A chunk someone else is
    fetching is never added: it is theirs to land."""

    def __init__(self, reader: ChunkReader) -> None:
        self.reader = reader
        self.extents: list[Extent] = []
        self.alongside: list[Extent] = []
        self.flights: dict[str, Flight] = {}

    def want(self, missing: Mapping[str, Chunk]) -> tuple[dict[str, Flight], dict[str, Flight]]:
        """Claim the chunks a reader waits for: (mine, theirs), like `FlightTable.claim`."""
        mine, theirs = self.reader.fetcher.claim(missing)
        self.extents += [self.reader.chunk_extent(missing[k], keep_in_memory=True) for k in mine]
        self.flights.update(mine)
        return mine, theirs

    def add(self, chunks: Iterable[Chunk], counter: str, *, keep_in_memory: bool = False, alongside: bool = False) -> int:
        """Claim `chunks` not planned yet, not in flight elsewhere and not left to the prefetch
        (`ChunkReader.reserved`: a guess there would only share the link with the stream that
        brings it anyway); how many were added."""
        lo, hi = self.reader.reserved
        extra = {c.digest: c for c in chunks
                 if c.digest not in self.flights and not (lo <= c.blob_offset and c.blob_end <= hi)}
        if not extra:
            return 0
        mine, _ = self.reader.fetcher.claim(extra)
        if not mine:
            return 0
        self.reader.counters.add(counter, len(mine))
        target = self.alongside if alongside else self.extents
        target += [self.reader.chunk_extent(extra[k], keep_in_memory=keep_in_memory) for k in mine]
        self.flights.update(mine)
        return len(mine)

    @property
    def first_start(self) -> int:
        return min(e.start for e in self.extents)


class ChunkReader:
    """Cache lookup, single flight, verification and bounded waits for one layer's chunks."""

    def __init__(
        self,
        source: BlobSource,
        parsed: ParsedToc,
        blob_digest: str,
        blob_size: int,
        cache: ChunkCache,
        config: LayerConfig,
        scheduler: FetchScheduler,
        counters: Counters,
    ) -> None:
        self.source = source
        self.parsed = parsed
        self.blob_digest = blob_digest
        self.blob_size = blob_size
        self.cache = cache
        self.config = config
        self.scheduler = scheduler
        self.counters = counters
        self.index = BlobIndex(parsed.toc)
        self.closed = threading.Event()
        # Blob span [lo, hi) the prefetch will fetch later, piece by piece (prefetch.py): guesses
        # leave its chunks to it; only what a reader waits for overtakes it.
        self.reserved: tuple[int, int] = (0, 0)
        self.fetcher = Fetcher(
            source, name=f"blob {blob_digest}", max_concurrency=config.max_concurrency,
            scheduler=scheduler, counters=counters,
        )

    # ---- lookups ------------------------------------------------------------------------------

    def lookup(self, chunks: Iterable[Chunk], *, keep_in_memory: bool = True) -> tuple[dict[str, bytes], dict[str, Chunk]]:
        """(bytes of the chunks the cache has or a hole makes, the missing chunks by digest);
        `keep_in_memory`: what is read from disk goes into the memory LRU."""
        got: dict[str, bytes] = {}
        missing: dict[str, Chunk] = {}
        for c in chunks:
            if c.digest in got or c.digest in missing:
                continue
            d = self.cache.get(c.digest, c.size, keep_in_memory=keep_in_memory)
            if d is None and c.zeros:
                d = self.synthesize_zeros(c, keep_in_memory=True)
            if d is None:
                missing[c.digest] = c
            else:
                got[c.digest] = d
        self.counters.add("cache_hits", len(got))
        if missing:
            self.counters.add("cache_misses", len(missing))
        return got, missing

    def uncached(self, chunks: Iterable[Chunk]) -> list[Chunk]:
        """The chunks that would need a fetch: not in the cache, and not holes (made locally)."""
        return [c for c in chunks if not c.zeros and not self.cache.contains(c.digest)]

    def synthesize_zeros(self, chunk: Chunk, *, keep_in_memory: bool) -> bytes | None:
        """A zstd:chunked hole needs no fetch: the codec makes and verifies it from nothing."""
        try:
            data = self.parsed.decompress_chunk(b"", chunk)
        except Exception:  # the codec wants the real frame after all: fetch it
            return None
        if keep_in_memory:
            self.cache.hold(chunk.digest, data)
        return data

    # ---- fetching -----------------------------------------------------------------------------

    def start(self, chunks: Iterable[Chunk]) -> tuple[dict[str, bytes], dict[str, Flight]]:
        """Cached chunks' bytes, and the flights to wait for the rest (fetched here if nobody is)."""
        got, missing = self.lookup(chunks)
        if not missing:
            return got, {}
        plan = FetchPlan(self)
        mine, theirs = plan.want(missing)
        self.dispatch(plan)
        return got, {**mine, **theirs}

    def dispatch(self, plan: FetchPlan, *, max_request_size: int | None = None, gap: int | None = None,
                 batches: int | None = None) -> None:
        """Send what `plan` claimed: its alongside extents first (their own requests), then the
        rest (`max_request_size` 0: one request per extent, so they land one by one in parallel;
        `gap`: extents this close share a request, default `coalesce_gap`; `batches`: at most
        this many `read_ranges` calls, default `max_concurrency`)."""
        for extents in (plan.alongside, plan.extents):
            if extents:
                requests = self.plan_requests(
                    extents, plan.flights, gap=self.config.coalesce_gap if gap is None else gap,
                    max_size=self.config.max_request_size if max_request_size is None else max_request_size,
                )
                self.fetcher.submit_requests(requests, plan.flights, batches=batches)

    def plan_requests(self, extents: list[Extent], flights: dict[str, Flight], *, gap: int, max_size: int) -> list[Request]:
        """Coalesce claimed extents into requests without fetching any byte twice.

        Two extents at most `gap` apart are merged only when every chunk between them is part of
        the plan: an uncached chunk nobody claimed is claimed here and comes along (its bytes are
        on the wire anyway, so they are landed, not dropped and fetched again by the background
        fetch); a cached one, or one in flight elsewhere, keeps the requests apart."""
        if gap <= 0 or len(extents) < 2 or self.config.fetch_block_size:
            return coalesce(extents, gap=gap, max_size=max_size)
        ordered = sorted(extents, key=lambda e: (e.start, e.end))
        planned = {e.key: (e.start, e.end) for e in ordered}
        gaps = [(a.end, b.start) for a, b in zip(ordered, ordered[1:]) if 0 < b.start - a.end <= gap]
        for lo, hi in gaps:
            found = {c.digest: c for c in self.index.chunks_between(lo, hi)
                     if not c.zeros and c.digest not in planned and not self.cache.contains(c.digest)}
            if found:
                mine, _ = self.fetcher.claim(found)
                if mine:
                    self.counters.add("gap_chunks", len(mine))
                    for k in mine:
                        ext = self.chunk_extent(found[k], keep_in_memory=False)
                        extents.append(ext)
                        planned[k] = (ext.start, ext.end)
                    flights.update(mine)

        def bridge(lo: int, hi: int) -> bool:
            return all(c.zeros or planned.get(c.digest) == (c.blob_offset, c.blob_end)
                       for c in self.index.chunks_between(lo, hi))

        return coalesce(extents, gap=gap, max_size=max_size, bridge=bridge)

    def wait(self, flights: dict[str, Flight], deadline: float) -> dict[str, bytes]:
        return self.fetcher.wait(flights, deadline, self.config.fetch_timeout)

    def deadline(self) -> float:
        return time.monotonic() + self.config.fetch_timeout

    def check_open(self) -> None:
        if self.closed.is_set():
            raise LayerReadError(f"layer {self.blob_digest} is closed")

    # ---- extents: how a chunk's bytes become a verified, cached chunk --------------------------

    def chunk_extent(self, chunk: Chunk, *, keep_in_memory: bool) -> Extent:
        """The work of fetching `chunk`: its compressed extent, decompressed and verified on
        arrival, then cached. `keep_in_memory` False is the direct path (prefetch, background,
        guesses): the chunk goes to disk only and evicts nothing hot from the memory LRU."""
        # When the memory LRU will hold the chunk, waiters are woken before the disk write (a
        # reader arriving meanwhile finds it in memory); otherwise the disk write comes first, so
        # there is never a moment where a landed chunk is in neither place.
        write_later = keep_in_memory and self.cache.holds(chunk.size)

        def finish(raw: memoryview) -> bytes:
            data = self.parsed.decompress_chunk(raw, chunk)
            if len(data) != chunk.size:
                raise LayerReadError(
                    f"chunk {chunk.digest} decompressed to {len(data)} bytes, the TOC says {chunk.size}"
                )
            self.counters.add("chunks_fetched")
            if write_later:
                self.cache.hold(chunk.digest, data)
            else:
                persist(data)
            return data

        def persist(data: bytes) -> None:
            try:
                self.cache.put(chunk.digest, data, keep_in_memory=False)  # memory: done in finish
            except OSError as e:  # a full or broken cache disk must not fail a verified read
                self.counters.add("cache_write_errors")
                _repeated.warning(("cache write", e.errno), "layer %s: cannot cache chunk %s: %s", self.blob_digest,
                                  chunk.digest, e)

        def cached() -> bytes | None:
            return self.cache.get(chunk.digest, chunk.size, keep_in_memory=keep_in_memory)

        persist_later = persist if write_later else None
        if self.config.fetch_block_size:
            return self._block_extent(chunk, finish, cached, persist_later)
        return Extent(key=chunk.digest, start=chunk.blob_offset, end=chunk.blob_end, finish=finish,
                      cached=cached, persist=persist_later)

    def _block_extent(self, chunk: Chunk, finish, cached, persist) -> Extent:
        """`chunk` fetched as the aligned blocks of `fetch_block_size` bytes that hold it (the
        Go store's fetch shape); blocks kept from earlier fetches are not asked for again."""
        size = self.config.fetch_block_size
        first, last = chunk.blob_offset // size, (chunk.blob_end - 1) // size
        kept = [self.cache.has_block(self.blob_digest, size, i) for i in range(first, last + 1)]
        lo, hi = first, last
        if not all(kept):  # ask only for the span of blocks not kept
            while kept[lo - first]:
                lo += 1
            while kept[hi - first]:
                hi -= 1
        start, end = lo * size, min(self.blob_size, (hi + 1) * size)

        def compressed(raw: memoryview | None) -> bytes | None:
            """The chunk's compressed bytes: blocks lo..hi from `raw` (the fetched span), the
            others from the kept blocks; None when one of those is gone."""
            parts: list[bytes | memoryview] = []
            for i in range(first, last + 1):
                if raw is not None and lo <= i <= hi:
                    at = (i - lo) * size
                    parts.append(raw[at : at + self._block_len(i)])
                    continue
                block = self.cache.get_block(self.blob_digest, size, i, self._block_len(i))
                if block is None:
                    return None
                parts.append(block)
            skip = chunk.blob_offset - first * size
            return b"".join(parts)[skip : skip + chunk.blob_end - chunk.blob_offset]

        def finish_blocks(raw: memoryview) -> bytes:
            for i in range(lo, hi + 1):
                block = bytes(raw[(i - lo) * size : (i - lo) * size + self._block_len(i)])
                try:
                    self.cache.put_block(self.blob_digest, size, i, block)
                except OSError as e:
                    self.counters.add("cache_write_errors")
                    _repeated.warning(("cache write", e.errno), "layer %s: cannot keep block %d: %s", self.blob_digest,
                                      i, e)
            data = compressed(raw)
            if data is None:
                raise LayerReadError(f"a kept block of chunk {chunk.digest} is gone; it is fetched again on the next read")
            return finish(memoryview(data))

        def cached_blocks() -> bytes | None:
            hit = cached()
            if hit is None and all(kept):
                data = compressed(None)
                try:
                    return finish(memoryview(data)) if data is not None else None
                except Exception as e:  # kept blocks that do not make the chunk: fetch them anew
                    log.warning("layer %s: kept blocks of chunk %s do not verify: %s", self.blob_digest, chunk.digest, e)
            return hit

        return Extent(key=chunk.digest, start=start, end=end, finish=finish_blocks, cached=cached_blocks,
                      persist=persist)

    def _block_len(self, index: int) -> int:
        size = self.config.fetch_block_size
        return min(size, self.blob_size - index * size)

    def close(self) -> None:
        self.closed.set()
        self.fetcher.close(LayerReadError(f"layer {self.blob_digest} is closed"))
