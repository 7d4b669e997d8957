"""Prefetch: at open, the layer's prioritized region (up to `.prefetch.landmark`) in one request.

The region's chunks are verified and cached one by one as their bytes arrive (streamed), so a
reader of its first file waits for that file only; readers of chunks still on their way wait
for those chunks rather than fetch them again. Without a landmark, `prefetch_size` bytes (0:
none); with `.no.prefetch.landmark`, nothing. A region of which some chunks are cached or in
flight elsewhere is fetched around them (no byte twice), in pieces of `prefetch_request_size`.
"""
from __future__ import annotations

import logging
import time

from ...formats.toc import Chunk
from ..errors import LayerReadError
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
        fetcher = self.reader.fetcher
        mine, theirs = fetcher.claim(missing)
        if mine:
            extents = [self.reader.chunk_extent(missing[k], keep_in_memory=False) for k in mine]
            flights = dict(mine)  # chunks the planner adds between extents join these
            piece = self.config.prefetch_request_size
            whole = len(mine) == len(chunks)  # nothing of the region cached or in flight elsewhere
            end = max(limit, max(e.end for e in extents))  # (block-aligned extents may end past it)
            if whole and end <= piece:  # one request from 0: the tar headers before the first file come along
                requests = [Request(0, end, extents)]
            else:  # around what is cached or in flight elsewhere; a huge region one piece at a time
                requests = self.reader.plan_requests(extents, flights, gap=piece, max_size=piece)
                if whole:
                    requests[0].start = 0
            self.counters.add("prefetch_bytes", sum(r.length for r in requests))
            log.debug("layer %s: prefetching %d request(s) up to %d", self.reader.blob_digest, len(requests), limit)
            if len(requests) == 1:
                fetcher.submit(requests, flights)
            else:  # consecutive requests, one in memory at a time
                fetcher.submit_in_order(requests, flights)
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
