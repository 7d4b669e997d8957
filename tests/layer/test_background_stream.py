"""Background fetch as one streamed request per blob, for a blob behind a mirror (issue 18).

A pull-through mirror answers each ranged request for a blob it has not cached with the whole
body, pulled from the origin for that request alone; background fetch in ranged batches then
costs the origin a copy per batch. Streamed, the blob is one GET (after the mirror's own fill),
its chunks landed as they pass.
"""
from __future__ import annotations

import random
import threading

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.layer import LayerConfig, LayerResolver
from stargz_store.layer.scheduler import FetchScheduler
from stargz_store.registry.responses import STREAM_PIECE
from tests.fixtures.answered import AnsweredRequests
from tests.fixtures.mirror_site import Site

from .helpers import WholeStreamFileSource, build_layer

BATCH = 200_000
STREAMED = 64 << 10  # a request this long is a stream (the TOC's reads are shorter)


def big_files(seed: int = 7) -> dict[str, bytes]:
    """About 2.5 MB of incompressible files: many background batches, past every whole-body bound."""
    rnd = random.Random(seed)
    return {f"data/f{i:02d}": rnd.randbytes(250_000) for i in range(10)}


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory):
    return build_layer(tmp_path_factory.mktemp("big") / "layer.blob", big_files())


def background_only(**kw) -> LayerConfig:
    return LayerConfig().with_policies("background", **{
        "fetch_timeout": 60.0, "background_batch_size": BATCH, "background_quiet_period": 0.0, **kw})


def test_background_fetch_through_a_cold_mirror_is_one_stream_and_one_origin_copy(private_registry, big_layer,
                                                                                   tmp_path):
    """Against a cold pull-through mirror, background fetch waits for the mirror's fill and then
    streams the blob in one GET. Before: one ranged request per batch (10 here), each a whole
    body from the cold mirror hung up on, or a read from the mirror once filled."""
    site = Site(private_registry, tmp_path)
    try:
        ref, digest = site.push("bg/cold", big_layer.path.read_bytes())
        size = big_layer.result.size
        client = site.client(whole_blob_limit=0, mirror_retry=0.1, background_mirror_wait=60.0)
        answered = AnsweredRequests(client)
        answers: list[tuple[int, object]] = []  # (status, raw body) of every blob answer
        client.transport.session.hooks["response"].append(
            lambda resp, *a, **k: answers.append((resp.status_code, resp.raw)) if "/blobs/" in resp.url else None)
        resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), background_only())
        with resolver.open_layer(ref, big_layer.descriptor) as layer:
            assert layer.wait_background(180)
            assert layer.background_state == "done"
            long_bodies = [raw.tell() for status, raw in answers if raw.tell() > BATCH]
            assert len(long_bodies) == 1, f"one streamed GET carried the blob (bodies read: {long_bodies})"
            gets = answered.blob_gets(digest)
            for name, data in big_layer.files.items():
                entry = layer.toc.lookup(name)
                assert layer.read(entry, 0, entry.size) == data, name
            assert answered.blob_gets(digest) == gets, "every chunk was landed by the background fetch"
        assert answered.blob_gets(digest, f"//{site.origin.host}") <= 1  # at most the first TOC tail
        # The origin sent the mirror's fill, and the serving copy behind each whole body of the
        # filling mirror the client hung up on (on loopback it is in socket buffers whole by then;
        # ~150 kB on a real link): nothing for the client directly beyond the first TOC tail.
        hung_up = sum(1 for status, _ in answers if status == 200)
        assert site.origin_blob_bytes(digest) <= (1 + hung_up) * size + (64 << 10)
    finally:
        site.stop()


