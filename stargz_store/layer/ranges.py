"""Planning ranged requests: which compressed extents go into which request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class Extent:
    """A piece of work: bytes `[start, end)` of the blob, and what to do with them once fetched.

    `finish` turns the raw bytes into the value cached and handed to waiters (for a chunk: decompress
    and verify); it raises to fail just this piece. `cached` looks the value up again just before
    the request is sent, in case another fetch stored it meanwhile; `persist`, if set, runs after
    the waiters have been woken (slow work that they need not wait for, like a disk write).
    """

    key: str
    start: int
    end: int
    finish: Callable[[memoryview], bytes]
    cached: Callable[[], bytes | None] | None = None
    persist: Callable[[bytes], None] | None = None


@dataclass
class Request:
    """One ranged request `[start, end)` covering several extents (gaps between them are fetched
    and dropped, cheaper than another round trip when small)."""

    start: int
    end: int
    extents: list[Extent] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.end - self.start


def coalesce(
    extents: Sequence[Extent], *, gap: int, max_size: int, bridge: Callable[[int, int], bool] | None = None
) -> list[Request]:
    """Merge extents (in blob order) into requests: an extent joins the previous request when it
    overlaps it or starts at most `gap` bytes after it, unless the request would exceed `max_size`
    (a single extent larger than that still gets its own request), or `bridge(end, start)` says
    the bytes between them may not be fetched (they belong to something fetched elsewhere)."""
    requests: list[Request] = []
    for ext in sorted(extents, key=lambda e: (e.start, e.end)):
        last = requests[-1] if requests else None
        if (
            last is not None
            and ext.start <= last.end + gap
            and max(last.end, ext.end) - last.start <= max_size
            and (ext.start <= last.end or bridge is None or bridge(last.end, ext.start))
        ):
            last.end = max(last.end, ext.end)
            last.extents.append(ext)
        else:
            requests.append(Request(ext.start, ext.end, [ext]))
    return requests


def split_into_batches(requests: list[Request], batches: int) -> list[list[Request]]:
    """Spread requests over at most `batches` groups of consecutive requests with similar byte
    totals, one `read_ranges` call per group, so a big read uses parallel connections."""
    if batches <= 1 or len(requests) <= 1:
        return [requests] if requests else []
    total = sum(r.length for r in requests)
    target = total / min(batches, len(requests))
    out: list[list[Request]] = [[]]
    acc = 0
    for r in requests:
        if out[-1] and acc >= target and len(out) < batches:
            out.append([])
            acc = 0
        out[-1].append(r)
        acc += r.length
    return out
