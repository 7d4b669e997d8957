"""Reads overtake the prefetch: a prioritized region of more than two pieces is claimed a piece at
a time, so a read of a file the prefetch has not reached is fetched at once, and no byte twice."""
from __future__ import annotations

import random
import threading

import pytest

from stargz_store.layer import LayerReadError
from stargz_store.layer.pieces import split_into_pieces
from stargz_store.layer.sources import FileBlobSource

from .conftest import lazy_config
from .helpers import build_layer, wait_until

PIECE = 2 << 20


class HeldFirst(FileBlobSource):
    """Holds the streamed range that starts at 0 (the prefetch's first request, which brings the
    tar headers before the first file along) until `gate` is set; `held` is set once it is held."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.held = threading.Event()

    def stream_range(self, offset, length, sink):
        if offset == 0 and not self.gate.is_set():
            self.held.set()
            assert self.gate.wait(60), "test never opened the gate"
        super().stream_range(offset, length, sink)


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """Twenty prioritized files of 1 MiB, incompressible (a piece of 2 MiB holds about two)."""
    rnd = random.Random(13)
    names = [f"opt/app/lib{i:02}.jar" for i in range(20)]
    files = {name: rnd.randbytes(1 << 20) for name in names}
    return build_layer(tmp_path_factory.mktemp("pieces") / "layer.blob", files, prioritized=tuple(names)), names


def _open_held(region, open_layer, piece: int):
    built, names = region
    src = HeldFirst(built.path)
    config = lazy_config(no_prefetch=False, prefetch_piece_size=piece, fetch_timeout=2.0)
    layer, _ = open_layer(built, source=src, config=config)
    return layer, src, layer.toc.lookup(names[-1])


def test_a_read_past_the_prefetch_is_fetched_at_once_and_no_byte_twice(region, open_layer):
    built, names = region
    layer, src, last = _open_held(region, open_layer, PIECE)
    try:
        assert src.held.wait(30)  # the first piece is held, the next not asked for yet
        # A guess (library readahead, the rest of an executable) leaves the region to the
        # prefetch: it would only share the link with the stream that brings it anyway ...
        assert not layer.fetch_ahead(last)
        # ... but a reader does not wait for the stream to get there.
        assert layer.read(last, 0, last.size) == built.files[last.name]
        # The piece after the one on the wire is claimed already: a reader going through the
        # region in order waits for the prefetch rather than fetching beside it (held: times out).
        chunks = [c for name in names for c in layer.toc.lookup(name).chunks]
        next_piece = {c.digest for c in split_into_pieces(chunks, PIECE)[1]}
        second = next(layer.toc.lookup(n) for n in names if {c.digest for c in layer.toc.lookup(n).chunks} <= next_piece)
        with pytest.raises(LayerReadError, match="timed out"):
            layer.read(second, 0, second.size)
    finally:
        src.gate.set()
    assert layer.drain(60)
    assert layer.reader.reserved == (0, 0)  # the prefetch is done: nothing left to it
    landmark = layer.toc.prefetch_landmark_offset
    fetched = sorted((off, off + n) for off, n in src.log if off < landmark)  # not the TOC's reads
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(fetched, fetched[1:])), fetched
    chunks = [c for name in names for c in layer.toc.lookup(name).chunks]
    assert all(any(lo <= c.blob_offset and c.blob_end <= hi for lo, hi in fetched) for c in chunks)
    assert fetched[-1][1] <= landmark
    stats = layer.stats()
    assert stats["prefetch_pieces"] > 2 and stats["verify_failures"] == 0
    for name in names:
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == built.files[name]
    assert layer.stats()["fetched_bytes"] == stats["fetched_bytes"]  # all from the cache


def test_claimed_whole_at_open_a_read_waits_for_the_stream(region, open_layer):
    """The Go store's shape (and the baseline's): the region is one flight; the read of its last
    file waits for the stream to get there, here held, so the read times out."""
    built, names = region
    layer, src, last = _open_held(region, open_layer, 0)
    try:
        assert src.held.wait(30)
        with pytest.raises(LayerReadError, match="timed out"):
            layer.read(last, 0, last.size)
    finally:
        src.gate.set()
    assert layer.drain(60)
    assert layer.read(last, 0, last.size) == built.files[last.name]
    assert layer.stats()["prefetch_pieces"] == 0


def test_a_region_of_two_pieces_or_less_is_one_request(region, open_layer):
    built, names = region
    layer, src, last = _open_held(region, open_layer, 64 << 20)
    src.gate.set()
    assert layer.drain(60)
    assert layer.stats()["prefetch_pieces"] == 0
    landmark = layer.toc.prefetch_landmark_offset
    assert [r for r in src.log if r[0] < landmark] == [(0, landmark)]


def test_pieces_keep_blob_order_and_span_at_most_their_size(region, open_layer):
    built, names = region
    layer, _ = open_layer(built)
    chunks = [c for name in reversed(names) for c in layer.toc.lookup(name).chunks]
    pieces = split_into_pieces(chunks, PIECE)
    flat = [c for piece in pieces for c in piece]
    assert flat == sorted(chunks, key=lambda c: c.blob_offset)
    assert all(p[-1].blob_end - p[0].blob_offset <= PIECE for p in pieces)
    assert len(pieces) >= 10
    big = split_into_pieces(chunks[:3], 1)  # a chunk larger than the size is a piece of its own
    assert [len(p) for p in big] == [1, 1, 1]


class HeldNearEnd(FileBlobSource):
    """Streams the range that starts at 0 until `hold_at`, then holds the rest until `gate`."""

    def __init__(self, path, hold_at: int) -> None:
        super().__init__(path)
        self.hold_at = hold_at
        self.gate = threading.Event()

    def stream_range(self, offset, length, sink):
        def held(off, piece):
            if offset == 0 and off >= self.hold_at:
                assert self.gate.wait(60), "test never opened the gate"
            sink(off, piece)

        super().stream_range(offset, length, held)


def test_the_next_piece_is_asked_for_before_the_current_one_ends(region, open_layer):
    """No idle round trip between pieces: the next request goes out while the last bytes of the
    current one are still on their way (here held back)."""
    built, names = region
    peek, _ = open_layer(built)
    chunks = [c for name in names for c in peek.toc.lookup(name).chunks]
    first, second = split_into_pieces(chunks, PIECE)[:2]
    src = HeldNearEnd(built.path, hold_at=first[-1].blob_end - (128 << 10))
    layer, _ = open_layer(built, source=src, config=lazy_config(no_prefetch=False, prefetch_piece_size=PIECE))
    try:
        wait_until(lambda: any(off == second[0].blob_offset for off, _ in src.log))
    finally:
        src.gate.set()
    assert layer.drain(60)


class BrokenStreams(FileBlobSource):
    """Every streamed request fails while `broken` (the TOC's reads are not streamed)."""

    broken = True

    def stream_range(self, offset, length, sink):
        if self.broken:
            raise ConnectionError("connection reset by peer")
        super().stream_range(offset, length, sink)


def test_a_failed_piece_ends_the_prefetch_and_reads_still_get_their_bytes(region, open_layer):
    """A registry that fails gets no more of the prefetch than one request did (the piece that
    failed and the one already claimed behind it), and every file still reads, fetched when read."""
    built, names = region
    src = BrokenStreams(built.path)  # the TOC reads, then every streamed request fails
    layer, _ = open_layer(built, source=src, config=lazy_config(no_prefetch=False, prefetch_piece_size=PIECE))
    assert layer.drain(60)
    stats = layer.stats()
    assert stats["prefetch_pieces"] == 2 and stats["fetch_errors"] == 2
    assert layer.reader.reserved == (0, 0)
    src.broken = False
    for name in names:
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == built.files[name]
