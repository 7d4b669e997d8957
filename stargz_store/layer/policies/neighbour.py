"""Neighbour fetch: a miss on a small file also fetches the files stored next to it.

Programs read the files of one directory together (Python imports a package's modules, a
compiler its headers, a loader its libraries), and on a link with 20 ms round trips a few KiB
more in a request the reader waits for anyway cost far less than a later request: this is what
turns hundreds of sequential misses into tens. Bounded by `neighbour_fetch_size` compressed
bytes, a quarter of it before the file, the rest after; a file larger than that window brings
nobody along.

Which neighbours: those of the same directory, and, while the layer is being read in blob order
and the files that came along from other directories are being read, those of the next
directories too. Two signals of the reads, nothing of the image:
- blob order: a miss that starts at most one window after where an earlier fetch of this layer
  ended is a *near* miss; at least half of the last `_LOCALITY_MISSES` misses must be near (a
  reader walking the layer the way it was written: a package and its subpackages, one module tree
  after another, `node_modules` trees);
- payoff: of the files fetched from other directories, at least `_CROSSED_SHARE` must have been
  read since (counted with decay; the first `_CROSSED_TRIAL` are a trial). A reader that walks
  in blob order but skips what lies between (compiled `.pyc` trees beside the `.py` sources a
  program never opens) stops the crossing after a few dozen files.
The directory-only rule was tuned on the python image, where every import stays in its package
directory; on the held-out images it cost one miss per directory where the Go store's
50,000-byte blocks took fewer round trips (node's `require` chains through package
subdirectories, pynopyc, cxx's boost header subdirectories). Replaying each image's recorded
opens against its TOC with the real layer (README.md of the startup benchmark has the figures).
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Mapping

from ...formats.toc import Chunk, TocEntry
from ..blob_index import stored_size
from .base import FetchPolicy, PolicyHost

if TYPE_CHECKING:
    from ..reader import FetchPlan

_LOCALITY_MISSES = 16  # misses the blob-order signal looks back over
_LOCALITY_MIN = 4      # ... of which it needs at least this many before it says anything
_LOCALITY_SHARE = 0.5  # share of near misses that lets neighbours cross directories
_ENDS_KEPT = 64        # where recent fetches of the layer ended (blob offsets)
_CROSSED_TRIAL = 256 << 10  # compressed bytes fetched from other directories before their payoff is judged
_UNREAD_PER_HIT = 32 << 10  # ... then at most this many of them left unread per file of them read: a file read
                            # is a round trip saved (20 ms: 250 KB at 100 Mbit/s), so the crossing pays for itself
_CROSSED_KEPT = 4096   # files fetched from other directories remembered until read


class NeighbourFetch(FetchPolicy):
    name = "neighbour"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.window = layer.config.neighbour_fetch_size
        self._lock = threading.Lock()
        self._ends: deque[int] = deque(maxlen=_ENDS_KEPT)
        self._near: deque[bool] = deque(maxlen=_LOCALITY_MISSES)
        self._crossed: OrderedDict[int, int] = OrderedDict()  # ino -> stored size, files fetched from other directories
        self._crossed_fetched = 0.0  # compressed bytes of files fetched from other directories (decayed)
        self._crossed_read = 0.0     # ... of those read since
        self._crossed_hits = 0.0     # ... how many files those were

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        across = self._note_miss(entry)
        crossed: list[TocEntry] = []
        chunks = self.neighbours(entry, across_directories=across, crossed=crossed)
        plan.add(chunks, "neighbour_chunks", keep_in_memory=True)
        if chunks:
            with self._lock:
                self._ends.append(max(c.blob_end for c in chunks))
                for f in crossed:
                    self._crossed[f.ino] = stored_size(f)
                self._crossed_fetched += sum(stored_size(f) for f in crossed)
                while len(self._crossed) > _CROSSED_KEPT:
                    self._crossed.popitem(last=False)

    def on_read(self, entry: TocEntry, offset: int, size: int, last_index: int) -> None:
        if not self._crossed or entry.ino not in self._crossed:
            return
        with self._lock:
            size = self._crossed.pop(entry.ino, None)
            if size is not None:
                self._crossed_read += size
                self._crossed_hits += 1

    def _note_miss(self, entry: TocEntry) -> bool:
        """Record where this miss falls; True when the layer is being read in blob order."""
        if not entry.chunks:
            return False
        start = entry.chunks[0].blob_offset
        with self._lock:
            near = any(0 <= start - end <= self.window for end in self._ends)
            self._near.append(near)
            self._ends.append(entry.chunks[-1].blob_end)
            seen = len(self._near)
            if seen < _LOCALITY_MIN or sum(self._near) < _LOCALITY_SHARE * seen:
                return False
            if self._crossed_fetched > 4 * _CROSSED_TRIAL:  # decay: the recent crossings weigh most
                self._crossed_fetched /= 2
                self._crossed_read /= 2
                self._crossed_hits /= 2
            unread = self._crossed_fetched - self._crossed_read
            return self._crossed_fetched < _CROSSED_TRIAL or unread <= _UNREAD_PER_HIT * self._crossed_hits

    def neighbours(self, entry: TocEntry, *, across_directories: bool = False,
                   crossed: list[TocEntry] | None = None) -> list[Chunk]:
        """Uncached chunks of the files stored right before and after `entry`: of its directory,
        or of any directory with `across_directories` (those files appended to `crossed`)."""
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
                elsewhere = f.name.rpartition("/")[0] != parent
                if size > budget or (elsewhere and not across_directories):
                    break
                budget -= size
                uncached = self.reader.uncached(f.chunks)
                out.extend(uncached)
                if elsewhere and uncached and crossed is not None:
                    crossed.append(f)
                j += step
        return out
