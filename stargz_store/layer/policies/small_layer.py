"""Small-layer fetch: the first miss in a small layer fetches the whole layer.

A layer of a megabyte or two (a busybox, alpine or distroless base) is read all over when a
container starts: its shell, its libc, /etc. Each miss in it costs a round trip and a new TCP
slow start; fetched whole at the first miss, it arrives at link speed while the runtime is still
setting up. The chunks stored after the wanted bytes go into the request being planned (streamed
behind them); those before come as a second request alongside, so the reader still gets its
bytes first. Once per layer; bounded by `small_layer_fetch_size` compressed bytes of data.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Mapping

from ...formats.toc import Chunk, TocEntry
from .base import FetchPolicy, PolicyHost

if TYPE_CHECKING:
    from ..reader import FetchPlan


class SmallLayerFetch(FetchPolicy):
    name = "small_layer"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.toc = layer.toc
        self._pending = 0 < layer.parsed.toc_offset <= layer.config.small_layer_fetch_size
        self._lock = threading.Lock()

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        with self._lock:
            pending, self._pending = self._pending, False
        if not pending or not plan.extents:
            return
        first_wanted = plan.first_start
        rest = self.reader.uncached(c for e in self.toc.files_in_blob_order() for c in e.chunks)
        plan.add([c for c in rest if c.blob_offset >= first_wanted], "small_layer_chunks")
        plan.add([c for c in rest if c.blob_offset < first_wanted], "small_layer_chunks", alongside=True)
