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

from ...formats.toc import Chunk
from ..errors import LayerReadError
from ..pieces import claimed_extents, fetch_pieces_in_turn, plan_claimed, split_into_pieces
from ..ranges import Request
from .base import FetchPolicy, PolicyHost

log = logging.getLogger(__name__)


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
            extents = claimed_extents(self.reader, missing, mine)
            flights = dict(mine)  # chunks the planner adds between extents join these
            piece = self.config.prefetch_request_size
            whole = len(mine) == len(chunks)  # nothing of the region cached or in flight elsewhere
            end = max(limit, max(e.end for e in extents))  # (block-aligned extents may end past it)
            if whole and end <= piece:  # one request from 0: the tar headers before the first file come along
                requests = [Request(0, end, extents)]
                self.counters.add("prefetch_bytes", end)
            else:  # around what is cached or in flight elsewhere; a huge region one piece at a time
                requests = plan_claimed(self.reader, extents, flights, piece, from_zero=whole)
                self.counters.add("prefetch_bytes", sum(r.length for r in requests))
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

    def fetch_in_pieces(self, pieces: list[list[Chunk]], *, whole: bool) -> None:
        """Fetch `pieces` (the region, in blob order) in turn (pieces.py): a reader going through
        the region in order (with the kernel's readahead ahead of it) waits for them instead of
        asking for the same bytes beside the stream and halving its speed; a read further on is
        fetched at once. The rest of the region stays reserved to the prefetch (guesses leave it
        alone). `whole`: nothing of the region was cached or in flight at open, so the first
        request starts at 0 and brings the tar headers before the first file along."""
        fetch_pieces_in_turn(self.reader, self.counters, pieces, size=self.config.prefetch_piece_size,
                             kind="prefetch", what="prefetch", count_as="prefetch", from_zero=whole, reserve=True)
