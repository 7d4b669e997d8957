"""Sequential readahead: a read that continues where the previous read of a file ended also starts
fetching the file's next chunks, up to `readahead_size` compressed bytes past the read.

One request per chunk, so they land one by one, in parallel, as the reader needs them. Each chunk
is considered once per sequential run, so a read inside an already covered window costs no
lookups. Off in production (the kernel's own readahead already asks for large windows); random
reads never trigger it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ...formats.toc import TocEntry
from ..reader import FetchPlan
from .base import FetchPolicy, PolicyHost

_TRACKED = 256  # files whose last read end is remembered


class SequentialReadahead(FetchPolicy):
    name = "sequential_readahead"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.size = layer.config.readahead_size
        # ino -> (offset the next sequential read starts at, last chunk index already read ahead)
        self._last_read_end: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def on_read(self, entry: TocEntry, offset: int, size: int, last_index: int) -> None:
        chunks = entry.chunks
        window_end = last_index
        budget = self.size
        while window_end + 1 < len(chunks) and budget > 0:
            window_end += 1
            budget -= chunks[window_end].blob_end - chunks[window_end].blob_offset
        with self._lock:
            next_offset, ahead_until = self._last_read_end.get(entry.ino, (-1, -1))
            sequential = offset == 0 or offset == next_offset
            if not sequential:
                ahead_until = -1
            first = max(last_index, ahead_until) + 1
            self._last_read_end[entry.ino] = (offset + size, max(ahead_until, window_end) if sequential else -1)
            self._last_read_end.move_to_end(entry.ino)
            while len(self._last_read_end) > _TRACKED:
                self._last_read_end.popitem(last=False)
        if not sequential or first > window_end:
            return
        plan = FetchPlan(self.reader)
        if plan.add(self.reader.uncached(chunks[first : window_end + 1]), "readahead_chunks", keep_in_memory=True):
            self.reader.dispatch(plan, max_request_size=0)
