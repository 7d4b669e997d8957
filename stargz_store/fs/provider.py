"""What the filesystem needs from the rest of the store: resolved layers and the image pool.

The filesystem model never talks to a registry or opens a layer itself; it asks a
`LayerProvider` (the daemon's `ImagePool`, or a test's fake implementing the same protocol).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping, Protocol

from ..formats.toc import TocEntry
from .errors import EntryNotFound
from .inodes import VIEW_BIT
from .layer_tree import LayerTree


class LayerData(Protocol):
    """What the model reads from an open layer (`stargz_store.layer.layer.Layer`)."""

    blob_size: int

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes: ...

    def read_blob(self, offset: int, size: int) -> bytes: ...


class ServedLayer:
    """An open layer as the filesystem serves it: its data, its overlay tree (inode numbers
    based on its layer `number`), and the `info` JSON of each key it is known by.

    `infos` may be any mapping (the pool passes one that builds the JSON on first use: its
    uid/gid sets take a pass over the whole TOC); a plain dict is copied.
    """

    def __init__(
        self,
        layer: LayerData,
        tree: LayerTree,
        infos: Mapping[str, bytes],
        *,
        ref: str = "",
        number: int = 0,
        blob_digest: str = "",
        toc_digest: str = "",
    ) -> None:
        self.layer = layer
        self.tree = tree
        self.infos: Mapping[str, bytes] = dict(infos) if isinstance(infos, dict) else infos
        self.ref = ref
        self.number = number
        self.blob_digest = blob_digest
        self.toc_digest = toc_digest
        self._first_reads: set[int] = set()
        self._lock = threading.Lock()

    def info_for(self, key: str) -> bytes:
        info = self.infos.get(key)
        if info is None:
            raise EntryNotFound(f"no info for key {key}")
        return info

    def view_of(self, key: str) -> int:
        """The node-id bit of the tree shown under `key` (`fs.inodes`): 0 under the blob digest."""
        return 0 if key == self.blob_digest else VIEW_BIT

    def key_of(self, view: int) -> str:
        return self.toc_digest if view else self.blob_digest

    def first_read(self, entry_ino: int) -> bool:
        """True the first time it is asked about `entry_ino` (`log_file_access`)."""
        with self._lock:
            if entry_ino in self._first_reads:
                return False
            self._first_reads.add(entry_ino)
            return True


@dataclass(frozen=True)
class ImageFiles:
    """The human-readable files of a ref directory and the layer keys it knows."""

    manifest: bytes
    config: bytes
    layer_keys: tuple[str, ...] = ()


class LayerProvider(Protocol):
    """The image pool, seen from the filesystem. Blocking calls are bounded by the pool's
    timeout; failures are `fs.errors` types."""

    def canonical_ref(self, text: str) -> str:
        """Validate a decoded reference string; returns the cache key. Raises `InvalidName`.
        Records nothing: any caller's name goes through it."""

    def resolved(self, ref: str, key: str = "") -> bool:
        """Whether the image is resolved now (and, with `key`, lists that layer key): answering
        about it needs no new registry metadata. What a non-root caller may look at."""

    def image_files(self, ref: str) -> ImageFiles:
        """Resolve the image (blocking). Raises `EntryNotFound` / `LayerUnavailable`."""

    def layer(self, ref: str, key: str) -> ServedLayer:
        """Resolve one layer by blob or TOC digest (blocking). Raises `EntryNotFound` / `LayerUnavailable`."""

    def numbered(self, number: int) -> ServedLayer:
        """The layer with this number, reopened if it was closed. Raises `StaleNode` for a
        number the pool does not know (any more)."""

    def hold(self, number: int) -> ServedLayer:
        """`numbered`, and the layer stays open until `let_go`: a read is under way."""

    def let_go(self, served: ServedLayer) -> None: ...

    def pin(self, ref: str, key: str) -> None:
        """The kernel holds the layer directory `ref`/`key`: its layer stays open meanwhile."""

    def unpin(self, ref: str, key: str) -> None: ...

    def use(self, ref: str, key: str) -> None:
        """containers/storage's `use` notification: the layer stays open until released."""

    def release(self, ref: str, key: str) -> bool:
        """The `rmdir` notification. True when no notification holds the layer any more."""

    def known_refs(self) -> list[str]: ...
