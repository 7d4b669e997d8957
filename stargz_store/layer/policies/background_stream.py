"""Background fetch as one streamed GET per blob (a blob behind a mirror), chunks landed as they pass.

Why: a pull-through mirror (distribution's `proxy` mode, Harbor) answers a range of a blob it
has not cached with the whole body, fetched from the origin for that request alone. Background
fetch in ranged batches therefore costs the origin a copy of the blob per batch while the mirror
fills, per node. One plain GET per blob, sent after the mirror's own fill (the registry client's
`stream_blob` waits for a filling mirror, `background_mirror_wait`), costs the origin nothing
beyond that fill, and a warm mirror one request per blob and node.

What must hold (as for the batched background fetch, see background.py):
- a chunk is landed (decompressed, verified, cached on the direct path) only from its own bytes,
  and only by the flight this stream claimed for it; chunks cached or in flight elsewhere are
  not claimed (their bytes pass by and are dropped);
- every flight this stream claims is landed, with a value or an error, whatever happens; chunks
  whose bytes did not arrive go back to the queue for the next request;
- reads come first: every `background_batch_size` bytes, once the chunks claimed so far have
  landed, the stream stops reading (the server waits) until no foreground fetch is in flight and
  the quiet period has passed; after `MAX_PAUSE` seconds of that it gives the request up and
  asks again later from the next chunk it needs;
- memory stays bounded: only the bytes of claimed chunks not landed yet are held;
- the stream is given up, rather than read through, over a run of more than
  `background_batch_size` bytes no queued chunk needs, and at the last chunk it needs.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Iterable

from ...formats.toc import Chunk
from ..errors import LayerReadError
from ..flight import Flight
from ..ranges import Extent, Request

if TYPE_CHECKING:
    from ..config import LayerConfig
    from ..reader import ChunkReader
    from ..scheduler import FetchScheduler

log = logging.getLogger(__name__)

MAX_PAUSE = 10.0  # seconds a stream waits for reads to go quiet before it gives its request up


class StreamEnded(Exception):
    """The sink gives the request up on purpose (`reason`); the caller asks again or is done."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChunkStream:
    """The sink of one streamed request: claims the queued chunks as their bytes come near and
    lands each once its last byte is in. `queue` (chunks in blob order, shared between the
    requests of one background fetch) loses the chunks this request settles."""

    def __init__(self, reader: ChunkReader, config: LayerConfig, scheduler: FetchScheduler,
                 queue: deque[Chunk]) -> None:
        self.reader = reader
        self.config = config
        self.scheduler = scheduler
        self.queue = queue
        self.margin = config.fetch_block_size  # a block-shaped extent starts at most this far before its chunk
        self.pending: list[tuple[Chunk, Extent, Flight]] = []  # claimed, in blob order
        self.buf = bytearray()
        self.base = 0  # blob offset of buf[0] (0 until `begin` has claimed the first chunks)
        self.end = 0  # blob offset just past the last byte received
        self.since_pause = 0
        self.received = 0

    def begin(self) -> int | None:
        """The offset to ask from (the first claimed chunk's extent), or None: nothing left."""
        self._drop_settled_head()
        if not self.queue:
            return None
        first = self.queue[0]
        self._claim_upto(first.blob_end)
        if not self.pending:  # the head was cached or in flight elsewhere meanwhile: look again
            return self.begin()
        self.base = self.end = min(ext.start for _, ext, _ in self.pending)
        return self.base

    def feed(self, offset: int, piece: bytes) -> None:
        if offset + len(piece) <= self.end:
            return  # a resumed request sends bytes again
        if offset > self.end:
            raise LayerReadError(f"stream skipped bytes [{self.end}, {offset})")
        fresh = memoryview(piece)[self.end - offset:]
        if not self._yield_due():
            self._claim_upto(self.end + len(fresh))
        self.buf += fresh
        self.end += len(fresh)
        self.received += len(fresh)
        self.since_pause += len(fresh)
        self.reader.counters.add("fetched_bytes", len(fresh))
        self.reader.counters.add("background_bytes", len(fresh))
        self._land_arrived()
        self._trim()
        if self.pending:
            return
        if self._yield_due():
            if not self.scheduler.pause_for_foreground(self.reader.closed, MAX_PAUSE, self.config.background_idle_wait):
                raise StreamEnded("reads kept the link busy" if not self.reader.closed.is_set() else "closed")
            self.since_pause = 0
        self._drop_settled_head()
        if not self.queue:
            raise StreamEnded("every chunk landed")
        if self.queue[0].blob_offset - self.margin - self.end > self.config.background_batch_size:
            raise StreamEnded(f"nothing needed in the next {self.queue[0].blob_offset - self.end} bytes")

    def release(self, error: BaseException | None) -> int:
        """After the request ended, however: the claimed chunks that did not land go back to the
        front of the queue, their flights failed (a waiting reader fetches them itself); returns
        how many."""
        unlanded = self.pending
        self.pending = []
        err = LayerReadError(f"background stream of {self.reader.blob_digest} ended before these bytes"
                             + (f": {error}" if error is not None else ""))
        for chunk, ext, flight in unlanded:
            self.reader.fetcher.flights.finish(ext.key, flight, error=err)
        self.queue.extendleft(c for c, _, _ in reversed(unlanded))
        self.buf = bytearray()
        return len(unlanded)

    # ---- internals --------------------------------------------------------------------------

    def _yield_due(self) -> bool:
        return self.since_pause >= self.config.background_batch_size

    def _drop_settled_head(self) -> None:
        cache = self.reader.cache
        while self.queue and cache.contains(self.queue[0].digest):
            self.queue.popleft()

    def _claim_upto(self, upto: int) -> None:
        """Claim the queued chunks whose bytes start before `upto` (they are arriving now)."""
        wanted: dict[str, Chunk] = {}
        while self.queue and self.queue[0].blob_offset < upto:
            c = self.queue.popleft()
            if c.digest not in wanted and not self.reader.cache.contains(c.digest):
                wanted[c.digest] = c
        if not wanted:
            return
        mine, _ = self.reader.fetcher.claim(wanted)  # chunks someone else is fetching are theirs
        late: list[tuple[Extent, Flight]] = []
        for key, flight in mine.items():
            ext = self.reader.chunk_extent(wanted[key], keep_in_memory=False)
            if ext.start < self.base:  # its first bytes were dropped already: a request of its own
                late.append((ext, flight))
                continue
            self.pending.append((wanted[key], ext, flight))
        self.pending.sort(key=lambda p: (p[1].end, p[1].start))
        for ext, flight in late:
            self.reader.fetcher.run_batch([Request(ext.start, ext.end, [ext])], {ext.key: flight})

    def _land_arrived(self) -> None:
        landed = 0
        for chunk, ext, flight in self.pending:
            if ext.end > self.end:
                break
            with memoryview(self.buf) as view:
                raw = bytes(view[ext.start - self.base: ext.end - self.base])
            self.reader.fetcher.land(ext, flight, memoryview(raw))
            landed += 1
        if landed:
            del self.pending[:landed]

    def _trim(self) -> None:
        """Keep only the bytes a claimed chunk, or the next queued one, may still need."""
        keep = min((ext.start for _, ext, _ in self.pending), default=self.end)
        if self.queue:
            keep = min(keep, max(self.base, self.queue[0].blob_offset - self.margin))
        cut = min(keep, self.end) - self.base
        if cut > 0:
            del self.buf[:cut]
            self.base += cut


def uncached_in_blob_order(reader: ChunkReader, chunks: Iterable[Chunk]) -> deque[Chunk]:
    """The chunks a background fetch still has to land: each digest once, no holes (made locally),
    none cached, sorted by blob offset."""
    seen: set[str] = set()
    out: list[Chunk] = []
    for c in chunks:
        if c.digest in seen:
            continue
        seen.add(c.digest)
        if reader.cache.contains(c.digest):
            continue
        if c.zeros and reader.synthesize_zeros(c, keep_in_memory=False) is not None:
            continue
        out.append(c)
    out.sort(key=lambda c: c.blob_offset)
    return deque(out)
