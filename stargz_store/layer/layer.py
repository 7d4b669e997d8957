"""A lazily fetched layer: verified file bytes and raw blob bytes, on demand, through the caches.

Invariants:
- no byte leaves `read` unless the whole chunk holding it was decompressed from its own compressed
  extent and hashed to the chunk's digest (by the format's `decompress_chunk`), before it was cached,
  and hashed again when read back from the disk cache (`ChunkCache.get`); a raw blob block read
  back from disk matches the sha256 recorded when it arrived (`BlobRangeCache.get`);
- at most one fetch per chunk (or blob block) is in the air at a time; readers that need one being
  fetched wait for it, whoever started it (a read, the prefetch or the background fetch);
- every wait is bounded by `LayerConfig.fetch_timeout`: fetches run on worker threads and readers
  only wait on their results, so a stalled registry turns into `LayerReadError`, not a hung reader;
- a background batch starts only when no on-demand or prefetch fetch is in flight on any layer
  sharing the `FetchScheduler`, so it takes bandwidth only in the gaps.

Chunks are shared by digest across layers (`ChunkCache`); zstd:chunked holes are synthesised, not
fetched. Raw blob bytes (`read_blob`) go through fixed-size blocks in the blob cache.
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable, Mapping

from ..cache.chunk_cache import ChunkCache
from ..formats.layer_toc import ParsedToc
from ..formats.toc import REG, Chunk, TocEntry
from .config import LayerConfig
from .errors import LayerReadError
from .fetcher import FETCH_COUNTERS, Counters, Fetcher
from .flight import Flight
from .ranges import Extent, Request, coalesce
from .scheduler import FetchScheduler
from .sources import BlobSource

__all__ = ["Layer", "LayerReadError"]

log = logging.getLogger(__name__)


def _first_offset(entry: TocEntry) -> int:
    return entry.chunks[0].blob_offset


def _stored_size(entry: TocEntry) -> int:
    """Compressed bytes a file with data spans in the blob (first chunk to last)."""
    return entry.chunks[-1].blob_end - entry.chunks[0].blob_offset


_ELF_MAGIC = b"\x7fELF"
_SEQUENTIAL_TRACKED = 256  # files whose last read end is remembered, for readahead
_BACKGROUND_MAX_FAILURES = 5


class Layer:
    """One layer blob served lazily. Created by `LayerResolver`; thread-safe.

    `stats()` counts what came from the source (`fetched_bytes`, `requests` = ranges asked for,
    `fetch_calls` = `read_ranges` calls) and what the cache answered (`cache_hits`).
    """

    def __init__(
        self,
        source: BlobSource,
        parsed: ParsedToc,
        descriptor: Mapping,
        cache: ChunkCache,
        config: LayerConfig | None = None,
        *,
        scheduler: FetchScheduler | None = None,
    ) -> None:
        self.source = source
        self.parsed = parsed
        self.toc = parsed.toc
        self.descriptor = dict(descriptor)
        self.blob_digest: str = self.descriptor["digest"]
        self.blob_size: int = int(self.descriptor.get("size") or source.size)
        self.cache = cache
        self.config = config or LayerConfig()
        self.scheduler = scheduler or FetchScheduler()
        self._counters = Counters(
            *FETCH_COUNTERS, "chunks_fetched", "cache_hits", "cache_misses", "prefetch_bytes", "neighbour_chunks",
            "executable_chunks", "ahead_chunks", "small_layer_chunks",
            "blob_cache_hits", "cache_write_errors",
        )
        self._fetcher = Fetcher(
            source,
            name=f"blob {self.blob_digest}",
            max_concurrency=self.config.max_concurrency,
            coalesce_gap=self.config.coalesce_gap,
            max_request_size=self.config.max_request_size,
            scheduler=self.scheduler,
            counters=self._counters,
        )
        self._closed = threading.Event()
        self._background_thread: threading.Thread | None = None
        self._background_done = threading.Event()
        self.background_state = "not started"
        # ino -> (offset the next sequential read starts at, last chunk index already read ahead)
        self._last_read_end: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._last_read_lock = threading.Lock()
        self._chunk_starts: OrderedDict[int, list[int]] = OrderedDict()  # ino -> chunk file offsets
        self._blob_order: tuple[list[TocEntry], list[int]] | None = None
        self._programs_seen: set[int] = set()
        # A small layer is fetched whole at its first miss (`_small_layer_rest`), once.
        self._small_layer_pending = 0 < self.parsed.toc_offset <= self.config.small_layer_fetch_size
        # Called (layer, entry) after the first read of an ELF file's start; set by the daemon.
        self.on_program_read: Callable[[Layer, TocEntry], None] | None = None

    # ---- file data ---------------------------------------------------------------------------

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes:
        """Bytes `[offset, offset+size)` of regular file `entry`, clipped to its size."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset {offset} or size {size}")
        if entry.type != REG:
            return b""
        first, last = self._chunk_span(entry, offset, size)
        if first > last:
            return b""
        chunks = entry.chunks[first : last + 1]
        self._check_open()
        deadline = time.monotonic() + self.config.fetch_timeout
        data, waits = self._start_chunks(chunks, entry)
        if self.config.readahead_size > 0:
            self._maybe_read_ahead(entry, offset, size, last)
        if waits:
            data.update(self._wait(waits, deadline))
        end = min(entry.size, offset + size)
        parts: list[bytes | memoryview] = []
        for c in chunks:
            d = data[c.digest]
            lo = max(offset, c.file_offset) - c.file_offset
            hi = min(end, c.file_offset + c.size) - c.file_offset
            parts.append(d if (lo == 0 and hi == len(d)) else memoryview(d)[lo:hi])
        result = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        if offset == 0 and self.on_program_read is not None and result[:4] == _ELF_MAGIC:
            self._note_program(entry)
        return result

    def _note_program(self, entry: TocEntry) -> None:
        """Tell `on_program_read` (once per file) that an ELF file's start was read: the loader
        is about to open its libraries (`daemon.libraries`)."""
        with self._last_read_lock:
            if entry.ino in self._programs_seen:
                return
            self._programs_seen.add(entry.ino)
        hook = self.on_program_read
        if hook is not None:
            hook(self, entry)

    def fetch_ahead(self, entry: TocEntry) -> bool:
        """Start fetching the uncached chunks of file `entry` (at most `executable_fetch_limit`
        compressed bytes) without waiting: a guess that it is read soon. True if anything started."""
        if entry.type != REG or not entry.chunks or self._closed.is_set():
            return False
        if _stored_size(entry) > max(self.config.executable_fetch_limit, 0):
            return False
        extents: list[Extent] = []
        flights: dict[str, Flight] = {}
        self._ride_along(self._uncached(entry.chunks), "ahead_chunks", False, extents, flights)
        if not flights:
            return False
        self._fetcher.dispatch(extents, flights)
        return True

    def _start_chunks(
        self, chunks: Iterable[Chunk], entry: TocEntry | None = None
    ) -> tuple[dict[str, bytes], dict[str, Flight]]:
        """Cached chunks' bytes, and the flights to wait for the rest (started here if needed).
        A miss on a small file `entry` also fetches its directory neighbours (`_neighbour_chunks`)
        in the same request, after or before the wanted bytes; the reader waits for its own only."""
        got: dict[str, bytes] = {}
        missing: dict[str, Chunk] = {}
        for c in chunks:
            if c.digest in got or c.digest in missing:
                continue
            d = self.cache.get(c.digest, c.size)
            if d is None and c.zeros:
                d = self._synthesize_zeros(c)
            if d is None:
                missing[c.digest] = c
            else:
                got[c.digest] = d
        self._counters.add("cache_hits", len(got))
        if not missing:
            return got, {}
        self._counters.add("cache_misses", len(missing))
        mine, theirs = self._fetcher.claim(missing)
        if mine:
            extents = [self._chunk_extent(missing[k], keep_in_memory=True) for k in mine]
            flights = dict(mine)
            if entry is not None and self.config.neighbour_fetch_size > 0:
                self._ride_along(self._neighbour_chunks(entry), "neighbour_chunks", True, extents, flights)
            if entry is not None and len(entry.chunks) > 1 and entry.mode & 0o111:
                self._ride_along(self._rest_of_executable(entry, missing).values(), "executable_chunks", False,
                                 extents, flights)
            if self._small_layer_pending:
                self._small_layer_pending = False
                before = self._small_layer_rest(extents, flights)
                if before:
                    self._fetcher.dispatch(before, flights)
            self._fetcher.dispatch(extents, flights)
        return got, {**mine, **theirs}

    def _small_layer_rest(self, extents: list[Extent], flights: dict[str, Flight]) -> list[Extent]:
        """Add every other uncached chunk of a small layer to the request being planned: those
        stored after the wanted bytes go into it (streamed behind them), those before come back
        as a second request, run alongside, so the reader still gets its bytes first.

        A layer of a megabyte or two (a busybox, alpine or distroless base) is read all over when
        a container starts: its shell, its libc, /etc. Each miss in it costs a round trip and a
        new TCP slow start; fetched whole at the first miss, it arrives at link speed while the
        runtime is still setting up. Bounded by `small_layer_fetch_size` compressed bytes."""
        first_wanted = min(e.start for e in extents)
        rest = self._uncached(c for e in self.toc.files_in_blob_order() for c in e.chunks)
        later = [c for c in rest if c.blob_offset >= first_wanted]
        self._ride_along(later, "small_layer_chunks", False, extents, flights)
        before: list[Extent] = []
        self._ride_along([c for c in rest if c.blob_offset < first_wanted], "small_layer_chunks", False, before, flights)
        return before

    def _uncached(self, chunks: Iterable[Chunk]) -> list[Chunk]:
        """The chunks that would need a fetch: not in the cache, and not zstd holes (made locally)."""
        return [c for c in chunks if not c.zeros and not self.cache.contains(c.digest)]

    def _ride_along(
        self, chunks: Iterable[Chunk], counter: str, keep_in_memory: bool, extents: list[Extent], flights: dict[str, Flight]
    ) -> None:
        """Claim `chunks` not yet planned and add them to the request being planned (`extents`,
        `flights`); chunks someone else is fetching already are left to them."""
        extra = {c.digest: c for c in chunks if c.digest not in flights}
        if not extra:
            return
        mine, _ = self._fetcher.claim(extra)
        if mine:
            self._counters.add(counter, len(mine))
            extents += [self._chunk_extent(extra[k], keep_in_memory=keep_in_memory) for k in mine]
            flights.update(mine)

    def _rest_of_executable(self, entry: TocEntry, missing: Mapping[str, Chunk]) -> dict[str, Chunk]:
        """The uncached chunks of executable `entry` after the ones being fetched, for the same
        streamed request. A program or library is mapped and then touched all over, one page fault
        (one chunk fetch, one round trip) at a time; read in file order behind the chunk wanted
        now, the rest arrives at link speed without delaying it. Bounded by
        `executable_fetch_limit` compressed bytes: a huge binary is left to on-demand reads."""
        limit = self.config.executable_fetch_limit
        if limit <= 0 or _stored_size(entry) > limit:
            return {}
        start = max(c.blob_offset for c in entry.chunks if c.digest in missing)
        later = [c for c in entry.chunks if c.blob_offset > start and c.digest not in missing]
        return {c.digest: c for c in self._uncached(later)}

    def _neighbour_chunks(self, entry: TocEntry) -> list[Chunk]:
        """Uncached chunks of the files stored right before and after small file `entry` in the blob
        and in the same directory, up to `neighbour_fetch_size` compressed bytes (a quarter before,
        the rest after). Programs read files of one directory together (Python imports a package's
        modules, a compiler its headers, a loader its libraries), and on a link with 20 ms round
        trips a few KiB more in a request the reader waits for anyway costs far less than a later
        request: this is what turns hundreds of sequential misses into tens."""
        window = self.config.neighbour_fetch_size
        if not entry.chunks or _stored_size(entry) > window:
            return []
        files, starts = self._blob_index()
        i = bisect.bisect_left(starts, entry.chunks[0].blob_offset)
        if i >= len(files) or files[i].ino != entry.ino:
            return []
        parent = entry.name.rpartition("/")[0]
        out: list[Chunk] = []
        for step, budget in ((1, window - window // 4), (-1, window // 4)):
            j = i + step
            while 0 <= j < len(files):
                f = files[j]
                size = _stored_size(f)
                if size > budget or f.name.rpartition("/")[0] != parent:
                    break
                budget -= size
                out.extend(self._uncached(f.chunks))
                j += step
        return out

    def _blob_index(self) -> tuple[list[TocEntry], list[int]]:
        """Files with data in blob order and the blob offset of each one's first chunk (built once)."""
        index = self._blob_order
        if index is None:
            files = sorted(self.toc.files_in_blob_order(), key=_first_offset)
            index = self._blob_order = (files, [f.chunks[0].blob_offset for f in files])
        return index

    def _synthesize_zeros(self, chunk: Chunk) -> bytes | None:
        """A zstd:chunked hole needs no fetch: the codec makes and verifies it from nothing."""
        try:
            data = self.parsed.decompress_chunk(b"", chunk)
        except Exception:  # the codec wants the real frame after all: fetch it
            return None
        self.cache.memory.put(chunk.digest, data)
        return data

    def _chunk_extent(self, chunk: Chunk, *, keep_in_memory: bool) -> Extent:
        # When the memory LRU will hold the chunk, waiters are woken before the disk write (a
        # reader arriving meanwhile finds it in memory); otherwise the disk write comes first, so
        # there is never a moment where a landed chunk is in neither place.
        write_later = keep_in_memory and self.cache.memory.accepts(chunk.size)

        def finish(raw: memoryview) -> bytes:
            data = self.parsed.decompress_chunk(raw, chunk)
            if len(data) != chunk.size:
                raise LayerReadError(
                    f"chunk {chunk.digest} decompressed to {len(data)} bytes, the TOC says {chunk.size}"
                )
            self._counters.add("chunks_fetched")
            if write_later:
                self.cache.memory.put(chunk.digest, data)
            else:
                persist(data)
            return data

        def persist(data: bytes) -> None:
            try:
                self.cache.put(chunk.digest, data, keep_in_memory=False)  # memory: done in finish
            except OSError as e:  # a full or broken cache disk must not fail a verified read
                self._counters.add("cache_write_errors")
                log.warning("layer %s: cannot cache chunk %s: %s", self.blob_digest, chunk.digest, e)

        return Extent(
            key=chunk.digest,
            start=chunk.blob_offset,
            end=chunk.blob_end,
            finish=finish,
            cached=lambda: self.cache.get(chunk.digest, chunk.size, keep_in_memory=keep_in_memory),
            persist=persist if write_later else None,
        )

    def _chunk_span(self, entry: TocEntry, offset: int, size: int) -> tuple[int, int]:
        """Indexes of the first and last chunk holding file bytes `[offset, offset+size)` (first >
        last when none). Same answer as `TocEntry.chunks_for_range`, with the chunk start offsets
        of recently read files kept, so a file of thousands of chunks costs a bisect per read."""
        end = min(entry.size, offset + size)
        if offset >= end or not entry.chunks:
            return 1, 0
        starts = self._chunk_starts.get(entry.ino)
        if starts is None:
            starts = [c.file_offset for c in entry.chunks]
            with self._last_read_lock:
                self._chunk_starts[entry.ino] = starts
                while len(self._chunk_starts) > _SEQUENTIAL_TRACKED:
                    self._chunk_starts.popitem(last=False)
        return bisect.bisect_right(starts, offset) - 1, bisect.bisect_right(starts, end - 1) - 1

    def _maybe_read_ahead(self, entry: TocEntry, offset: int, size: int, last_index: int) -> None:
        """On a sequential read of a file (it starts where the previous read of the file ended),
        start fetching the file's next chunks, up to `readahead_size` compressed bytes past the
        read, without waiting for them. Each chunk is considered once per sequential run, so a
        read inside an already covered window costs no lookups."""
        chunks = entry.chunks
        window_end = last_index
        budget = self.config.readahead_size
        while window_end + 1 < len(chunks) and budget > 0:
            window_end += 1
            budget -= chunks[window_end].blob_end - chunks[window_end].blob_offset
        with self._last_read_lock:
            next_offset, ahead_until = self._last_read_end.get(entry.ino, (-1, -1))
            sequential = offset == 0 or offset == next_offset
            if not sequential:
                ahead_until = -1
            first = max(last_index, ahead_until) + 1
            self._last_read_end[entry.ino] = (offset + size, max(ahead_until, window_end) if sequential else -1)
            self._last_read_end.move_to_end(entry.ino)
            while len(self._last_read_end) > _SEQUENTIAL_TRACKED:
                self._last_read_end.popitem(last=False)
        if not sequential or first > window_end:
            return
        ahead = {c.digest: c for c in self._uncached(chunks[first : window_end + 1])}
        if ahead:
            mine, _ = self._fetcher.claim(ahead)
            if mine:  # one request per chunk: they land one by one, in parallel, as the reader needs them
                extents = [self._chunk_extent(ahead[k], keep_in_memory=True) for k in mine]
                self._fetcher.dispatch(extents, mine, max_request_size=0)

    # ---- raw blob ----------------------------------------------------------------------------

    def read_blob(self, offset: int, size: int) -> bytes:
        """Raw compressed bytes `[offset, offset+size)` of the blob (the ALS `blob` file).

        Served in `blob_block_size` blocks through the blob cache; a read also starts fetching the
        `blob_readahead` bytes after it (one request per block, in parallel), since the `blob`
        file is read whole and sequentially when it is read at all.
        """
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset {offset} or size {size}")
        end = min(self.blob_size, offset + size)
        if offset >= end:
            return b""
        self._check_open()
        deadline = time.monotonic() + self.config.fetch_timeout
        bsize = self.config.blob_block_size
        first, last = offset // bsize, (end - 1) // bsize
        blocks: dict[int, bytes] = {}
        missing: dict[str, int] = {}
        for i in range(first, last + 1):
            d = self._cached_block(i)
            if d is None:
                missing[self._block_key(i)] = i
            else:
                blocks[i] = d
        self._counters.add("blob_cache_hits", len(blocks))
        waits: dict[str, Flight] = {}
        if missing:
            mine, theirs = self._fetcher.claim(missing)
            if mine:
                self._fetcher.dispatch([self._block_extent(missing[k]) for k in mine], mine)
            waits = {**mine, **theirs}
        self._blob_read_ahead(last)
        for key, data in self._wait(waits, deadline).items():
            blocks[missing[key]] = data
        out = b"".join(blocks[i] for i in range(first, last + 1))
        lo = offset - first * bsize
        return out[lo : lo + (end - offset)]

    def _blob_read_ahead(self, last: int) -> None:
        bsize = self.config.blob_block_size
        n_blocks = (self.blob_size + bsize - 1) // bsize
        stop = min(n_blocks, last + 1 + self.config.blob_readahead // bsize)
        ahead = {
            self._block_key(i): i
            for i in range(last + 1, stop)
            if not self._fetcher.flights.in_flight(self._block_key(i))
            and self.cache.memory.get(self._block_key(i)) is None
            and not self.cache.blob_cache.contains(self.blob_digest, bsize, i)
        }
        if ahead:
            mine, _ = self._fetcher.claim(ahead)
            if mine:
                self._fetcher.dispatch([self._block_extent(ahead[k]) for k in mine], mine, max_request_size=0)

    def _block_key(self, index: int) -> str:
        return f"blob/{self.blob_digest}/{self.config.blob_block_size}/{index}"

    def _cached_block(self, index: int) -> bytes | None:
        key = self._block_key(index)
        data = self.cache.memory.get(key)
        if data is None:
            data = self.cache.blob_cache.get(
                self.blob_digest, self.config.blob_block_size, index, self._block_len(index)
            )
            if data is not None:
                self.cache.memory.put(key, data)
        return data

    def _block_len(self, index: int) -> int:
        bsize = self.config.blob_block_size
        return min(bsize, self.blob_size - index * bsize)

    def _block_extent(self, index: int) -> Extent:
        bsize = self.config.blob_block_size
        start = index * bsize
        key = self._block_key(index)

        def finish(raw: memoryview) -> bytes:
            data = bytes(raw)
            try:
                self.cache.blob_cache.put(self.blob_digest, bsize, index, data)
            except OSError as e:
                self._counters.add("cache_write_errors")
                log.warning("layer %s: cannot cache blob block %d: %s", self.blob_digest, index, e)
            self.cache.memory.put(key, data)
            return data

        return Extent(key=key, start=start, end=start + self._block_len(index), finish=finish,
                      cached=lambda: self._cached_block(index))

    def _wait(self, flights: dict[str, Flight], deadline: float) -> dict[str, bytes]:
        return self._fetcher.wait(flights, deadline, self.config.fetch_timeout)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise LayerReadError(f"layer {self.blob_digest} is closed")

    # ---- prefetch and background fetch -----------------------------------------------------

    def prefetch_limit(self) -> int:
        """End of the prioritized region to prefetch: the landmark's offset, else `prefetch_size`
        (capped to the data area), 0 when the layer says not to prefetch. (`no_prefetch` is the
        resolver's decision: it then never calls `prefetch`.)"""
        if self.toc.has_no_prefetch_landmark:
            return 0
        if self.toc.prefetch_landmark_offset is not None:
            return self.toc.prefetch_landmark_offset
        return min(self.config.prefetch_size, self.parsed.toc_offset)

    def prefetch(self, timeout: float | None) -> None:
        """Fetch the prioritized region in one ranged request; its chunks are verified and cached
        one by one as their bytes arrive (`Fetcher._stream_and_land`).

        Waits at most `timeout` seconds, or not at all with None; a prefetch that is slower keeps
        running, and readers of its chunks wait for those chunks rather than fetch them again.
        Failures are logged, not raised: prefetch is an optimisation, a later read fetches on demand.
        """
        limit = self.prefetch_limit()
        if limit <= 0:
            return
        chunks: dict[str, Chunk] = {}
        for e in self.toc.files_in_blob_order():
            for c in e.chunks:
                if c.blob_end <= limit:
                    chunks.setdefault(c.digest, c)
        missing = {d: c for d, c in chunks.items() if not self.cache.contains(d)}
        if not missing:
            log.debug("layer %s: prefetch region already cached", self.blob_digest)
            return
        mine, theirs = self._fetcher.claim(missing)
        if mine:
            extents = [self._chunk_extent(missing[k], keep_in_memory=False) for k in mine]
            if len(missing) == len(chunks):
                start, end = 0, limit
            else:
                start, end = min(e.start for e in extents), max(e.end for e in extents)
            self._counters.add("prefetch_bytes", end - start)
            log.debug("layer %s: prefetching [%d, %d)", self.blob_digest, start, end)
            piece = self.config.prefetch_request_size
            if end - start <= piece:
                self._fetcher.submit([Request(start, end, extents)], mine)
            else:  # huge prioritized region: consecutive requests, one in memory at a time
                requests = coalesce(extents, gap=piece, max_size=piece)
                requests[0].start = min(requests[0].start, start)
                self._fetcher.submit_in_order(requests, mine)
        if timeout is None:
            return
        began = time.monotonic()
        try:
            self._wait({**mine, **theirs}, began + timeout)
        except LayerReadError as e:
            log.warning("layer %s: prefetch incomplete: %s", self.blob_digest, e)
        else:
            log.debug("layer %s: prefetch of %d chunk(s) ready in %.3f s", self.blob_digest, len(missing),
                      time.monotonic() - began)

    def start_background_fetch(self) -> None:
        """Fetch every chunk not yet cached, in blob order, at low priority, on one thread."""
        if self._background_thread is not None or self._closed.is_set():
            return
        self.background_state = "running"
        self._background_thread = threading.Thread(
            target=self._background_main, name=f"bgfetch-{self.blob_digest[7:19]}", daemon=True
        )
        self._background_thread.start()

    def wait_background(self, timeout: float | None = None) -> bool:
        """True once the background fetch has ended (complete, failed or stopped)."""
        return self._background_done.wait(timeout)

    def _background_main(self) -> None:
        try:
            _lower_thread_priority()
            state = self._background_loop()
        except Exception:
            log.exception("layer %s: background fetch failed", self.blob_digest)
            state = "failed"
        self.background_state = state
        log.debug("layer %s: background fetch %s", self.blob_digest, state)
        self._background_done.set()

    def _background_loop(self) -> str:
        seen: set[str] = set()
        batch: dict[str, Chunk] = {}
        batch_bytes = 0
        for entry in self.toc.files_in_blob_order():
            for c in entry.chunks:
                if self._closed.is_set():
                    return "stopped"
                if c.digest in seen:
                    continue
                seen.add(c.digest)
                if self.cache.contains(c.digest) or (c.zeros and self._synthesize_zeros(c) is not None):
                    continue
                batch[c.digest] = c
                batch_bytes += c.blob_end - c.blob_offset
                if batch_bytes >= self.config.background_batch_size:
                    if not self._background_batch(batch):
                        return "stopped" if self._closed.is_set() else "failed"
                    batch, batch_bytes = {}, 0
        if batch and not self._background_batch(batch):
            return "stopped" if self._closed.is_set() else "failed"
        return "done"

    def _background_batch(self, batch: dict[str, Chunk]) -> bool:
        """Fetch one batch when the scheduler allows, retrying with backoff; False when stopped
        or given up."""
        failures = 0
        while True:
            with self.scheduler.background_turn(self._closed, self.config.background_idle_wait) as allowed:
                if not allowed:
                    return False
                mine, _ = self._fetcher.claim(batch)  # chunks someone else is fetching are theirs
                if not mine:
                    return True
                extents = [self._chunk_extent(batch[k], keep_in_memory=False) for k in mine]
                requests = coalesce(extents, gap=self.config.coalesce_gap, max_size=self.config.max_request_size)
                self._fetcher.run_batch(requests, mine)
            failed = {k: batch[k] for k, f in mine.items() if f.error is not None}
            if not failed:
                return True
            failures += 1
            if failures >= _BACKGROUND_MAX_FAILURES:
                log.warning("layer %s: background fetch gives up after %d failures", self.blob_digest, failures)
                return False
            batch = failed
            if self._closed.wait(min(30.0, 0.5 * 2**failures)):
                return False

    # ---- bookkeeping -----------------------------------------------------------------------

    def fetched_bytes(self) -> int:
        return self._counters.get("fetched_bytes")

    def stats(self) -> dict:
        out: dict = self._counters.snapshot()
        out["background_state"] = self.background_state
        out["in_flight"] = len(self._fetcher.flights)
        return out

    def drain(self, timeout: float) -> bool:
        """Wait until no on-demand or prefetch fetch is running (their cache writes included);
        True if that happened within `timeout` seconds."""
        return self._fetcher.drain(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop background work and fail pending waits; the on-disk cache stays.

        Fetches already running get up to `timeout` seconds to finish writing what they fetched
        to the cache (a stalled network fetch is not waited for beyond that).
        """
        if self._closed.is_set():
            return
        self.drain(timeout)
        self._closed.set()
        self._fetcher.close(LayerReadError(f"layer {self.blob_digest} is closed"))
        if self._background_thread is not None and self._background_thread is not threading.current_thread():
            self._background_thread.join(timeout=5.0)
        if self._background_thread is None:
            self._background_done.set()
        close_source = getattr(self.source, "close", None)
        if callable(close_source):
            close_source()

    def __enter__(self) -> Layer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lower_thread_priority() -> None:
    """Background fetch decompresses and hashes: let on-demand work have the CPU first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
