"""A request of many chunks (a prefetch, a long read) is streamed: each chunk is verified and
handed to its readers as soon as its last byte has arrived, not when the whole response has."""
from __future__ import annotations

import random
import threading
import tracemalloc

from stargz_store.layer.sources import STREAM_PIECE, FileBlobSource

from .conftest import lazy_config
from .helpers import build_layer


class GatedSource(FileBlobSource):
    """Streams the first piece of each range, then holds the rest until `gate` is set; can also
    replay a range from its start (what a retried request looks like) or break after one piece."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.first_piece_sent = threading.Event()
        self.replay = False
        self.break_after_first = False

    def stream_range(self, offset, length, sink):
        sent = [0]

        def gated(off, piece):
            if sent[0] == 1:
                if self.break_after_first:
                    raise ConnectionError("connection reset by peer")
                if self.replay:  # the registry starts over: everything again from `offset`
                    self.replay = False
                    super(GatedSource, self).stream_range(offset, length, sink)
                    raise _Replayed
                self.first_piece_sent.set()
                assert self.gate.wait(60), "test never opened the gate"
            sent[0] += 1
            sink(off, piece)

        try:
            super().stream_range(offset, length, gated)
        except _Replayed:
            pass


class _Replayed(Exception):
    pass


def test_first_prioritized_file_is_served_while_the_prefetch_is_still_arriving(sample_layer, open_layer):
    src = GatedSource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src)
    landmark = layer.toc.prefetch_landmark_offset
    assert landmark > STREAM_PIECE  # the prefetch takes more than one piece
    prefetcher = threading.Thread(target=layer.prefetch, args=(30.0,))
    prefetcher.start()
    try:
        assert src.first_piece_sent.wait(30)
        hello = layer.toc.lookup("etc/hello.txt")
        assert hello.chunks[0].blob_end <= STREAM_PIECE
        # The rest of the prefetch is held back, yet the first file reads (from what arrived).
        assert layer.read(hello, 0, hello.size) == sample_layer.files["etc/hello.txt"]
        stats = layer.stats()
        assert stats["in_flight"] > 0  # lib.so is still on its way
        # ... and the bytes it was served from are counted already (`status` and the metrics
        # must not show a file read with nothing fetched while the stream goes on).
        assert stats["fetched_bytes"] >= hello.chunks[0].blob_end - src.log[-1][0] > 0
    finally:
        src.gate.set()
        prefetcher.join(30)
    lib = layer.toc.lookup("usr/lib/lib.so")
    assert layer.read(lib, 0, lib.size) == sample_layer.files["usr/lib/lib.so"]
    assert src.log == [src.log[0], (0, landmark)]  # the tail, then one prefetch request, nothing else


def test_a_replayed_stream_lands_every_chunk_once_and_exactly(sample_layer, open_layer):
    src = GatedSource(sample_layer.path)
    src.replay = True
    layer, _ = open_layer(sample_layer, source=src)
    src.gate.set()
    layer.prefetch(30.0)
    stats = layer.stats()
    assert stats["verify_failures"] == 0 and stats["in_flight"] == 0
    src.reset_counters()
    for name in ("etc/hello.txt", "usr/lib/lib.so"):
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == sample_layer.files[name]
    assert src.calls == 0


def test_a_broken_stream_keeps_what_arrived_and_fails_only_the_rest(sample_layer, open_layer):
    src = GatedSource(sample_layer.path)
    src.break_after_first = True
    layer, _ = open_layer(sample_layer, source=src, config=lazy_config(no_prefetch=True))
    layer.prefetch(30.0)  # logs the failure; prefetch is only an optimisation
    assert layer.stats()["fetch_errors"] == 1
    src.reset_counters()
    hello = layer.toc.lookup("etc/hello.txt")
    assert layer.read(hello, 0, hello.size) == sample_layer.files["etc/hello.txt"]
    assert src.calls == 0  # it had arrived before the cut, verified, and was kept
    src.break_after_first = False
    src.gate.set()
    lib = layer.toc.lookup("usr/lib/lib.so")
    assert layer.read(lib, 0, lib.size) == sample_layer.files["usr/lib/lib.so"]  # fetched again on demand
    assert src.calls >= 1


def test_by_default_a_layer_opens_without_waiting_for_its_prefetch(sample_layer, open_layer):
    src = GatedSource(sample_layer.path)  # holds back all but the first piece of the prefetch
    layer, _ = open_layer(sample_layer, source=src, config=lazy_config(no_prefetch=False))
    try:
        assert src.first_piece_sent.wait(30)  # the prefetch request went out with the open
        hello = layer.toc.lookup("etc/hello.txt")
        assert layer.read(hello, 0, hello.size) == sample_layer.files["etc/hello.txt"]
        assert layer.stats()["in_flight"] > 0
    finally:
        src.gate.set()
    lib = layer.toc.lookup("usr/lib/lib.so")
    assert layer.read(lib, 0, lib.size) == sample_layer.files["usr/lib/lib.so"]
    assert src.log[1:] == [(0, layer.toc.prefetch_landmark_offset)]  # one request; the read waited for it


class HeldSource(FileBlobSource):
    """Streams a range until `hold_at` bytes of the blob have gone out, then holds the rest
    until `gate` is set (`held` tells the test it is holding)."""

    def __init__(self, path, hold_at: int) -> None:
        super().__init__(path)
        self.hold_at = hold_at
        self.held = threading.Event()
        self.gate = threading.Event()

    def stream_range(self, offset, length, sink):
        def held(off, piece):
            if off >= self.hold_at and not self.gate.is_set():
                self.held.set()
                assert self.gate.wait(60), "test never opened the gate"
            sink(off, piece)

        super().stream_range(offset, length, held)


def test_a_streamed_prefetch_holds_only_what_its_readers_still_need(tmp_path, open_layer):
    """A 20 MiB prioritized region streamed in one request: the chunks that arrived are on disk
    and nobody waits for them, so the store holds only the stream's own buffer, not every
    inflated chunk until the request ends (the java image's 64 MB prefetch peaked at 288 MB)."""
    rnd = random.Random(4)
    names = [f"opt/lib/part{i:02}.bin" for i in range(20)]
    files = {name: rnd.randbytes(1 << 20) for name in names}  # incompressible: inflated = fetched
    built = build_layer(tmp_path / "big.blob", files, prioritized=tuple(names))
    src = HeldSource(built.path, hold_at=18 << 20)
    layer, _ = open_layer(built, source=src, config=lazy_config())
    landmark = layer.toc.prefetch_landmark_offset
    assert landmark > 19 << 20
    tracemalloc.start()
    try:
        layer.prefetch(None)  # streams on a worker thread
        assert src.held.wait(60)
        held_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        src.gate.set()
        tracemalloc.stop()
    assert layer.drain(60)
    assert held_bytes < 6 << 20, f"{held_bytes / 2**20:.1f} MiB held with 18 MiB of the prefetch landed"
    last = layer.toc.lookup(names[-1])
    assert layer.read(last, 0, last.size) == files[names[-1]]
    assert layer.stats()["fetched_bytes"] <= landmark + (1 << 20)  # read from the cache, not fetched again
