"""Prefetch: at open, the layer's prioritized region (up to `.prefetch.landmark`), in order.

The region's chunks are verified and cached one by one as their bytes arrive (streamed), so a
reader of its first file waits for that file only; readers of chunks still on their way wait
for those chunks rather than fetch them again. Without a landmark, `prefetch_size` bytes (0:
none); with `.no.prefetch.landmark`, nothing. A region of which some chunks are cached or in
flight elsewhere is fetched around them (no byte twice), in pieces of `prefetch_request_size`.

A region of at most two pieces (`prefetch_piece_size`) is one request, claimed at open. Reads
overtake a larger one (off in the baseline): it is claimed a piece at a time, one piece ahead of
the request on the wire, so a read of a chunk further on is an ordinary miss, fetched at once on
its own request, and the prefetch later skips it. Claimed whole at open, that read would wait
for the stream to get there: a JVM opening its classpath reads every jar's central directory
(its last bytes) first, so with whole jars prioritized in first-open order its start waited for
the whole region, the classes it never reads included. The pieces follow one another on the link
(the next asked for as the current one ends) and bring the same bytes.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, NamedTuple

from ...formats.toc import Chunk
from ..errors import LayerReadError
from ..flight import Flight
from ..ranges import Extent, Request
from .base import FetchPolicy, PolicyHost

log = logging.getLogger(__name__)

# The next piece of a prefetch is asked for when the current one has this many bytes to go:
# about one round trip of data at 100 Mbit/s and 40 ms, so its first bytes come as the last of
# the current one do.
_HAND_OFF = 512 << 10


class Prefetch(FetchPolicy):
    name = "prefetch"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.toc = layer.toc
        self.toc_offset = layer.parsed.toc_offset
        self.config = layer.config
        self.counters = layer.counters

    def on_open(self) -> None:
        self.run(self.config.prefetch_timeout if self.config.prefetch_wait else None)

    def limit(self) -> int:
        """End of the prioritized region: the landmark's offset, else `prefetch_size` (capped to
        the data area), 0 when the layer says not to prefetch."""
        if self.toc.has_no_prefetch_landmark:
            return 0
        if self.toc.prefetch_landmark_offset is not None:
            return self.toc.prefetch_landmark_offset
        return min(self.config.prefetch_size, self.toc_offset)

    def run(self, timeout: float | None) -> None:
        """Start the prefetch; wait at most `timeout` seconds for it (None: not at all). A slower
        prefetch keeps running. Failures are logged, not raised: a later read fetches on demand."""
        limit = self.limit()
        if limit <= 0:
            return
        chunks: dict[str, Chunk] = {}
        for e in self.toc.files_in_blob_order():
            for c in e.chunks:
                if c.blob_end <= limit:
                    chunks.setdefault(c.digest, c)
        missing = {d: c for d, c in chunks.items() if not self.reader.cache.contains(d)}
        if not missing:
            log.debug("layer %s: prefetch region already cached", self.reader.blob_digest)
            return
        piece_size = self.config.prefetch_piece_size
        if timeout is None and piece_size > 0:  # (an open that waits has no reader to overtake it)
            pieces = split_into_pieces(missing.values(), piece_size)
            if len(pieces) > 2:
                self.fetch_in_pieces(pieces, whole=len(missing) == len(chunks))
                return
        fetcher = self.reader.fetcher
        mine, theirs = fetcher.claim(missing)
        if mine:
            extents = self._extents(missing, mine)
            flights = dict(mine)  # chunks the planner adds between extents join these
            piece = self.config.prefetch_request_size
            whole = len(mine) == len(chunks)  # nothing of the region cached or in flight elsewhere
            end = max(limit, max(e.end for e in extents))  # (block-aligned extents may end past it)
            if whole and end <= piece:  # one request from 0: the tar headers before the first file come along
                requests = [Request(0, end, extents)]
                self.counters.add("prefetch_bytes", end)
            else:  # around what is cached or in flight elsewhere; a huge region one piece at a time
                requests = self._plan(extents, flights, piece, from_zero=whole)
            log.debug("layer %s: prefetching %d request(s) up to %d", self.reader.blob_digest, len(requests), limit)
            if len(requests) == 1:
                fetcher.submit(requests, flights, "prefetch")
            else:  # consecutive requests, one in memory at a time
                fetcher.submit_in_order(requests, flights, "prefetch")
        if timeout is None:
            return
        began = time.monotonic()
        try:
            self.reader.wait({**mine, **theirs}, began + timeout)
        except LayerReadError as e:
            log.warning("layer %s: prefetch incomplete: %s", self.reader.blob_digest, e)
        else:
            log.debug("layer %s: prefetch of %d chunk(s) ready in %.3f s", self.reader.blob_digest, len(missing),
                      time.monotonic() - began)

    def _extents(self, missing: dict[str, Chunk], mine: dict[str, Flight]) -> list[Extent]:
        """The claimed chunks' extents, on the direct path (to disk, not the memory LRU)."""
        return [self.reader.chunk_extent(missing[k], keep_in_memory=False) for k in mine]

    def _plan(self, extents: list[Extent], flights: dict[str, Flight], size: int, *, from_zero: bool) -> list[Request]:
        """Requests of at most `size` bytes for claimed `extents`, around what is cached or in
        flight elsewhere (chunks the planner adds between them join `flights`), counted as
        prefetch bytes. `from_zero`: the first starts at 0, bringing the tar headers before the
        first file along."""
        requests = self.reader.plan_requests(extents, flights, gap=size, max_size=size)
        if from_zero:
            requests[0].start = 0
        self.counters.add("prefetch_bytes", sum(r.length for r in requests))
        return requests

    def fetch_in_pieces(self, pieces: list[list[Chunk]], *, whole: bool) -> None:
        """Fetch `pieces` in order, one request after another. A piece is claimed when the one
        before it goes out, so the prefetch holds the piece on the wire and the next: a reader
        going through the region in order (with the kernel's readahead ahead of it) waits for
        them instead of asking for the same bytes beside the stream and halving its speed; a read
        further on is fetched at once, and what a read claimed or cached is skipped (fetched
        around, never twice). The next piece is asked for once the current one has at most
        `_HAND_OFF` bytes to go, so the link is not idle for a round trip between them. `whole`:
        nothing of the region was cached or in flight at open, so the first request starts at 0
        and brings the tar headers before the first file along. A piece that fails (an error,
        bytes that do not verify) ends the prefetch once what it had claimed is sent: a stalled
        or broken registry gets no more of it than one request did, and reads fetch the rest."""
        reader = self.reader
        fetcher = reader.fetcher
        size = self.config.prefetch_piece_size
        end = pieces[-1][-1].blob_end
        reader.reserved = (pieces[0][0].blob_offset, end)
        log.debug("layer %s: prefetching %d piece(s) in turn", reader.blob_digest, len(pieces))
        stopped = False

        def claim_from(index: int) -> _Claimed | None:
            """The first piece from `index` on with something left to fetch, claimed; the rest of
            the region stays reserved to the prefetch (guesses leave it alone)."""
            while index < len(pieces) and not reader.closed.is_set() and not stopped:
                chunks = pieces[index]
                reader.reserved = (pieces[index + 1][0].blob_offset, end) if index + 1 < len(pieces) else (0, 0)
                missing = {c.digest: c for c in chunks if not reader.cache.contains(c.digest)}
                mine, _ = fetcher.claim(missing)
                if mine:
                    return _Claimed(index, len(chunks), missing, mine)
                index += 1
            reader.reserved = (0, 0)
            return None

        def send(piece: _Claimed, following: _Claimed | None) -> None:
            self.counters.add("prefetch_pieces")
            flights = dict(piece.mine)
            requests = self._plan(self._extents(piece.missing, piece.mine), flights, size,
                                  from_zero=piece.index == 0 and whole and len(piece.mine) == piece.size)
            length = left = sum(r.length for r in requests)
            handed = False

            def hand_off() -> None:  # (only ever on this piece's worker thread)
                nonlocal handed
                if following is not None and not handed:
                    handed = True
                    send(following, claim_from(following.index + 1))

            def received(n: int) -> None:
                nonlocal left
                left -= n
                if left <= _HAND_OFF:
                    hand_off()

            def run() -> None:
                nonlocal stopped
                try:
                    if length <= _HAND_OFF:
                        hand_off()
                    for req in requests:
                        fetcher.run_batch([req], flights, True, "prefetch", received)
                    if any(f.error is not None for f in flights.values()):  # (landed ones are gone)
                        stopped = True
                        reader.reserved = (0, 0)
                        log.warning("layer %s: prefetch stopped after a failed piece; the rest is fetched as read",
                                    reader.blob_digest)
                finally:
                    hand_off()

            fetcher.submit_work(run, requests, flights)

        first = claim_from(0)
        if first is not None:
            send(first, claim_from(first.index + 1))


class _Claimed(NamedTuple):
    """A piece of the region whose missing chunks the prefetch has claimed."""

    index: int
    size: int  # chunks in the piece
    missing: dict[str, Chunk]
    mine: dict[str, Flight]


def split_into_pieces(chunks: Iterable[Chunk], size: int) -> list[list[Chunk]]:
    """`chunks` in blob order, cut into runs spanning at most `size` compressed bytes each (a
    larger chunk is a piece of its own)."""
    pieces: list[list[Chunk]] = []
    run: list[Chunk] = []
    for c in sorted(chunks, key=lambda c: c.blob_offset):
        if run and c.blob_end - run[0].blob_offset > size:
            pieces.append(run)
            run = []
        run.append(c)
    if run:
        pieces.append(run)
    return pieces
