"""What the image pool needs of its collaborators, as typed protocols.

The daemon passes the real ones (`registry.client.RegistryClient`, `layer.resolver.LayerResolver`
and the `layer.layer.Layer`s it opens); tests pass fakes that implement the same protocols
(`tests/fs/layout_source.py`), so no production code branches on what it was given.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Mapping, Protocol

if TYPE_CHECKING:
    from ..formats.layer_toc import ParsedToc
    from ..formats.toc import Toc, TocEntry
    from ..registry.client import Manifest
    from ..registry.reference import Reference

# The blob's last bytes, fetched before its size was known: (offset, blob size, bytes).
EarlyTail = Future


class RegistryAccess(Protocol):
    """Image metadata from a registry."""

    def get_manifest(self, ref: Reference, platform: str | None = None) -> Manifest:
        """The image manifest for `platform` (None: this host's), resolving an index."""

    def get_blob(self, ref: Reference, digest: str) -> bytes:
        """A small blob (the config), verified against `digest`."""

    def learn_schemes(self) -> int:
        """Find out early which configured hosts speak plain HTTP (an optimisation only)."""


class OpenLayer(Protocol):
    """An open, lazily read layer: the contract between the pool and `stargz_store.layer`."""

    parsed: ParsedToc
    toc: Toc
    blob_size: int
    blob_digest: str

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes: ...

    def read_blob(self, offset: int, size: int) -> bytes: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class LayerOpener(Protocol):
    """Opens layers: locates and verifies the TOC, starts prefetch and background fetch."""

    def open_layer(self, ref: Reference, descriptor: Mapping, *, early_tail: EarlyTail | None = None) -> OpenLayer:
        """Raises `NotLazyFormatError`/`FormatError` (not servable lazily) or `RegistryError`."""

    def fetch_tail(self, ref: Reference, digest: str) -> tuple[int, int, bytes]:
        """The first request `open_layer` would make, for a blob whose size is not known yet."""
