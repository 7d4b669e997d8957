"""Executable fetch: the first miss on a multi-chunk program or shared library brings the rest of it.

A program or library is mapped and then touched all over, one page fault (one chunk fetch, one
round trip) at a time. The uncached chunks after the ones being fetched go into the same streamed
request, behind the wanted chunk, so the rest arrives at link speed without delaying it. Bounded
by `executable_fetch_limit` compressed bytes: a huge binary is left to on-demand reads.

Which files: executables (any x bit), and shared objects by name (`*.so`, `*.so.N...`), whatever
their mode: Debian ships most libraries 0644 (libstdc++, libz, libcrypto; libc is 0755), and the
ones a program `dlopen`s (a JVM's `libjvm.so`, a Python extension module, a plugin) are not in
any `DT_NEEDED` list, so library readahead never takes them. Their faults otherwise come two or
three at once as the loader and the program touch them, each a request of a whole chunk sharing
the link with the others: on the java image that lost packets at the link's queue and left the
registry's congestion window small for seconds (startup benchmark README, rounds 13-14).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

from ...formats.toc import Chunk, TocEntry
from ..blob_index import stored_size
from .base import FetchPolicy, PolicyHost

if TYPE_CHECKING:
    from ..reader import FetchPlan


_SHARED_OBJECT = re.compile(r"\.so(\.[0-9]+)*$")  # libz.so.1.2.13, _ssl.cpython-311-x86_64-linux-gnu.so


def mapped_when_loaded(entry: TocEntry) -> bool:
    """Whether `entry` is a file a loader maps: executable, or named as a shared object."""
    return bool(entry.mode & 0o111) or _SHARED_OBJECT.search(entry.name) is not None


class ExecutableFetch(FetchPolicy):
    name = "executable"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.limit = layer.config.executable_fetch_limit

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        if len(entry.chunks) < 2 or not mapped_when_loaded(entry) or stored_size(entry) > self.limit:
            return
        start = max(c.blob_offset for c in entry.chunks if c.digest in missing)
        later = [c for c in entry.chunks if c.blob_offset > start and c.digest not in missing]
        plan.add(self.reader.uncached(later), "executable_chunks")
