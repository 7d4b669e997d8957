"""The raw blob (the ALS `blob` file): compressed bytes as the registry has them, in fixed blocks.

Podman reads a layer's `blob` file whole and sequentially, and only to copy it (push, save);
it checks the digest itself. So the blocks take the cache's direct path: kept on disk (checked
against the sha256 recorded on arrival) and in a small buffer of recent blocks, never in the
memory LRU of hot chunks, which a push of a large layer would otherwise flush. A read also starts
fetching the `blob_readahead` bytes after it, one request per block, in parallel.

Blocks share the layer's flight table with its chunks (keys `blob/...` never collide with chunk
digests), so a block is fetched at most once at a time and every wait is bounded.
"""
from __future__ import annotations

import logging

from ..cache.chunk_cache import ChunkCache
from .config import LayerConfig
from .fetcher import Counters, Fetcher
from .ranges import Extent, Request, coalesce

log = logging.getLogger(__name__)


class BlobFile:
    def __init__(self, fetcher: Fetcher, cache: ChunkCache, blob_digest: str, blob_size: int, config: LayerConfig,
                 counters: Counters) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self.blob_digest = blob_digest
        self.blob_size = blob_size
        self.block_size = config.blob_block_size
        self.readahead = config.blob_readahead
        self.max_request_size = config.max_request_size
        self.fetch_timeout = config.fetch_timeout
        self.counters = counters

    def read(self, offset: int, size: int, deadline: float) -> bytes:
        """Raw bytes `[offset, offset+size)` of the blob, clipped to its end."""
        end = min(self.blob_size, offset + size)
        if offset >= end:
            return b""
        bsize = self.block_size
        first, last = offset // bsize, (end - 1) // bsize
        blocks: dict[int, bytes] = {}
        missing: dict[str, int] = {}
        for i in range(first, last + 1):
            d = self.cache.get_block(self.blob_digest, bsize, i, self._block_len(i))
            if d is None:
                missing[self._key(i)] = i
            else:
                blocks[i] = d
        self.counters.add("blob_cache_hits", len(blocks))
        waits = {}
        if missing:
            mine, theirs = self.fetcher.claim(missing)
            if mine:  # adjacent blocks in one request
                extents = [self._extent(missing[k]) for k in mine]
                self.fetcher.submit_requests(coalesce(extents, gap=0, max_size=self.max_request_size), mine)
            waits = {**mine, **theirs}
        self._read_ahead(last)
        for key, data in self.fetcher.wait(waits, deadline, self.fetch_timeout).items():
            blocks[missing[key]] = data
        out = b"".join(blocks[i] for i in range(first, last + 1))
        lo = offset - first * bsize
        return out[lo : lo + (end - offset)]

    def _read_ahead(self, last: int) -> None:
        bsize = self.block_size
        n_blocks = (self.blob_size + bsize - 1) // bsize
        stop = min(n_blocks, last + 1 + self.readahead // bsize)
        ahead = {
            self._key(i): i
            for i in range(last + 1, stop)
            if not self.fetcher.flights.in_flight(self._key(i)) and not self.cache.has_block(self.blob_digest, bsize, i)
        }
        if ahead:
            mine, _ = self.fetcher.claim(ahead)
            if mine:  # one request per block: they run in parallel and land one by one
                extents = [self._extent(ahead[k]) for k in sorted(mine, key=ahead.__getitem__)]
                self.fetcher.submit_requests([Request(e.start, e.end, [e]) for e in extents], mine)

    def _key(self, index: int) -> str:
        return f"blob/{self.blob_digest}/{self.block_size}/{index}"

    def _block_len(self, index: int) -> int:
        return min(self.block_size, self.blob_size - index * self.block_size)

    def _extent(self, index: int) -> Extent:
        start = index * self.block_size

        def finish(raw: memoryview) -> bytes:
            data = bytes(raw)
            try:
                self.cache.put_block(self.blob_digest, self.block_size, index, data)
            except OSError as e:
                self.counters.add("cache_write_errors")
                log.warning("layer %s: cannot cache blob block %d: %s", self.blob_digest, index, e)
            return data

        return Extent(key=self._key(index), start=start, end=start + self._block_len(index), finish=finish,
                      cached=lambda: self.cache.get_block(self.blob_digest, self.block_size, index, self._block_len(index)))
