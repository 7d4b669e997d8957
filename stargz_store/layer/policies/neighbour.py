"""Neighbour fetch: a miss on a small file also fetches the files stored next to it in its directory.

Programs read the files of one directory together (Python imports a package's modules, a
compiler its headers, a loader its libraries), and on a link with 20 ms round trips a few KiB
more in a request the reader waits for anyway cost far less than a later request: this is what
turns hundreds of sequential misses into tens. Bounded by `neighbour_fetch_size` compressed
bytes, a quarter of it before the file, the rest after; a file larger than that window brings
nobody along.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ...formats.toc import Chunk, TocEntry
from ..blob_index import stored_size
from .base import FetchPolicy, PolicyHost

if TYPE_CHECKING:
    from ..reader import FetchPlan


class NeighbourFetch(FetchPolicy):
    name = "neighbour"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.window = layer.config.neighbour_fetch_size

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        plan.add(self.neighbours(entry), "neighbour_chunks", keep_in_memory=True)

    def neighbours(self, entry: TocEntry) -> list[Chunk]:
        """Uncached chunks of the same-directory files stored right before and after `entry`."""
        window = self.window
        if not entry.chunks or stored_size(entry) > window:
            return []
        index = self.reader.index
        i = index.position(entry)
        if i is None:
            return []
        parent = entry.name.rpartition("/")[0]
        out: list[Chunk] = []
        for step, budget in ((1, window - window // 4), (-1, window // 4)):
            j = i + step
            while (f := index.file_at(j)) is not None:
                size = stored_size(f)
                if size > budget or f.name.rpartition("/")[0] != parent:
                    break
                budget -= size
                out.extend(self.reader.uncached(f.chunks))
                j += step
        return out
