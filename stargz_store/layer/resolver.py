"""From a layer descriptor to a ready `Layer`: locate and verify the TOC, prefetch, start background fetch."""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Mapping, Protocol

from ..cache.chunk_cache import ChunkCache
from ..formats.detect import read_layer_toc
from .config import LayerConfig
from .layer import Layer

if TYPE_CHECKING:
    from ..registry.client import RegistryClient
    from ..registry.reference import Reference

log = logging.getLogger(__name__)


class BlobSource(Protocol):
    """What a Layer reads from. `read_ranges` returns exactly the bytes of each (offset, length)
    or raises; it may take as long as its own timeouts allow (the Layer bounds the wait)."""

    size: int

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]: ...


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

    def __repr__(self) -> str:
        return f"RegistryBlobSource({self.ref.registry}/{self.ref.repository}@{self.digest})"


class TailCachedReadAt:
    """The `read_at` handed to the format readers: the blob's last `tail_size` bytes are fetched
    once, on first use, and serve every read inside them (whichever format is tried); anything
    else (the head of a TOC larger than the window) is one more ranged request."""

    def __init__(self, source: BlobSource, blob_size: int, tail_size: int) -> None:
        self.source = source
        self.blob_size = blob_size
        self.window_start = blob_size - min(blob_size, max(tail_size, 0))
        self._tail: bytes | None = None
        self._lock = threading.Lock()
        self.requests = 0

    def __call__(self, offset: int, length: int) -> bytes:
        if offset >= self.window_start and offset + length <= self.blob_size and length >= 0:
            with self._lock:
                if self._tail is None:
                    self.requests += 1
                    (self._tail,) = self.source.read_ranges([(self.window_start, self.blob_size - self.window_start)])
            rel = offset - self.window_start
            return self._tail[rel : rel + length]
        with self._lock:
            self.requests += 1
        (data,) = self.source.read_ranges([(offset, length)])
        return data


class LayerResolver:
    """Opens layers for the daemon. One per daemon; thread-safe (layers of an image are opened
    in parallel)."""

    def __init__(self, client: RegistryClient | None, cache: ChunkCache, config: LayerConfig | None = None) -> None:
        self.client = client
        self.cache = cache
        self.config = config or LayerConfig()

    def open_layer(self, ref: Reference, descriptor: Mapping, *, key_digest: str | None = None) -> Layer:
        """Raises NotLazyFormatError / FormatError (not servable lazily) or RegistryError."""
        if self.client is None:
            raise RuntimeError("LayerResolver has no registry client")
        source = RegistryBlobSource(self.client, ref, descriptor["digest"], int(descriptor["size"]))
        return self.open_layer_from_source(source, descriptor, key_digest=key_digest)

    def open_layer_from_source(
        self, source: BlobSource, descriptor: Mapping, *, key_digest: str | None = None
    ) -> Layer:
        cfg = self.config
        size = int(descriptor.get("size") or source.size)
        read_at = TailCachedReadAt(source, size, cfg.tail_size)
        parsed = read_layer_toc(
            read_at, size, descriptor, key_digest=key_digest, max_toc_size=cfg.max_toc_size, tail_size=cfg.tail_size
        )
        log.debug(
            "layer %s: %s TOC %s, %d entries, %d request(s)",
            descriptor.get("digest"), parsed.format, parsed.toc_digest, len(parsed.toc), read_at.requests,
        )
        layer = Layer(source, parsed, descriptor, self.cache, cfg)
        if not cfg.no_prefetch:
            layer.prefetch(cfg.prefetch_timeout)
        if not cfg.no_background_fetch:
            layer.start_background_fetch()
        return layer
