"""The pool's two collaborators backed by local OCI image layouts instead of a registry.

`LayoutClient` answers `get_manifest`/`get_blob` from tests/data layouts (counting calls, so tests
can see what reached the "registry"), and `LayoutResolver` opens layers with the real
`LayerResolver` over `FileBlobSource`. The pool, the layer and the model under test are the real
ones; only the network is left out.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Mapping

from stargz_store.cache.chunk_cache import ChunkCache
from stargz_store.layer.config import LayerConfig
from stargz_store.layer.resolver import LayerResolver
from stargz_store.layer.sources import FileBlobSource
from stargz_store.registry.client import Manifest
from stargz_store.registry.errors import NotFoundError
from stargz_store.registry.reference import Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def blob_file(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


class LayoutClient:
    """`repository` -> OCI layout directory; the tag selects `org.opencontainers.image.ref.name`."""

    def __init__(self, layouts: Mapping[str, Path]) -> None:
        self.layouts = dict(layouts)
        self.manifest_calls = 0
        self.blob_calls = 0
        self._lock = threading.Lock()

    def _layout(self, ref: Reference) -> Path:
        layout = self.layouts.get(ref.repository)
        if layout is None:
            raise NotFoundError(f"repository {ref.repository} not found")
        return layout

    def get_manifest(self, ref: Reference, platform: str | None = None) -> Manifest:
        with self._lock:
            self.manifest_calls += 1
        layout = self._layout(ref)
        index = json.loads((layout / "index.json").read_text())
        for desc in index["manifests"]:
            if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref.tag:
                raw = blob_file(layout, desc["digest"]).read_bytes()
                return Manifest.from_raw(raw, desc.get("mediaType", OCI_MANIFEST), desc["digest"])
        raise NotFoundError(f"{ref}: manifest unknown")

    def learn_schemes(self) -> int:
        """Nothing to learn: there is no network (`RegistryAccess`)."""
        return 0

    def get_blob(self, ref: Reference, digest: str) -> bytes:
        with self._lock:
            self.blob_calls += 1
        path = blob_file(self._layout(ref), digest)
        if not path.exists():
            raise NotFoundError(f"{ref}: blob {digest} unknown")
        return path.read_bytes()


class LayoutResolver:
    """`open_layer` of the real resolver, reading the blob from the layout file."""

    def __init__(self, client: LayoutClient, cache_dir: Path, config: LayerConfig | None = None) -> None:
        self.client = client
        self.inner = LayerResolver(None, ChunkCache(cache_dir), config or LayerConfig(no_background_fetch=True))
        self.opened = 0
        self.sources: list[FileBlobSource] = []
        self.tails_fetched: list[str] = []

    def open_layer(self, ref: Reference, descriptor: Mapping, *, key_digest: str | None = None, early_tail=None):
        source = FileBlobSource(blob_file(self.client._layout(ref), descriptor["digest"]))
        self.sources.append(source)
        self.opened += 1
        return self.inner.open_layer_from_source(source, descriptor, key_digest=key_digest, early_tail=early_tail)

    def fetch_tail(self, ref: Reference, digest: str) -> tuple[int, int, bytes]:
        """What `RegistryClient.read_blob_tail` answers, from the layout file (NotFoundError for a
        digest that names no blob, as a registry does)."""
        self.tails_fetched.append(digest)
        path = blob_file(self.client._layout(ref), digest)
        if not path.exists():
            raise NotFoundError(f"{ref}: blob {digest} unknown")
        data = path.read_bytes()
        start = max(0, len(data) - self.inner.config.tail_size)
        return start, len(data), data[start:]
