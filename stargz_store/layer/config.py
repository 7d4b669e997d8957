"""The data path's tunables: one table of defaults, the production values, for the daemon and the tests.

`LayerConfig()` is what the daemon runs with when config.toml sets nothing (`daemon/config.py`
only copies keys that are set), and what every test starts from: a test that wants less turns
policies off explicitly (`with_policies`), so no test runs a set-up production never runs unless
it says so. Every size knob of a policy is "0 = off".

The fetch policies (layer/policies/) and the knob that switches each:

| policy               | switch                                   | what it fetches beyond the read            |
|----------------------|------------------------------------------|--------------------------------------------|
| neighbour            | `neighbour_fetch_size` > 0               | small files stored around a file, of its directory or suffix |
| executable           | `executable_fetch_limit` > 0             | the rest of a multi-chunk executable       |
| small_layer          | `small_layer_fetch_size` > 0             | a whole small layer at its first miss      |
| sequential_readahead | `readahead_size` > 0                     | a sequentially read file's next chunks     |
| library_readahead    | `library_readahead`                      | the libraries an ELF program loads         |
| import_readahead     | `import_readahead`                       | what a Python module, JavaScript file or   |
|                      |                                          | C/C++ file imports, and theirs (not for an |
|                      |                                          | optimized image)                           |
| reads_hold_background| `background_waits_for_reads`             | nothing: reads served from the cache hold  |
|                      |                                          | background fetch back, as fetches do       |
| prefetch             | not `no_prefetch`                        | the prioritized region, at open            |
| background           | not `no_background_fetch`                | everything else, in the gaps               |
| start                | `start_fetch_limit` > 0                  | what the image config's command runs and   |
|                      |                                          | names, once all the image's layers are open|
|                      |                                          | (image-wide: start_fetch.py, not a layer's)|

`fetch_policy = "baseline"` (`baseline()`) fetches the way the Go store does instead: no
heuristics, each chunk as the 50,000-byte aligned blocks of the blob that hold it, two requests
at a time; prefetch and background fetch stay, as in the Go store.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..formats.toc import TocLimits

HEURISTICS = ("neighbour", "executable", "small_layer", "sequential_readahead", "library_readahead",
              "import_readahead", "reads_hold_background")
LAYER_POLICIES = (*HEURISTICS, "prefetch", "background")  # each made per layer by `Layer`
# "reads_overtake_prefetch" is how the prefetch claims its region (policies/prefetch.py); "start"
# works on a whole image (layer/start_fetch.py, run by the pool).
POLICIES = (*LAYER_POLICIES, "reads_overtake_prefetch", "start")
FETCH_POLICIES = ("default", "baseline")

# The Go store's fetch shape (stargz-snapshotter `[blob] chunk_size` and `max_concurrency` defaults).
BASELINE_BLOCK_SIZE = 50_000
BASELINE_CONCURRENCY = 2

# What each policy's switch is set to when `with_policies` turns it off.
_OFF: dict[str, dict[str, object]] = {
    "neighbour": {"neighbour_fetch_size": 0},
    "executable": {"executable_fetch_limit": 0},
    "small_layer": {"small_layer_fetch_size": 0},
    "sequential_readahead": {"readahead_size": 0},
    "library_readahead": {"library_readahead": False},
    "import_readahead": {"import_readahead": False},
    "reads_hold_background": {"background_waits_for_reads": False},
    "prefetch": {"no_prefetch": True},
    "background": {"no_background_fetch": True},
    "reads_overtake_prefetch": {"prefetch_piece_size": 0},
    "start": {"start_fetch_limit": 0},
}


@dataclass
class LayerConfig:
    """Sizes in bytes, times in seconds; the defaults are the production values.

    `disable_verification` is accepted for config compatibility and changes nothing: every chunk
    is hashed against its TOC digest before use (hashing costs little next to decompression, and
    the Go store at HEAD refuses to run with verification off). Entries read back from the disk
    cache are hashed again before use, see `ChunkCache`.
    """

    # ---- fetch policies (config/config.toml explains each key with its measurements) ----
    fetch_policy: str = "default"           # "baseline": fetch as the Go store does (see `baseline`)
    neighbour_fetch_size: int = 64 << 10    # a miss on a file also fetches the small files of its directory or
                                            # suffix stored within half this many compressed bytes of it (0: off)
    executable_fetch_limit: int = 64 << 20  # first miss on a multi-chunk executable fetches all its chunks, when
                                            # it is at most this many compressed bytes (0: off)
    small_layer_fetch_size: int = 2 << 20   # the first miss in a layer whose data is at most this many compressed
                                            # bytes fetches the whole layer, the wanted bytes first (0: off)
    readahead_size: int = 0                 # a sequential file read also fetches this many compressed bytes of
                                            # the file's next chunks (0: off; the kernel's readahead does it)
    library_readahead: bool = True          # the first read of an ELF program fetches the libraries it loads
    library_fetch_limit: int = 64 << 20     # ... each at most this many compressed bytes
    import_readahead: bool = True           # the first read of a Python module, JavaScript or C/C++ file fetches what
                                            # it imports at its top level, and theirs in turn (policies/imports.py)
    background_waits_for_reads: bool = True  # every read, cached or not, restarts background fetch's quiet
                                            # period (the Go store: only reads that fetch; the baseline)
    prefetch_timeout: float = 10.0          # seconds a layer open waits for its prefetch, with prefetch_wait
    prefetch_wait: bool = False             # False: a layer is ready once its TOC is verified; the prefetch
                                            # streams in and a read of a prefetched file waits for that file's
                                            # chunks only (as the Go stargz-store, where nobody waits)
    prefetch_size: int = 0                  # used when a layer has no landmark (0: no prefetch then)
    prefetch_piece_size: int = 4 << 20      # a prioritized region is claimed a piece of this many compressed bytes
                                            # at a time, one piece ahead of the request on the wire, so a read of a
                                            # chunk further on fetches it at once instead of waiting for the stream
                                            # (0: the whole region claimed at open, as the Go store; prefetch.py);
                                            # the start fetch's named files go in such pieces too (pieces.py)
    no_prefetch: bool = False
    no_background_fetch: bool = False
    start_fetch_limit: int = 64 << 20       # once every layer of an image is open, fetch the program its config
                                            # runs, its libraries and the files its command line names, up to
                                            # this many compressed bytes per image (0: off; start_fetch.py)

    # ---- fetching ----
    disable_verification: bool = False
    max_concurrency: int = 8                # parallel ranged requests per layer
    fetch_timeout: float = 30.0             # a reader gets LayerReadError after this, never hangs
    fetch_block_size: int = 0               # 0: fetch each chunk's exact extent; else the aligned blocks of this
                                            # size holding it (the baseline's Go-store shape)
    coalesce_gap: int = 64 << 10            # merge ranges closer than this into one request (the chunks in
                                            # between come along, unless fetched elsewhere)
    max_request_size: int = 16 << 20        # a coalesced request is not grown past this (parallelism)
    prefetch_request_size: int = 64 << 20   # a larger prioritized region is fetched in pieces of this
    background_batch_size: int = 1 << 20    # compressed bytes per background request (a read waits at most one batch)
    background_quiet_period: float = 1.0    # background fetch starts only after on-demand fetches (and layer
                                            # opens) have been quiet this long (Go: ~1.5 s; 1.5 measured no gain here)
    background_idle_wait: float = 0.05      # how long background fetch sleeps while reads are in flight
    background_slots: int = 2               # background batches running at once, over all layers
    backing_copy_wait: float = 5.0          # a passthrough copy of a fully cached file waits at most this long for
                                            # the fetches to go quiet, so a starting container keeps the cores
                                            # (0: copied at once; layer/backing.py)
    blob_block_size: int = 1 << 20          # granularity of the raw-blob cache (ALS `blob` file)
    blob_readahead: int = 8 << 20           # a `blob` miss also fetches this far ahead (sequential copy)

    # ---- TOC ----
    max_toc_size: int = 150 << 20           # a TOC's bytes, compressed and inflated (checked while inflating);
                                            # also the names of directories a TOC implies without listing
    max_toc_entries: int = 1_000_000        # TOC entries, implied directories included (see formats.toc.TocLimits)
    max_path_depth: int = 2048              # components of an entry name (PATH_MAX / 2)
    max_chunk_size: int = 64 << 20          # bytes one chunk inflates to (twice that compressed): a chunk is
                                            # fetched, inflated and verified whole in memory (TocLimits)
    tail_size: int = 13 << 10               # the first ranged request of the blob tail (footer + TOC guess):
                                            # what a fresh TCP connection delivers in its first round trip
                                            # (10 segments of 1448 bytes) with room for the response headers
                                            # (~500 bytes from docker-registry; 14 KiB took a second round
                                            # trip on new connections). A larger TOC costs one more request, sized
                                            # exactly; a larger guess costs slow-start round trips on every
                                            # layer open (64 KiB: ~2 more at 20 ms RTT, for 4 KB TOCs)
    keep_toc_bytes: bool = True             # keep the bytes a TOC was read from: a restart re-opens
                                            # layers without the registry (re-verified every time)

    @property
    def toc_limits(self) -> TocLimits:
        return TocLimits(
            max_entries=self.max_toc_entries, max_depth=self.max_path_depth, max_implicit_names=self.max_toc_size,
            max_chunk_size=self.max_chunk_size,
        )

    def policy_enabled(self, name: str) -> bool:
        """Whether fetch policy `name` (one of `POLICIES`) is switched on."""
        if name not in _OFF:
            raise ValueError(f"no fetch policy {name!r}; known: {', '.join(POLICIES)}")
        return all(getattr(self, key) != off for key, off in _OFF[name].items())

    def enabled_policies(self) -> tuple[str, ...]:
        return tuple(name for name in POLICIES if self.policy_enabled(name))

    def with_policies(self, *names: str, **overrides: object) -> LayerConfig:
        """A copy with only the fetch policies `names` on, at the values of this table (the
        production ones for `LayerConfig()`), the others off; then `overrides` applied."""
        unknown = set(names) - set(POLICIES)
        if unknown:
            raise ValueError(f"no fetch policy {', '.join(sorted(unknown))}; known: {', '.join(POLICIES)}")
        changes: dict[str, object] = {}
        for name in POLICIES:
            if name not in names:
                changes.update(_OFF[name])
        changes.update(overrides)
        return dataclasses.replace(self, **changes)

    def baseline(self) -> LayerConfig:
        """A copy that fetches the way the Go store does: no heuristics, every chunk as the
        50,000-byte aligned blocks of the blob holding it (kept, so a neighbour in a block
        already fetched costs no request), adjacent blocks in one request, two at a time."""
        return self.with_policies(
            *(name for name in ("prefetch", "background") if self.policy_enabled(name)),
            fetch_policy="baseline", fetch_block_size=BASELINE_BLOCK_SIZE, max_concurrency=BASELINE_CONCURRENCY,
            coalesce_gap=0,
        )
