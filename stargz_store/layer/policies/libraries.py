"""Library readahead: when a program or shared library is first read, fetch the libraries it loads.

The dynamic loader opens a program's DT_NEEDED libraries one after another, each a miss and a
round trip on a lazily pulled image (gcc's cc1 loads eight, `ld` four). As soon as the start of
an ELF file is read, a worker parses its dynamic section (`layer.elf`), finds each library where
the loader would (run path, then the distribution's directories) in the image's merged layers,
and starts fetching the ones not cached yet, without waiting for them. The loader then finds them
in flight or cached. A wrong guess costs the bytes of a library; nothing waits on this.

The image's layers come from the view the daemon attaches (`Layer.attach_image`): a zero-argument
callable returning the image's open layers, topmost first. A layer nobody attached an image to
resolves paths in itself only.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

from ...formats.toc import DIR, REG, SYMLINK, TocEntry
from ..elf import ELF_MAGIC, DynamicInfo, dynamic_info, library_dirs
from .base import FetchPolicy, HintWorker, PolicyHost, SharedWorker

log = logging.getLogger(__name__)

_MAX_HOPS = 16  # symlinks followed while resolving one path (the kernel allows 40)
_MAX_QUEUED = 256


def resolve_in_layers(layers: Sequence[Any], path: str) -> tuple[Any, TocEntry] | None:
    """(layer, entry) of the regular file `path` names in the merged view of `layers` (top
    first), following symlinks in every component and honouring whiteouts; None if there is none."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        comp = parts.pop(0)
        if comp == "..":
            if done:
                done.pop()
            continue
        hit = lookup_in_layers(layers, "/".join([*done, comp]))
        if hit is None:
            return None
        entry = hit[1]
        if entry.type == SYMLINK:
            hops += 1
            if hops > _MAX_HOPS:
                return None
            if entry.link_name.startswith("/"):
                done = []
            parts = [p for p in entry.link_name.split("/") if p and p != "."] + parts
            continue
        if not parts:
            return hit if entry.type == REG else None
        if entry.type != DIR:
            return None
        done.append(comp)
    return None


def find_libraries(layers: Sequence[Any], info: DynamicInfo, entry: TocEntry) -> list[tuple[Any, TocEntry]]:
    """(layer, entry) of each library in `info.needed` (the dynamic section of ELF file `entry`)
    that `layers` hold, found where the loader looks (`library_dirs`), in the list's order."""
    dirs = library_dirs(info, "/" + entry.name.rpartition("/")[0])
    found = []
    for name in info.needed:
        for d in dirs:
            hit = resolve_in_layers(layers, f"{d}/{name}")
            if hit is not None:
                found.append(hit)
                break
    return found


def lookup_in_layers(layers: Sequence[Any], name: str) -> tuple[Any, TocEntry] | None:
    """(layer, entry) of `name` (any type, no symlink followed) in the merged view of `layers`
    (top first), None when absent or deleted by a whiteout above."""
    parent, _, base = name.rpartition("/")
    whiteout = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
    for layer in layers:
        entry = layer.toc.lookup(name)
        if entry is not None:
            return layer, entry
        if layer.toc.lookup(whiteout) is not None:
            return None
    return None


class LibraryReadahead(HintWorker):
    """One worker thread for every layer's library lookups; `program_read` only queues (it is
    called on the read path). `programs`/`libraries` count what it looked at and started."""

    def __init__(self) -> None:
        self.programs = 0
        self.libraries = 0
        super().__init__("library-readahead", _MAX_QUEUED)

    def program_read(self, image_layers: Callable[[], Sequence[Any]], layer: Any, entry: TocEntry) -> None:
        self._put(image_layers, layer, entry)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._fetch_libraries(*item)
            except Exception as e:  # a hint: never let it take the worker down
                log.debug("library readahead for %s failed: %s", item[2].name, e)

    def _fetch_libraries(self, image_layers: Callable[[], Sequence[Any]], layer: Any, entry: TocEntry) -> None:
        started = fetch_libraries(image_layers, layer, entry)
        if started is None:
            return
        self.programs += 1
        self.libraries += len(started)


def fetch_libraries(image_layers: Callable[[], Sequence[Any]], layer: Any, entry: TocEntry) -> list[str] | None:
    """Start fetching the libraries ELF file `entry` of `layer` loads (its DT_NEEDED list, looked
    up where the loader would in `image_layers()`), without waiting; the names of those started,
    or None when `entry` is not a dynamically linked ELF file. The worker's step, callable on its
    own (the startup benchmark's replay runs it in step with the reads it models)."""
    info = dynamic_info(lambda offset, size: layer.read(entry, offset, size))
    if info is None:
        return None
    started = [lib.name for owner, lib in find_libraries(image_layers(), info, entry) if owner.fetch_ahead(lib)]
    if started:
        log.debug("%s loads %s: fetching %s ahead", entry.name, ", ".join(info.needed), ", ".join(started))
    return started


shared_worker = SharedWorker(LibraryReadahead)  # the process's library readahead worker


class LibraryReadaheadPolicy(FetchPolicy):
    name = "library_readahead"

    def __init__(self, layer: PolicyHost) -> None:
        self.layer = layer
        self.worker = layer.library_worker
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    def on_data(self, entry: TocEntry, offset: int, data: bytes) -> None:
        if offset != 0 or data[:4] != ELF_MAGIC:
            return
        with self._lock:  # once per file
            if entry.ino in self._seen:
                return
            self._seen.add(entry.ino)
        self.layer.counters.add("programs_read")
        worker = self.worker or shared_worker()
        worker.program_read(self.layer.image_layers, self.layer, entry)
