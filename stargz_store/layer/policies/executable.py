"""Executable fetch: the first miss on a multi-chunk executable brings the rest of the file.

A program or library is mapped and then touched all over, one page fault (one chunk fetch, one
round trip) at a time. The uncached chunks after the ones being fetched go into the same streamed
request, behind the wanted chunk, so the rest arrives at link speed without delaying it. Bounded
by `executable_fetch_limit` compressed bytes: a huge binary is left to on-demand reads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ...formats.toc import Chunk, TocEntry
from ..blob_index import stored_size
from .base import FetchPolicy, PolicyHost

if TYPE_CHECKING:
    from ..reader import FetchPlan


class ExecutableFetch(FetchPolicy):
    name = "executable"

    def __init__(self, layer: PolicyHost) -> None:
        self.reader = layer.reader
        self.limit = layer.config.executable_fetch_limit

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        if len(entry.chunks) < 2 or not entry.mode & 0o111 or stored_size(entry) > self.limit:
            return
        start = max(c.blob_offset for c in entry.chunks if c.digest in missing)
        later = [c for c in entry.chunks if c.blob_offset > start and c.digest not in missing]
        plan.add(self.reader.uncached(later), "executable_chunks")
