"""Tunables of the data path, filled from config.toml by the daemon (see config/config.toml)."""
from __future__ import annotations

from dataclasses import dataclass

from ..formats.toc import TocLimits


@dataclass
class LayerConfig:
    """Sizes in bytes, times in seconds.

    `disable_verification` is accepted for config compatibility and changes nothing: every chunk
    is hashed against its TOC digest before use (hashing costs little next to decompression, and
    the Go store at HEAD refuses to run with verification off). Entries read back from the disk
    cache are hashed again before use, see `ChunkCache`.

    `readahead_size` is off by default so a read fetches only the chunks it covers; the daemon
    may turn it on (a few MiB roughly doubles cold sequential throughput from a local registry).
    """

    prefetch_timeout: float = 10.0          # seconds a layer open waits for its prefetch, with prefetch_wait
    prefetch_wait: bool = False             # False: a layer is ready once its TOC is verified; the prefetch
                                            # streams in and a read of a prefetched file waits for that file's
                                            # chunks only (as the Go stargz-store, where nobody waits)
    prefetch_size: int = 0                  # used when a layer has no landmark
    no_prefetch: bool = False
    no_background_fetch: bool = False
    disable_verification: bool = False
    max_concurrency: int = 8                # parallel ranged requests per layer
    fetch_timeout: float = 30.0             # a reader gets LayerReadError after this, never hangs
    max_toc_size: int = 150 << 20          # a TOC's bytes, compressed and inflated (checked while inflating);
                                           # also the names of directories a TOC implies without listing
    max_toc_entries: int = 1_000_000       # TOC entries, implied directories included (see formats.toc.TocLimits)
    max_path_depth: int = 2048             # components of an entry name (PATH_MAX / 2)
    max_chunk_size: int = 64 << 20         # bytes one chunk inflates to (twice that compressed): a chunk is
                                           # fetched, inflated and verified whole in memory (TocLimits)
    tail_size: int = 13 << 10               # the first ranged request of the blob tail (footer + TOC guess):
                                            # what a fresh TCP connection delivers in its first round trip
                                            # (10 segments of 1448 bytes) with room for the response headers
                                            # (~500 bytes from docker-registry; 14 KiB took a second round
                                            # trip on new connections). A larger TOC costs one more request, sized
                                            # exactly; a larger guess costs slow-start round trips on every
                                            # layer open (64 KiB: ~2 more at 20 ms RTT, for 4 KB TOCs)
    coalesce_gap: int = 64 << 10            # merge ranges closer than this into one request
    executable_fetch_limit: int = 0         # first miss on a multi-chunk executable fetches all its chunks, when
                                            # it is at most this many compressed bytes (0: off)
    neighbour_fetch_size: int = 0           # a miss on a small file also fetches the files stored next to it
                                            # in the same directory, up to this many compressed bytes (0: off)
    small_layer_fetch_size: int = 0         # the first miss in a layer whose data is at most this many compressed
                                            # bytes fetches the whole layer, the wanted bytes first (0: off)
    # Extras beyond the shared contract:
    max_request_size: int = 16 << 20        # a coalesced request is not grown past this (parallelism)
    prefetch_request_size: int = 64 << 20   # a larger prioritized region is fetched in pieces of this
    background_batch_size: int = 1 << 20   # compressed bytes per background request (a read waits at most one batch)
    background_quiet_period: float = 1.0   # background fetch starts only after on-demand fetches (and layer
                                           # opens) have been quiet this long (Go: ~1.5 s; 1.5 measured no gain here)
    background_idle_wait: float = 0.05     # how long background fetch sleeps while reads are in flight
    background_slots: int = 2              # background batches running at once, over all layers
    blob_block_size: int = 1 << 20         # granularity of the raw-blob cache (ALS `blob` file)
    blob_readahead: int = 8 << 20          # a `blob` miss also fetches this far ahead (sequential copy)
    keep_toc_bytes: bool = True            # keep the bytes a TOC was read from: a restart re-opens
                                           # layers without the registry (re-verified every time)
    readahead_size: int = 0                # a sequential file read also fetches this many compressed
                                           # bytes of the file's next chunks (0: only what is read)

    @property
    def toc_limits(self) -> TocLimits:
        return TocLimits(
            max_entries=self.max_toc_entries, max_depth=self.max_path_depth, max_implicit_names=self.max_toc_size,
            max_chunk_size=self.max_chunk_size,
        )
