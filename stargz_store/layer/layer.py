"""A lazily fetched layer: its verified chunk reader, its fetch policies, its raw blob.

`Layer` is what fs/ and daemon/ hold: it maps a file read to the chunks holding it, gets them
from the `ChunkReader` (cache, single flight, verification, bounded waits: reader.py) and gives
each enabled fetch policy (policies/, switched by `LayerConfig`) its hooks around the read. It
adds no fetch rule of its own.

Public surface used by fs/daemon (the contract in ARCH12.md): `parsed`, `toc`, `blob_size`,
`blob_digest`, `read`, `read_blob`, `stats`, `close`, `fetched_bytes`, `wait_background`,
`background_state`, and `attach_image` (the image's other layers, for library readahead).
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

from ..cache.backing_files import BackingFile
from ..cache.chunk_cache import ChunkCache
from ..formats.layer_toc import ParsedToc
from ..formats.toc import REG, Chunk, TocEntry
from .backing import BackingFiles
from .blob_file import BlobFile
from .blob_index import stored_size
from .config import HEURISTICS, LayerConfig
from .errors import LayerReadError
from .fetcher import FETCH_COUNTERS, Counters
from .pieces import fetch_pieces_in_turn, split_into_pieces
from .policies import POLICY_CLASSES, BackgroundFetch, FetchPolicy, ImportReadahead, LibraryReadahead, Prefetch
from .reader import ChunkReader, FetchPlan
from .scheduler import FetchScheduler
from .sources import BlobSource

__all__ = ["Layer", "LayerReadError"]

_SPANS_TRACKED = 256  # files whose chunk start offsets are kept, for a bisect per read

# What the counters of `stats()` are (besides FETCH_COUNTERS, see fetcher.py).
LAYER_COUNTERS = (
    "chunks_fetched", "cache_hits", "cache_misses", "gap_chunks", "prefetch_bytes", "neighbour_chunks",
    "executable_chunks", "small_layer_chunks", "readahead_chunks", "ahead_chunks", "programs_read",
    "reads_holding_background", "blob_cache_hits", "cache_write_errors", "start_chunks",
    "prefetch_pieces", "modules_read", "import_chunks",
)


class Layer:
    """One layer blob served lazily. Created by `LayerResolver`; thread-safe.

    `stats()` counts what came from the source (`fetched_bytes`, `requests` = ranges asked for,
    `fetch_calls` = `read_ranges` calls), what the cache answered (`cache_hits`), and what each
    policy added (`neighbour_chunks`, `executable_chunks`, `small_layer_chunks`,
    `readahead_chunks`, `ahead_chunks` (library readahead), `prefetch_bytes`, `background_bytes`;
    `gap_chunks`: chunks that came along because a request spanned them anyway).
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
        library_worker: LibraryReadahead | None = None,
        import_worker: ImportReadahead | None = None,
        backing: BackingFiles | None = None,
    ) -> None:
        self.source = source
        self.backing = backing
        self.parsed = parsed
        self.toc = parsed.toc
        self.descriptor = dict(descriptor)
        self.blob_digest: str = self.descriptor["digest"]
        self.blob_size: int = int(self.descriptor.get("size") or source.size)
        self.cache = cache
        self.config = config or LayerConfig()
        self.scheduler = scheduler or FetchScheduler()
        self.library_worker = library_worker
        self.import_worker = import_worker
        self.counters = Counters(*FETCH_COUNTERS, *LAYER_COUNTERS)
        self.reader = ChunkReader(source, parsed, self.blob_digest, self.blob_size, cache, self.config,
                                  self.scheduler, self.counters)
        self._blob = BlobFile(self.reader.fetcher, cache, self.blob_digest, self.blob_size, self.config, self.counters)
        self._image: Callable[[], Sequence[Layer]] | None = None
        self._chunk_starts: OrderedDict[int, list[int]] = OrderedDict()  # ino -> chunk file offsets
        self._spans_lock = threading.Lock()
        # Prefetch and background fetch always exist (a caller may start them by hand); the
        # config decides whether opening the layer starts them.
        self._prefetch = Prefetch(self)
        self._background = BackgroundFetch(self)
        self.policies: list[FetchPolicy] = [
            POLICY_CLASSES[name](self) for name in HEURISTICS if self.config.policy_enabled(name)
        ]
        on_open = [p for p, name in ((self._prefetch, "prefetch"), (self._background, "background"))
                   if self.config.policy_enabled(name)]
        every = [*self.policies, self._prefetch, self._background]
        self._on_open = on_open
        self._on_miss = [p.on_miss for p in self.policies if p.hooks("on_miss")]
        self._on_read = [p.on_read for p in self.policies if p.hooks("on_read")]
        self._on_data = [p.on_data for p in self.policies if p.hooks("on_data")]
        self._on_close = [p.close for p in every if p.hooks("close")]

    def start(self) -> None:
        """The layer was just opened: run the policies that start then (prefetch, background)."""
        for policy in self._on_open:
            policy.on_open()

    def attach_image(self, view: Callable[[], Sequence[Layer]]) -> None:
        """`view()` returns the open layers of this layer's image, topmost first: the merged view
        library readahead resolves a program's libraries in. Called once by the daemon after
        opening the layer; without it, libraries are looked for in this layer only."""
        self._image = view

    def image_layers(self) -> Sequence[Layer]:
        view = self._image
        return view() if view is not None else [self]

    # ---- file data ---------------------------------------------------------------------------

    def read(self, entry: TocEntry, offset: int, size: int, *, keep_in_memory: bool = True) -> bytes:
        """Bytes `[offset, offset+size)` of regular file `entry`, clipped to its size.
        `keep_in_memory=False`: chunks read from the disk cache stay out of the memory LRU (a
        policy's look at a file, not a reader's)."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset {offset} or size {size}")
        if entry.type != REG:
            return b""
        first, last = self._chunk_span(entry, offset, size)
        if first > last:
            return b""
        chunks = entry.chunks[first : last + 1]
        reader = self.reader
        reader.check_open()
        deadline = reader.deadline()
        data, missing = reader.lookup(chunks, keep_in_memory=keep_in_memory)
        waits = {}
        if missing:
            plan = FetchPlan(reader)
            mine, theirs = plan.want(missing)
            if mine:
                for on_miss in self._on_miss:
                    on_miss(entry, missing, plan)
                reader.dispatch(plan)
            waits = {**mine, **theirs}
        for on_read in self._on_read:
            on_read(entry, offset, size, last)
        if waits:
            data.update(reader.wait(waits, deadline))
        end = min(entry.size, offset + size)
        parts: list[bytes | memoryview] = []
        for c in chunks:
            d = data[c.digest]
            lo = max(offset, c.file_offset) - c.file_offset
            hi = min(end, c.file_offset + c.size) - c.file_offset
            parts.append(d if (lo == 0 and hi == len(d)) else memoryview(d)[lo:hi])
        result = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        for on_data in self._on_data:
            on_data(entry, offset, result)
        return result

    def fetch_ahead(self, entry: TocEntry, counter: str = "ahead_chunks") -> bool:
        """Start fetching the uncached chunks of file `entry` (at most `library_fetch_limit`
        compressed bytes) without waiting: a guess that it is read soon (library readahead and
        the start fetch ask this of the layer that holds a file). `counter` counts the chunks
        started. True if anything started."""
        return bool(self.fetch_files_ahead([entry], counter))

    def fetch_files_ahead(self, entries: Sequence[TocEntry], counter: str, *, gap: int | None = None,
                          batches: int | None = None) -> list[TocEntry]:
        """`fetch_ahead` for several files in one plan: files stored at most `gap` compressed
        bytes apart (default `coalesce_gap`) share a request, sent as at most `batches`
        `read_ranges` calls (default `max_concurrency`). The files anything was started for."""
        if self.reader.closed.is_set():
            return []
        plan = FetchPlan(self.reader)
        started = [e for e in entries if plan.add(self._chunks_ahead(e), counter)]
        if started:
            self.reader.dispatch(plan, gap=gap, batches=batches)
        return started

    def _chunks_ahead(self, entry: TocEntry) -> list[Chunk]:
        """What fetching `entry` ahead brings: the uncached chunks of a regular file of at most
        `library_fetch_limit` compressed bytes, else none."""
        if entry.type != REG or stored_size(entry) > max(self.config.library_fetch_limit, 0):
            return []
        return self.reader.uncached(entry.chunks)

    def fetch_files_in_turn(self, entries: Sequence[TocEntry], counter: str) -> list[TocEntry]:
        """Start fetching the uncached chunks of `entries` (each at most `library_fetch_limit`
        compressed bytes) in the order given, one piece after another (pieces.py), without
        waiting: files a container is known to read in this order (the start fetch's files named
        on its command line) come at the link's full rate, the first first, and reads overtake.
        `counter` counts the chunks. Without pieces (`prefetch_piece_size` 0, the baseline) as
        `fetch_files_ahead`. The files anything was started for."""
        size = self.config.prefetch_piece_size
        if size <= 0:
            return self.fetch_files_ahead(entries, counter)
        if self.reader.closed.is_set():
            return []
        started, chunks = [], []
        for e in entries:
            missing = self._chunks_ahead(e)
            if missing:
                started.append(e)
                chunks += missing
        if chunks:
            self.counters.add(counter, len(chunks))
            fetch_pieces_in_turn(self.reader, self.counters, split_into_pieces(chunks, size, keep_order=True),
                                 size=size, kind="on_demand", what=f"{len(started)} file(s) fetched in turn")
        return started

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
            with self._spans_lock:
                self._chunk_starts[entry.ino] = starts
                while len(self._chunk_starts) > _SPANS_TRACKED:
                    self._chunk_starts.popitem(last=False)
        return bisect.bisect_right(starts, offset) - 1, bisect.bisect_right(starts, end - 1) - 1

    # ---- backing files (passthrough) -------------------------------------------------------

    def backing_file(self, entry: TocEntry) -> BackingFile | None:
        """The backing file of regular file `entry` (every byte cached and verified), if made."""
        return self.backing.lookup(entry) if self.backing is not None else None

    def open_backing(self, backing: BackingFile, entry: TocEntry) -> int | None:
        """A checked read-only descriptor of `backing` (caller closes it); None when it was
        damaged or is gone (then it is made again from verified chunks)."""
        if self.backing is None:
            return None
        fd = self.backing.open(backing)
        if fd is None:
            self.backing.offer(entry)
        return fd

    def offer_backing(self, entry: TocEntry) -> None:
        """`entry` was opened without a backing file: one is made if all of it is cached."""
        if self.backing is not None:
            self.backing.offer(entry)

    # ---- raw blob ----------------------------------------------------------------------------

    def read_blob(self, offset: int, size: int) -> bytes:
        """Raw compressed bytes `[offset, offset+size)` of the blob (the ALS `blob` file)."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset {offset} or size {size}")
        if offset >= self.blob_size or size == 0:
            return b""
        self.reader.check_open()
        return self._blob.read(offset, size, self.reader.deadline())

    # ---- prefetch and background fetch -----------------------------------------------------

    def prefetch_limit(self) -> int:
        return self._prefetch.limit()

    def prefetch(self, timeout: float | None) -> None:
        """The prioritized region, waiting at most `timeout` seconds (None: not at all)."""
        self._prefetch.run(timeout)

    def start_background_fetch(self) -> None:
        self._background.start()

    def wait_background(self, timeout: float | None = None) -> bool:
        """True once the background fetch has ended (complete, failed or stopped)."""
        return self._background.wait(timeout)

    @property
    def background_state(self) -> str:
        """"not started", "running", "done", "failed" or "stopped"."""
        return self._background.state

    # ---- bookkeeping -----------------------------------------------------------------------

    def fetched_bytes(self) -> int:
        return self.counters.get("fetched_bytes")

    def stats(self) -> dict:
        out: dict = self.counters.snapshot()
        out["background_state"] = self.background_state
        out["in_flight"] = len(self.reader.fetcher.flights)
        return out

    def chunk_sizes(self) -> dict[str, int]:
        """Every chunk of this layer's files the cache may hold (digest -> bytes; holes, which
        are made locally, left out): what the cache janitor must keep while the layer is in use."""
        out: dict[str, int] = {}
        for entry in self.toc.files_in_blob_order():
            for c in entry.chunks:
                if not c.zeros:
                    out[c.digest] = c.size
        return out

    def local_share(self) -> tuple[int, int]:
        """(bytes of its chunks on disk or in memory, bytes of all its chunks), uncompressed: how
        much of the layer can be read without the registry. A stat per chunk: for `status`, not
        for a hot path."""
        total = local = 0
        for digest, size in self.chunk_sizes().items():
            total += size
            if self.cache.contains(digest):
                local += size
        return local, total

    def drain(self, timeout: float) -> bool:
        """Wait until no on-demand or prefetch fetch is running (their cache writes included);
        True if that happened within `timeout` seconds."""
        return self.reader.fetcher.drain(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop background work and fail pending waits; the on-disk cache stays.

        Fetches already running get up to `timeout` seconds to finish writing what they fetched
        to the cache (a stalled network fetch is not waited for beyond that).
        """
        if self.reader.closed.is_set():
            return
        self.drain(timeout)
        self.reader.close()
        for close in self._on_close:
            close()
        close_source = getattr(self.source, "close", None)
        if callable(close_source):
            close_source()

    def __enter__(self) -> Layer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