def test_streamed_background_fetch_asks_again_past_a_cached_run(open_layer, big_layer):
    """Chunks cached before the background fetch are not streamed again: a run of them longer
    than a batch ends the request, and the next one starts at the chunk after it."""
    source = WholeStreamFileSource(big_layer.path)
    layer, _ = open_layer(big_layer, source=source, config=background_only(no_background_fetch=True))
    for name in ("data/f03", "data/f04", "data/f05"):
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == big_layer.files[name]
    cached = [c for n in ("data/f03", "data/f04", "data/f05") for c in layer.toc.lookup(n).chunks]
    run_start, run_end = min(c.blob_offset for c in cached), max(c.blob_end for c in cached)
    layer.close()

    source = WholeStreamFileSource(big_layer.path)
    layer, _ = open_layer(big_layer, source=source, config=background_only())
    assert layer.wait_background(60)
    assert layer.background_state == "done"
    streams = [off for off, length in source.log if length > STREAMED]
    first_chunk = min(c.blob_offset for e in layer.toc.files_in_blob_order() for c in e.chunks)
    assert len(streams) == 2 and streams[0] == first_chunk and streams[1] >= run_end, source.log
    assert layer.stats()["background_bytes"] < big_layer.result.size - (run_end - run_start) + BATCH
    for name, data in big_layer.files.items():
        entry = layer.toc.lookup(name)
        assert layer.reader.cache.contains(entry.chunks[0].digest), name
        assert layer.read(entry, 0, entry.size) == data


def test_streamed_background_fetch_lands_every_chunk_once_in_one_request(open_layer, big_layer):
    """Nothing cached: one request from the first chunk, given up at the last chunk needed
    (the TOC after it is not read), every chunk landed from it."""
    source = WholeStreamFileSource(big_layer.path)
    layer, _ = open_layer(big_layer, source=source, config=background_only())
    assert layer.wait_background(60)
    assert layer.background_state == "done"
    chunks = [c for e in layer.toc.files_in_blob_order() for c in e.chunks]
    last_end = max(c.blob_end for c in chunks)
    first_chunk = min(c.blob_offset for c in chunks)
    assert [off for off, length in source.log if length > STREAMED] == [first_chunk], source.log
    assert source.bytes_read < last_end + (1 << 20), "read no further than a piece past the last chunk"
    before = source.requests
    for name, data in big_layer.files.items():
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == data
    assert source.requests == before


class GatedSource(WholeStreamFileSource):
    """Stops its stream after the first piece until `go` is set (at most a minute)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.started = threading.Event()
        self.go = threading.Event()

    def stream_blob(self, offset, sink) -> int:
        def gated(off, piece):
            sink(off, piece)
            self.started.set()
            self.go.wait(60)

        return super().stream_blob(offset, gated)


class PauseWatch(FetchScheduler):
    """The real scheduler; `held_back` is set when a background stream was told to wait for reads."""

    def __init__(self) -> None:
        super().__init__(background_slots=2, quiet_period=0.0)
        self.held_back = threading.Event()

    def pause_for_foreground(self, stop, max_wait, poll=0.05) -> bool:
        if self._foreground_busy():
            self.held_back.set()
        return super().pause_for_foreground(stop, max_wait, poll)


def test_streamed_background_fetch_stops_reading_for_reads_at_a_batch_boundary(open_layer, big_layer):
    """While a read is fetching, the stream stops taking bytes once a batch has passed and its
    claimed chunks have landed (the server waits), then goes on in the same request."""
    source, scheduler = GatedSource(big_layer.path), PauseWatch()
    layer, _ = open_layer(big_layer, source=source, config=background_only(), scheduler=scheduler)
    assert source.started.wait(60)
    with scheduler.foreground():
        source.go.set()
        assert scheduler.held_back.wait(60)
        held_at = source.bytes_read
        biggest = max(c.blob_end - c.blob_offset for e in layer.toc.files_in_blob_order() for c in e.chunks)
        assert BATCH <= held_at <= BATCH + biggest + 2 * STREAM_PIECE
        assert layer.background_state == "running"
    assert layer.wait_background(60)
    assert layer.background_state == "done"
    assert [off for off, length in source.log if length > STREAMED] == [source.log[-1][0]], "one request"
    assert source.bytes_read > held_at


def test_streamed_background_fetch_in_the_baseline_block_shape(open_layer, big_layer):
    """With `fetch_policy = "baseline"` a chunk is the aligned 50,000-byte blocks holding it, so
    neighbouring chunks share blocks: the stream lands each from the blocks as they pass."""
    source = WholeStreamFileSource(big_layer.path)
    layer, _ = open_layer(big_layer, source=source, config=background_only().baseline())
    assert layer.config.fetch_block_size
    assert layer.wait_background(60)
    assert layer.background_state == "done"
    assert len([r for r in source.log if r[1] > STREAMED]) == 1, source.log
    before = source.requests
    for name, data in big_layer.files.items():
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == data
    assert source.requests == before
