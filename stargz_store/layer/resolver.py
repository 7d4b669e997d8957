"""From a layer descriptor to a ready `Layer`: locate and verify the TOC, prefetch, start background fetch."""
from __future__ import annotations

import logging
import threading
import traceback
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

from .. import metrics
from ..cache.chunk_cache import ChunkCache
from ..formats.detect import read_layer_toc
from ..formats.errors import FormatError
from ..formats.layer_toc import ParsedToc
from .config import LayerConfig
from .layer import Layer
from .backing import BackingFiles
from .policies import ImportReadahead, LibraryReadahead
from .scheduler import FetchScheduler
from .sources import BlobSource
from .trees import building_trees

if TYPE_CHECKING:
    from ..registry.client import RegistryClient
    from ..registry.reference import Reference

__all__ = ["BlobSource", "LayerResolver", "RegistryBlobSource", "TailCachedReadAt"]

log = logging.getLogger(__name__)


class RegistryBlobSource:
    """A blob in a registry repository, read with ranged GETs through the shared client."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, size: int) -> None:
        self.client = client
        self.ref = ref
        self.digest = digest
        self.size = size

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        if len(ranges) == 1:
            offset, length = ranges[0]
            return [self.client.read_blob_range(self.ref, self.digest, offset, length)]
        return self.client.read_blob_ranges(self.ref, self.digest, ranges)

    def stream_range(self, offset: int, length: int, sink: Callable[[int, bytes], None]) -> None:
        self.client.read_blob_range(self.ref, self.digest, offset, length, sink=sink)

    @property
    def streams_whole_blob(self) -> bool:
        """Background fetch reads this blob with `stream_blob` (one plain GET, a mirror first)
        rather than in ranged batches: when a mirror is configured for its registry. A
        pull-through mirror answers ranges of a blob it has not cached with the whole body, one
        origin copy per request; one GET per blob, after the mirror's own fill, costs the origin
        nothing more."""
        return self.client.has_mirror(self.ref)

    def stream_blob(self, offset: int, sink: Callable[[int, bytes], None]) -> int:
        """The blob from `offset` to its end into `sink`, in order (see `RegistryClient.stream_blob`)."""
        return self.client.stream_blob(self.ref, self.digest, sink, offset=offset,
                                       wait_for_mirror=self.client.config.background_mirror_wait)

    def __repr__(self) -> str:
        return f"RegistryBlobSource({self.ref.registry}/{self.ref.repository}@{self.digest})"


# An early tail is a fetch of the blob's last bytes started before its size was known:
# (offset, blob size, bytes) when done. Waited for at most this long before fetching anew.
EarlyTail = Future
EARLY_TAIL_WAIT = 10.0


class KeptRanges(Protocol):
    """Where the bytes a TOC was read from are kept between opens (`ChunkCache`'s direct path)."""

    def kept_range(self, blob_digest: str, offset: int, length: int) -> bytes | None: ...

    def keep_range(self, blob_digest: str, offset: int, data: bytes) -> None: ...

    def forget_range(self, blob_digest: str, offset: int, length: int) -> None: ...


class TailCachedReadAt:
    """The `read_at` handed to the format readers: the blob's last `tail_size` bytes are fetched
    once, on first use, and serve every read inside them (whichever format is tried); anything
    else (the head of a TOC larger than the window, an annotated TOC position) is one more
    ranged request.

    With a `store`, every range is first looked up there (bytes kept from an earlier open of the
    same blob), and `persist()` keeps what was fetched once the TOC has been verified. Kept bytes
    are authenticated again by the TOC digest on every open, like fetched ones.
    """

    def __init__(
        self,
        source: BlobSource,
        blob_size: int,
        tail_size: int,
        *,
        store: KeptRanges | None = None,
        blob_digest: str | None = None,
        reuse: bool = True,
        early_tail: EarlyTail | None = None,
    ) -> None:
        self.source = source
        self.early_tail = early_tail
        self.early_used = False
        self.reuse = reuse
        self.blob_size = blob_size
        self.window_start = blob_size - min(blob_size, max(tail_size, 0))
        self.store = store if blob_digest else None
        self.blob_digest = blob_digest or ""
        self._tail: bytes | None = None
        self._lock = threading.Lock()
        self.requests = 0
        self.fetched: list[tuple[int, bytes]] = []
        self.reused: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        if offset >= self.window_start and offset + length <= self.blob_size and length >= 0:
            with self._lock:
                if self._tail is None:
                    self._tail = self._early() or self._get(self.window_start, self.blob_size - self.window_start)
            rel = offset - self.window_start
            return self._tail[rel : rel + length]
        with self._lock:
            return self._get(offset, length)

    def _early(self) -> bytes | None:
        """The tail fetched before the manifest told us the blob's size, if it is exactly our
        window (then it counts as fetched: verified with the TOC, kept by `persist`)."""
        early, self.early_tail = self.early_tail, None
        if early is None:
            return None
        try:
            offset, total, data = early.result(timeout=EARLY_TAIL_WAIT)
        except Exception as e:  # a guess that did not work out: fetch as usual
            log.debug("early tail of %s not used: %s", self.blob_digest or self.source, e)
            return None
        if offset != self.window_start or total != self.blob_size or offset + len(data) != total:
            log.debug("early tail of %s not used: bytes [%d, %d) of %d", self.blob_digest, offset, offset + len(data), total)
            return None
        self.fetched.append((offset, data))
        self.early_used = True
        return data

    def _get(self, offset: int, length: int) -> bytes:
        if self.store is not None and self.reuse:
            kept = self.store.kept_range(self.blob_digest, offset, length)
            if kept is not None:
                self.reused.append((offset, length))
                return kept
        self.requests += 1
        with metrics.FetchTimer("toc") as timer:
            (data,) = self.source.read_ranges([(offset, length)])
            timer.received(len(data))
        self.fetched.append((offset, data))
        return data

    def persist(self) -> None:
        """Keep the fetched ranges (call only after the TOC they hold has been verified)."""
        if self.store is None:
            return
        for offset, data in self.fetched:
            try:
                self.store.keep_range(self.blob_digest, offset, data)
            except OSError as e:
                log.warning("cannot keep TOC bytes of %s: %s", self.blob_digest, e)

    def forget_reused(self) -> None:
        """Drop kept ranges that were used (they did not make a valid TOC)."""
        if self.store is not None:
            for offset, length in self.reused:
                self.store.forget_range(self.blob_digest, offset, length)


class LayerResolver:
    """Opens layers for the daemon. One per daemon; thread-safe (layers of an image are opened
    in parallel). Its layers share one `FetchScheduler` (background fetch waits for every
    layer's reads), one library readahead worker (`library_worker`; None: the process's) and one
    import readahead worker (`import_worker`, likewise)."""

    def __init__(
        self, client: RegistryClient | None, cache: ChunkCache, config: LayerConfig | None = None,
        *, library_worker: LibraryReadahead | None = None, import_worker: ImportReadahead | None = None,
        backing: BackingFiles | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.backing = backing  # backing files for passthrough (None: none are made)
        self.config = config or LayerConfig()
        self.library_worker = library_worker
        self.import_worker = import_worker
        self.scheduler = FetchScheduler(
            background_slots=self.config.background_slots,
            quiet_period=self.config.background_quiet_period,
        )
        if backing is not None:  # its copies wait for these layers' fetches to go quiet
            backing.defer_to(self.scheduler, self.config.backing_copy_wait)

    def open_layer(
        self, ref: Reference, descriptor: Mapping, *, key_digest: str | None = None, early_tail: EarlyTail | None = None
    ) -> Layer:
        """Raises NotLazyFormatError / FormatError (not servable lazily) or RegistryError.
        `early_tail`: the blob's tail, asked for before the manifest arrived (`ImagePool`)."""
        if self.client is None:
            raise RuntimeError("LayerResolver has no registry client")
        source = RegistryBlobSource(self.client, ref, descriptor["digest"], int(descriptor["size"]))
        return self.open_layer_from_source(source, descriptor, key_digest=key_digest, early_tail=early_tail)

    def fetch_tail(self, ref: Reference, digest: str) -> tuple[int, int, bytes]:
        """The first request `open_layer` would make, for a blob whose size is not known yet."""
        if self.client is None:
            raise RuntimeError("LayerResolver has no registry client")
        with metrics.FetchTimer("toc", guess=True) as timer:
            tail = self.client.read_blob_tail(ref, digest, self.config.tail_size)
            timer.received(len(tail[2]))
        return tail

    def open_layer_from_source(
        self, source: BlobSource, descriptor: Mapping, *, key_digest: str | None = None,
        early_tail: EarlyTail | None = None,
    ) -> Layer:
        try:
            parsed = self._read_toc(source, descriptor, key_digest, early_tail)
        except BaseException as e:
            release_frames(e)
            raise
        layer = Layer(source, parsed, descriptor, self.cache, self.config, scheduler=self.scheduler,
                      library_worker=self.library_worker,
                      import_worker=self.import_worker, backing=self.backing)
        layer.start()  # prefetch, background fetch: as the config says
        return layer

    def _read_toc(
        self, source: BlobSource, descriptor: Mapping, key_digest: str | None, early_tail: EarlyTail | None
    ) -> ParsedToc:
        """The verified TOC, its bytes kept for the next open. Everything it reads and builds
        (up to the caps: the TOC's bytes, its JSON, the decoded records) lives in this frame
        and the format readers' below it, which `release_frames` empties when it fails."""
        cfg = self.config
        size = int(descriptor.get("size") or source.size)
        digest = descriptor.get("digest")
        store = self.cache if cfg.keep_toc_bytes and isinstance(digest, str) else None
        limits = cfg.toc_limits

        def parse(read_at: TailCachedReadAt) -> ParsedToc:
            return read_layer_toc(
                read_at, size, descriptor, key_digest=key_digest, max_toc_size=cfg.max_toc_size,
                tail_size=cfg.tail_size, limits=limits,
            )

        read_at = TailCachedReadAt(source, size, cfg.tail_size, store=store, blob_digest=digest, early_tail=early_tail)
        try:
            with building_trees():
                parsed = parse(read_at)
        except FormatError as e:
            if not (read_at.reused or read_at.early_used):
                raise
            release_frames(e)
            # Kept bytes that no longer verify (a damaged cache), or an early tail that did not make
            # a TOC (a mirror's other blob): drop them, ask the source.
            log.warning("layer %s: %s TOC bytes did not verify; fetching them again", digest,
                        "kept" if read_at.reused else "early")
            read_at.forget_reused()
            read_at = TailCachedReadAt(source, size, cfg.tail_size, store=store, blob_digest=digest, reuse=False)
            with building_trees():
                parsed = parse(read_at)
        read_at.persist()
        log.debug(
            "layer %s: %s TOC %s, %d entries, %d request(s), %d kept range(s) reused",
            digest, parsed.format, parsed.toc_digest, len(parsed.toc), read_at.requests, len(read_at.reused),
        )
        return parsed


def release_frames(error: BaseException) -> None:
    """Empty the finished frames `error` (and the errors it chains) passed through.

    A refused TOC raises from deep in a reader whose locals hold what it had read and built so
    far: the compressed TOC, its inflated JSON, decoded records, up to the caps (hundreds of MB).
    The error outlives the open (a future's result, a negative-cache entry, a traceback cycle
    the pool's `except` makes), and its traceback would keep all of that resident after every
    refused lookup. The frames still running (this one's caller and up) are left alone.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        pending += (e.__cause__, e.__context__)
