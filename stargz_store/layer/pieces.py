"""Chunks fetched a piece at a time, in a given order, one request after another.

What a container will read in a known order (a layer's prioritized region, read in blob order;
the files its command names, read in the order named) is best on the link as one stream in that
order: a reader going through it waits for each chunk only as long as the link takes to bring
it, and the bytes it reads last come last. Claimed whole and sent as one request, a read further
on would wait for the stream to get there; sent as several requests at once, they share the
link and every file arrives late. So the chunks are cut into pieces (`split_into_pieces`) and
`fetch_pieces_in_turn` sends them one after another:

- a piece is claimed when the one before it goes out, so a read of a chunk further on is an
  ordinary miss, fetched at once on its own request, and the chain skips it later (what a read
  claimed or cached is fetched around, never twice);
- the next piece is asked for once the current one has at most `HAND_OFF` bytes to go, so the
  link is not idle for a round trip between them;
- a piece that fails (an error, bytes that do not verify) ends the chain once what it had
  claimed is sent: a stalled or broken registry gets no more of it than one request did, and
  reads fetch the rest.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, NamedTuple

from ..formats.toc import Chunk
from .fetcher import Counters
from .flight import Flight
from .ranges import Extent, Request
from .reader import ChunkReader

log = logging.getLogger(__name__)

# The next piece is asked for when the current one has this many bytes to go: about one round
# trip of data at 100 Mbit/s and 40 ms, so its first bytes come as the last of the current one do.
HAND_OFF = 512 << 10


class _Claimed(NamedTuple):
    """A piece whose missing chunks the chain has claimed."""

    index: int
    size: int  # chunks in the piece
    missing: dict[str, Chunk]
    mine: dict[str, Flight]


def split_into_pieces(chunks: Iterable[Chunk], size: int, *, keep_order: bool = False) -> list[list[Chunk]]:
    """`chunks` cut into runs spanning at most `size` compressed bytes each (a larger chunk is a
    piece of its own), in blob order, or with `keep_order` in the order given (a chunk stored
    before the last one starts a new piece: each piece is one forward span of the blob)."""
    ordered = list(chunks) if keep_order else sorted(chunks, key=lambda c: c.blob_offset)
    pieces: list[list[Chunk]] = []
    run: list[Chunk] = []
    for c in ordered:
        if run and (c.blob_offset < run[-1].blob_end or c.blob_end - run[0].blob_offset > size):
            pieces.append(run)
            run = []
        run.append(c)
    if run:
        pieces.append(run)
    return pieces


def claimed_extents(reader: ChunkReader, missing: Mapping[str, Chunk], mine: Iterable[str]) -> list[Extent]:
    """The extents of the claimed chunks `mine` (of `missing`), on the direct path (to disk, not
    the memory LRU)."""
    return [reader.chunk_extent(missing[k], keep_in_memory=False) for k in mine]


def plan_claimed(reader: ChunkReader, extents: list[Extent], flights: dict[str, Flight], size: int, *,
                 from_zero: bool) -> list[Request]:
    """Requests of at most `size` bytes for claimed `extents`, around what is cached or in flight
    elsewhere (chunks the planner adds between them join `flights`). `from_zero`: the first
    starts at 0, bringing the tar headers before the first file along."""
    requests = reader.plan_requests(extents, flights, gap=size, max_size=size)
    if from_zero:
        requests[0].start = 0
    return requests


def fetch_pieces_in_turn(reader: ChunkReader, counters: Counters, pieces: list[list[Chunk]], *, size: int,
                         kind: str, what: str, count_as: str | None = None, from_zero: bool = False,
                         reserve: bool = False) -> None:
    """Fetch `pieces` in order, one request after another, as the module says (requests of at
    most `size` bytes; `kind` is what the metrics count them as, `what` what the logs call the
    chain, `count_as` names the counters of pieces and bytes sent, `<count_as>_pieces` and
    `<count_as>_bytes`). `from_zero`: the first request starts at 0 and brings the tar headers
    before the first file along (a prefetch of a region nothing of which was cached). `reserve`:
    the rest of the chain's span is left to it (`ChunkReader.reserved`: guesses stay out of it,
    only reads overtake); without it, the chain itself leaves a reserved span alone. Returns at
    once; the requests run on the fetcher's workers."""
    fetcher = reader.fetcher
    end = pieces[-1][-1].blob_end if pieces else 0
    stopped = False

    def claim_from(index: int) -> _Claimed | None:
        """The first piece from `index` on with something left to fetch, claimed."""
        while index < len(pieces) and not reader.closed.is_set() and not stopped:
            chunks = pieces[index]
            if reserve:
                reader.reserved = (pieces[index + 1][0].blob_offset, end) if index + 1 < len(pieces) else (0, 0)
            lo, hi = reader.reserved
            missing = {c.digest: c for c in chunks if not reader.cache.contains(c.digest)
                       and (reserve or not (lo <= c.blob_offset and c.blob_end <= hi))}
            mine, _ = fetcher.claim(missing)
            if mine:
                return _Claimed(index, len(chunks), missing, mine)
            index += 1
        if reserve:
            reader.reserved = (0, 0)
        return None

    def send(piece: _Claimed, following: _Claimed | None) -> None:
        flights = dict(piece.mine)
        requests = plan_claimed(reader, claimed_extents(reader, piece.missing, piece.mine), flights, size,
                                from_zero=from_zero and piece.index == 0 and len(piece.mine) == piece.size)
        length = left = sum(r.length for r in requests)
        if count_as:
            counters.add(f"{count_as}_pieces")
            counters.add(f"{count_as}_bytes", length)
        handed = False

        def hand_off() -> None:  # (only ever on this piece's worker thread)
            nonlocal handed
            if following is not None and not handed:
                handed = True
                send(following, claim_from(following.index + 1))

        def received(n: int) -> None:
            nonlocal left
            left -= n
            if left <= HAND_OFF:
                hand_off()

        def run() -> None:
            nonlocal stopped
            try:
                if length <= HAND_OFF:
                    hand_off()
                for req in requests:
                    fetcher.run_batch([req], flights, True, kind, received)
                if any(f.error is not None for f in flights.values()):  # (landed ones are gone)
                    stopped = True
                    if reserve:
                        reader.reserved = (0, 0)
                    log.warning("layer %s: %s stopped after a failed piece; the rest is fetched as read",
                                reader.blob_digest, what)
            finally:
                hand_off()

        fetcher.submit_work(run, requests, flights)

    if reserve and pieces:
        reader.reserved = (pieces[0][0].blob_offset, end)
    log.debug("layer %s: %s: %d piece(s) in turn", reader.blob_digest, what, len(pieces))
    first = claim_from(0)
    if first is not None:
        send(first, claim_from(first.index + 1))
