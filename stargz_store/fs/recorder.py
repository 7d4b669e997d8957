"""Which files a workload reads first, per layer, in order: the raw material of an optimized image.

The filesystem model tells the recorder about the first read of each regular file (and the first
`readlink` of each symlink: loaders resolve `libfoo.so.1` links before they read their targets) of
each layer's `diff` tree. The recorder keeps, in arrival order and once per layer entry:

    (monotonic time, layer blob digest, path inside the layer, kind, size)

and `stargz-store record REF` (through the control socket, `daemon.control_ops`) turns what was
read from the image's layers into the nerdctl/ctr-remote record format (`estargz.md` §8.4).

Which reads are recorded: a layer is recorded once a recorded image looked up its `diff` (the
kernel names a layer's files by layer, not by image, so a layer shared by two images is recorded
for both once either of them is wanted), or every layer with `"*"`. Images come from
`[record] images` in the config or `record-start` on the control socket at run time.

What must hold:
- recording off costs the read path one attribute test (`active`), nothing else;
- entries are never recorded twice for one layer entry, even when the layer is closed and
  reopened (the idle LRU), so the record's order is the order of *first* reads;
- memory is bounded (`max_entries`): past it, recording stops and says so once.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)

ALL_IMAGES = "*"
DEFAULT_MAX_ENTRIES = 1_000_000
KIND_FILE = "reg"
KIND_SYMLINK = "symlink"


@dataclass(frozen=True)
class FirstRead:
    """One recorded first read: when (monotonic seconds), which layer, which path inside it."""

    at: float
    layer: str
    path: str
    kind: str = KIND_FILE
    size: int = 0


class AccessRecorder:
    """First reads of the recorded images' layers. Thread-safe; `active` is read without the lock."""

    def __init__(self, images: Iterable[str] = (), *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._images: set[str] = set()
        self._layers: set[str] = set()
        self._started: dict[str, float] = {}
        self._events: list[FirstRead] = []
        self._seen: set[tuple[str, int]] = set()
        self._full_warned = False
        self.active = False
        for image in images:
            self.start(image)

    # -- what is recorded ---------------------------------------------------------------------

    def start(self, image: str) -> None:
        """Record `image` (a canonical reference) from now on, or every image with `"*"`."""
        with self._lock:
            self._images.add(image)
            self.active = True

    def stop(self, image: str) -> bool:
        """Stop recording `image` (`"*"`: everything). What was recorded stays. False if it was not recorded."""
        with self._lock:
            if image == ALL_IMAGES:
                known = bool(self._images)
                self._images.clear()
                self._layers.clear()
            else:
                known = image in self._images
                self._images.discard(image)
                if not self._images:
                    self._layers.clear()
            self.active = bool(self._images)
            return known

    def recording(self, image: str) -> bool:
        with self._lock:
            return image in self._images or ALL_IMAGES in self._images

    def images(self) -> list[str]:
        with self._lock:
            return sorted(self._images)

    def layer_opened(self, image: str, layer: str) -> None:
        """The kernel looked up `diff` of `layer` (a blob digest) under `image`: if `image` is
        recorded, so are that layer's reads from now on; the image's clock starts at its first such lookup."""
        if not self.active:
            return
        with self._lock:
            if image in self._images or ALL_IMAGES in self._images:
                self._layers.add(layer)
                self._started.setdefault(image, time.monotonic())

    def add_layers(self, image: str, layers: Iterable[str]) -> None:
        """`layer_opened` for layers the kernel may have looked up before `image` was recorded."""
        with self._lock:
            if image in self._images or ALL_IMAGES in self._images:
                self._layers.update(layers)
                self._started.setdefault(image, time.monotonic())

    # -- the read path ------------------------------------------------------------------------

    def first_read(self, layer: str, ino: int, path: str, *, kind: str = KIND_FILE, size: int = 0) -> None:
        """A read of entry `ino` (`path`) of `layer`; kept if the layer is recorded and it is the first."""
        key = (layer, ino)
        with self._lock:
            if key in self._seen or not (layer in self._layers or ALL_IMAGES in self._images):
                return
            if len(self._events) >= self.max_entries:
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("file access record is full (%d entries): later first reads are not recorded",
                                self.max_entries)
                return
            self._seen.add(key)
            self._events.append(FirstRead(time.monotonic(), layer, path, kind, size))

    # -- reading the record -------------------------------------------------------------------

    def started(self, image: str) -> float | None:
        """When `image`'s first layer lookup was seen while it was recorded (monotonic), if ever."""
        with self._lock:
            return self._started.get(image)

    def reads_in(self, layers: Iterable[str]) -> list[FirstRead]:
        """The first reads of these layers, in the order they happened."""
        wanted = set(layers)
        with self._lock:
            return [e for e in self._events if e.layer in wanted]

    def clear(self, layers: Iterable[str]) -> int:
        """Forget what was recorded for these layers (a new recording of the same image starts empty)."""
        wanted = set(layers)
        with self._lock:
            kept = [e for e in self._events if e.layer not in wanted]
            dropped = len(self._events) - len(kept)
            self._events = kept
            self._seen = {k for k in self._seen if k[0] not in wanted}
            self._full_warned = False
            return dropped

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"images": len(self._images), "layers": len(self._layers), "entries": len(self._events)}


def record_entries(reads: Iterable[FirstRead], layer_digests: list[str], manifest_digest: str,
                   started: float | None) -> list[dict[str, object]]:
    """The record lines of one image (`estargz.md` §8.4, ctr-remote's flavour plus our keys):
    `path` (inside the image, no leading `/`), `manifestDigest`, `layerIndex` (in `layer_digests`,
    the manifest's order), `layerDigest`, `kind`, `size` and `seconds` since `started`. A path
    read from two layers is kept once, at its first read (the upper layer hides the lower anyway).
    A layer listed twice in the manifest counts at its topmost index (the one overlay reads)."""
    index = {digest: i for i, digest in enumerate(layer_digests)}
    out: list[dict[str, object]] = []
    seen: set[str] = set()
    for read in reads:
        if read.path in seen or read.layer not in index:
            continue
        seen.add(read.path)
        out.append({
            "path": read.path,
            "manifestDigest": manifest_digest,
            "layerIndex": index[read.layer],
            "layerDigest": read.layer,
            "kind": read.kind,
            "size": read.size,
            "seconds": round(max(0.0, read.at - started), 6) if started is not None else None,
        })
    return out


__all__ = ["ALL_IMAGES", "AccessRecorder", "FirstRead", "record_entries"]
