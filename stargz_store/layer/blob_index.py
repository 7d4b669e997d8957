"""Where things are in the blob: the layer's files in blob order, for questions by offset.

Built once per layer on first use (a list and a list of offsets, a few MB for 100,000 files),
shared by the neighbour policy (which files sit next to this one) and the request planner
(which chunks lie between two extents it would merge).

What must hold: a file's chunks are consecutive in the blob and files do not interleave (true of
every eStargz and zstd:chunked writer, and of what `formats.toc` builds: extents are cut at the
next data offset), so sorting files by their first chunk sorts every chunk.
"""
from __future__ import annotations

import bisect
import threading
from typing import Iterator

from ..formats.toc import Chunk, Toc, TocEntry


def stored_size(entry: TocEntry) -> int:
    """Compressed bytes a file with data spans in the blob (first chunk to last)."""
    return entry.chunks[-1].blob_end - entry.chunks[0].blob_offset


def _first_offset(entry: TocEntry) -> int:
    return entry.chunks[0].blob_offset


class BlobIndex:
    """Files with data sorted by the blob offset of their first chunk."""

    def __init__(self, toc: Toc) -> None:
        self._toc = toc
        self._lock = threading.Lock()
        self._built: tuple[list[TocEntry], list[int]] | None = None

    def _index(self) -> tuple[list[TocEntry], list[int]]:
        built = self._built
        if built is None:
            with self._lock:
                built = self._built
                if built is None:
                    files = sorted(self._toc.files_in_blob_order(), key=_first_offset)
                    built = self._built = (files, [f.chunks[0].blob_offset for f in files])
        return built

    def position(self, entry: TocEntry) -> int | None:
        """Index of `entry` in blob order, or None (no data, or not this layer's entry)."""
        if not entry.chunks:
            return None
        files, starts = self._index()
        i = bisect.bisect_left(starts, entry.chunks[0].blob_offset)
        return i if i < len(files) and files[i].ino == entry.ino else None

    def file_at(self, i: int) -> TocEntry | None:
        files, _ = self._index()
        return files[i] if 0 <= i < len(files) else None

    def first_data_offset(self) -> int | None:
        _, starts = self._index()
        return starts[0] if starts else None

    def chunks_between(self, lo: int, hi: int) -> Iterator[Chunk]:
        """Every chunk whose compressed extent shares a byte with `[lo, hi)` (holes included)."""
        if hi <= lo:
            return
        files, starts = self._index()
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(files) and starts[i] < hi:
            for c in files[i].chunks:
                if c.blob_offset < hi and c.blob_end > lo:
                    yield c
            i += 1
