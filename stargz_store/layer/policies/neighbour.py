"""Neighbour fetch: a miss on a file also fetches the small files stored around it in the blob.

Programs read files stored near each other together (Python imports a package's modules, a
compiler its headers, node a package's `package.json`, `index.js` and `lib/`, a loader the
libraries beside each other), and on a link with 20 ms round trips a few KiB more in a request
the reader waits for anyway cost far less than a later request: this is what turns hundreds of
sequential misses into tens. The Go store gets the same effect blindly from its 50,000-byte
blocks; this policy chooses within a reach of the same order, by three rules on what a file
is, never on an image:

- reach: `neighbour_fetch_size` compressed bytes around the file, half before its first byte,
  half after its last (a miss lands anywhere in a run of files read together; an aligned block
  brings both sides too);
- likeness: a neighbour comes along when it is in the missed file's directory, or has its
  suffix and lies in a close directory (`close_directories`: `.h` brings `.h` from the sibling
  `bits/` directory, `.js` brings `.js` from the package's `lib/`; the `.py` sources stored beside
  the `__pycache__/*.pyc` an interpreter reads do not come with them, nor `.pyc` of a far
  subpackage);
  around a file larger than the window (a library, a program, a jar) any small file comes
  along, so the files stored right after a big one cost no round trip of their own (the Go
  store's block holding a file's last bytes brings them too);
- size: a neighbour of more than `_NEIGHBOUR_MAX` compressed bytes is skipped (the walk goes on
  past it): a file saves at most one round trip (20 ms, 250 KB at 100 Mbit/s) if it is read, and
  costs its size if not, so small files are the good bets. The file stored right before or after
  a big one may be as large as the window (next to a big read it costs little: `libgcc_s` beside
  `libc`, read by every C++ program, is 56 KB).

Designed on the held-out images with the replay of their recorded opens
(`python -m benchmarks.startup.replay`; README of the startup benchmark): the directory-only
rule of before cost one round trip per directory on node's `require` chains, cxx's header
subdirectories and pynopyc's packages, where the Go store's blocks took fewer; this keeps the
bytes within 1.2x of what the workloads read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ...formats.toc import Chunk, TocEntry
from ..blob_index import stored_size
from .base import FetchPolicy, PolicyHost

if TYPE_CHECKING:
    from ..reader import FetchPlan

_NEIGHBOUR_MAX = 16 << 10  # compressed bytes of the largest neighbour brought along


def suffix(name: str) -> str:
    """What follows the last dot of the base name ('' without one): the kind of file."""
    base = name.rpartition("/")[2]
    return base.rpartition(".")[2] if "." in base else ""


def close_directories(a: str, b: str) -> bool:
    """Whether the shorter of directories `a` and `b` shares all but at most its last component
    with the other: the same, an ancestor and any directory below it, siblings (`lib/` beside
    `bin/`) and anything below a sibling (`pkg/lib/` and `pkg/src/util/`); not two far ends of a
    tree (`usr/share/doc/x` and `usr/lib/python3/y`). (Narrower, e.g. no depth below a sibling's
    child, cost cxx 7 more round trips in the replay.)"""
    pa, pb = a.split("/") if a else [], b.split("/") if b else []
    shared = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        shared += 1
    return shared >= min(len(pa), len(pb)) - 1


class NeighbourFetch(FetchPolicy):
    name = "neighbour"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.window = layer.config.neighbour_fetch_size

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        plan.add(self.neighbours(entry), "neighbour_chunks", keep_in_memory=True)

    def neighbours(self, entry: TocEntry) -> list[Chunk]:
        """Uncached chunks of the small files stored within half the window before and after
        `entry` that are like it (its directory or its suffix; any, around a big file, whose
        two adjacent files may be as large as the window)."""
        if not entry.chunks:
            return []
        index = self.reader.index
        i = index.position(entry)
        if i is None:
            return []
        half = self.window // 2
        lo, hi = entry.chunks[0].blob_offset - half, entry.chunks[-1].blob_end + half
        any_kind = stored_size(entry) > self.window
        limit = min(_NEIGHBOUR_MAX, self.window)
        parent, kind = entry.name.rpartition("/")[0], suffix(entry.name)
        out: list[Chunk] = []
        for step in (1, -1):
            j = i + step
            while (f := index.file_at(j)) is not None:
                if (f.chunks[0].blob_offset >= hi) if step > 0 else (f.chunks[-1].blob_end <= lo):
                    break
                adjacent = j == i + step
                j += step
                if stored_size(f) > (self.window if any_kind and adjacent else limit):
                    continue
                there = f.name.rpartition("/")[0]
                if any_kind or there == parent or (suffix(f.name) == kind and close_directories(parent, there)):
                    out.extend(self.reader.uncached(f.chunks))
        return out
