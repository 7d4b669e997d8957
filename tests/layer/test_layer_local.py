"""Layer over a local blob source that counts and misbehaves: what is fetched, when, and how often."""
from __future__ import annotations

import random
import threading

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.layer import LayerReadError
from stargz_store.layer.config import LayerConfig

from .conftest import lazy_config
from .helpers import FaultySource, WatchedScheduler, build_layer, sample_files, wait_until


def test_toc_costs_one_tail_request(sample_layer, open_layer):
    layer, src = open_layer(sample_layer)
    tail = LayerConfig().tail_size
    assert src.log == [(max(0, sample_layer.result.size - tail), min(sample_layer.result.size, tail))]
    assert layer.toc.lookup("bin/app").size == 700_000


def test_random_reads_are_byte_exact(sample_layer, open_layer):
    layer, _ = open_layer(sample_layer)
    rnd = random.Random(7)
    for name, data in sample_layer.files.items():
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, len(data) + 100) == data
        for _ in range(60):
            off = rnd.randrange(0, len(data) + 10)
            size = rnd.choice([1, 100, 4096, 65536, 131072, 300_000])
            assert layer.read(entry, off, size) == data[off : off + size], (name, off, size)


def test_read_fetches_only_the_chunks_it_needs(sample_layer, open_layer):
    layer, src = open_layer(sample_layer)
    src.reset_counters()
    entry = layer.toc.lookup("bin/app")
    c3 = entry.chunks[3]
    assert layer.read(entry, c3.file_offset + 10, 20) == sample_layer.files["bin/app"][c3.file_offset + 10 :][:20]
    assert src.log == [(c3.blob_offset, c3.blob_end - c3.blob_offset)]
    # spanning chunks 5 and 6: one request for exactly their two adjacent extents
    src.reset_counters()
    c5, c6 = entry.chunks[5], entry.chunks[6]
    layer.read(entry, c6.file_offset - 5, 10)
    assert src.log == [(c5.blob_offset, c6.blob_end - c5.blob_offset)]
    # already fetched: no request at all
    src.reset_counters()
    layer.read(entry, c3.file_offset, c3.size)
    layer.read(entry, c5.file_offset, c5.size + c6.size)
    assert src.calls == 0
    assert layer.stats()["cache_hits"] >= 3


def test_adjacent_chunks_are_coalesced_into_one_request(sample_layer, open_layer):
    layer, src = open_layer(sample_layer)
    src.reset_counters()
    entry = layer.toc.lookup("bin/app")
    assert len(entry.chunks) > 5
    assert layer.read(entry, 0, entry.size) == sample_layer.files["bin/app"]
    assert src.log == [(entry.chunks[0].blob_offset, entry.chunks[-1].blob_end - entry.chunks[0].blob_offset)]
    assert layer.stats()["requests"] == 1  # the layer's own counters start after the TOC read


def test_far_apart_chunks_are_separate_ranges_of_one_call(sample_layer, open_layer):
    layer, src = open_layer(sample_layer, config=lazy_config(coalesce_gap=0, max_concurrency=1))
    src.reset_counters()
    entry = layer.toc.lookup("bin/app")
    first, last = entry.chunks[0], entry.chunks[-1]
    # read two ranges in one call through the chunk reader: chunks 0 and last, not adjacent
    layer.reader.start([first, last])
    wait_until(lambda: layer.stats()["in_flight"] == 0)
    assert src.calls == 1
    assert sorted(src.log) == [
        (first.blob_offset, first.blob_end - first.blob_offset),
        (last.blob_offset, last.blob_end - last.blob_offset),
    ]


def test_concurrent_readers_of_one_chunk_share_one_fetch(sample_layer, tmp_path, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src)
    src.reset_counters()
    src.stall = True
    entry = layer.toc.lookup("usr/share/doc/text")
    chunk = entry.chunks[2]
    expected = sample_layer.files["usr/share/doc/text"][chunk.file_offset : chunk.file_offset + 1000]
    results: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            results.append(layer.read(entry, chunk.file_offset, 1000))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: layer.stats()["cache_misses"] == 8)
    src.release.set()
    for t in threads:
        t.join()
    assert not errors
    assert results == [expected] * 8
    assert src.calls == 1
    assert layer.stats()["chunks_fetched"] == 1


def test_corrupted_bytes_fail_the_read_and_never_reach_the_cache(sample_layer, cache, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src)
    src.flip_bytes = True
    entry = layer.toc.lookup("usr/lib/lib.so")
    with pytest.raises(LayerReadError, match="digest|sha256|mismatch"):
        layer.read(entry, 0, 10)
    chunk = entry.chunks[0]
    assert not cache.contains(chunk.digest)
    assert not cache.path_for(chunk.digest).exists()
    assert layer.stats()["verify_failures"] == 1
    # the failure is not sticky: good bytes later are served
    src.flip_bytes = False
    assert layer.read(entry, 0, 10) == sample_layer.files["usr/lib/lib.so"][:10]
    assert cache.contains(chunk.digest)


def test_source_errors_become_layer_read_errors(sample_layer, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src)
    src.fail_with = ConnectionError("connection reset by peer")
    entry = layer.toc.lookup("bin/app")
    with pytest.raises(LayerReadError, match="connection reset"):
        layer.read(entry, 0, 10)
    assert layer.stats()["fetch_errors"] == 1
    src.fail_with = None
    assert layer.read(entry, 0, 10) == sample_layer.files["bin/app"][:10]


def test_a_stalled_source_times_out_every_waiter(sample_layer, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src, config=lazy_config(fetch_timeout=0.3))
    src.stall = True
    entry = layer.toc.lookup("bin/app")
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            layer.read(entry, 100, 10)
        except LayerReadError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a reader hung on a stalled source"
    assert len(errors) == 3
    assert all("timed out" in str(e) for e in errors)
    src.release.set()  # the stalled fetch lands later and fills the cache
    src.stall = False
    assert layer.read(entry, 100, 10) == sample_layer.files["bin/app"][100:110]


def test_prefetch_is_one_request_up_to_the_landmark(sample_layer, open_layer):
    layer, src = open_layer(sample_layer, config=lazy_config(no_prefetch=False, prefetch_wait=True))
    landmark = layer.toc.prefetch_landmark_offset
    assert landmark is not None and landmark > 0
    assert src.log[1:] == [(0, landmark)]
    src.reset_counters()
    for name in ("etc/hello.txt", "usr/lib/lib.so"):
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == sample_layer.files[name]
    assert src.calls == 0
    entry = layer.toc.lookup("bin/app")
    layer.read(entry, 0, 1)
    assert src.calls == 1


def test_readers_wait_for_a_running_prefetch_instead_of_fetching(sample_layer, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src)
    src.reset_counters()
    src.stall = True
    landmark = layer.toc.prefetch_landmark_offset
    prefetcher = threading.Thread(target=layer.prefetch, args=(30.0,))
    prefetcher.start()
    wait_until(lambda: src.entered.is_set() and layer.stats()["in_flight"] > 0)
    entry = layer.toc.lookup("usr/lib/lib.so")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(layer.read(entry, 1000, 5000)))
    reader.start()
    wait_until(lambda: layer.stats()["cache_misses"] >= 1)
    src.release.set()
    reader.join()
    prefetcher.join()
    assert got == [sample_layer.files["usr/lib/lib.so"][1000:6000]]
    assert src.log == [(0, landmark)]


def test_no_prefetch_landmark_means_no_prefetch(tmp_path, open_layer):
    built = build_layer(tmp_path / "b", sample_files(2))  # no prioritized files
    layer, src = open_layer(built, config=lazy_config(no_prefetch=False, prefetch_wait=True))
    assert layer.toc.has_no_prefetch_landmark
    assert src.calls == 1  # the tail only


def test_background_fetch_completes_then_everything_reads_without_requests(sample_layer, open_layer):
    layer, src = open_layer(sample_layer, config=lazy_config(no_background_fetch=False, background_batch_size=100_000))
    assert layer.wait_background(60)
    assert layer.stats()["background_state"] == "done"
    assert layer.stats()["background_bytes"] > 0
    src.reset_counters()
    for name, data in sample_layer.files.items():
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == data
    assert src.calls == 0


def test_background_fetch_stops_on_close(sample_layer, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src)
    src.reset_counters()
    src.delay = 0.05
    layer.start_background_fetch()
    wait_until(lambda: src.entered.is_set())
    layer.close()
    assert layer.wait_background(30)
    assert layer.stats()["background_state"] in ("stopped", "done")
    with pytest.raises(LayerReadError, match="closed"):
        layer.read(layer.toc.lookup("bin/app"), 0, 1)


def test_restart_on_the_same_cache_dir_reads_with_no_requests(sample_layer, tmp_path, open_layer):
    first, _ = open_layer(sample_layer, cache_=ChunkCache(tmp_path / "c"))
    for name in sample_layer.files:
        entry = first.toc.lookup(name)
        first.read(entry, 0, entry.size)
    first.close()
    second, src = open_layer(sample_layer, cache_=ChunkCache(tmp_path / "c"))
    src.reset_counters()
    for name, data in sample_layer.files.items():
        entry = second.toc.lookup(name)
        assert second.read(entry, 0, entry.size) == data
    assert src.calls == 0
    assert second.fetched_bytes() == 0


def test_layers_sharing_a_chunk_share_the_cache_entry(tmp_path, cache, open_layer):
    shared = random.Random(5).randbytes(200_000)
    a = build_layer(tmp_path / "a", {"a-only": b"A" * 5000, "lib/shared.so": shared})
    b = build_layer(tmp_path / "b", {"b-only": b"B" * 7000, "opt/same-bytes": shared})
    layer_a, src_a = open_layer(a)
    layer_b, src_b = open_layer(b)
    entry_a = layer_a.toc.lookup("lib/shared.so")
    entry_b = layer_b.toc.lookup("opt/same-bytes")
    assert [c.digest for c in entry_a.chunks] == [c.digest for c in entry_b.chunks]
    assert layer_a.read(entry_a, 0, entry_a.size) == shared
    src_b.reset_counters()
    assert layer_b.read(entry_b, 0, entry_b.size) == shared
    assert src_b.calls == 0
    assert layer_a.drain(30)  # the disk write follows the read's return
    assert all(cache.path_for(c.digest).exists() for c in entry_a.chunks)
    fresh = ChunkCache(cache.root)  # nothing in memory: the entries on disk are the shared ones
    assert all(fresh.get(c.digest, c.size) is not None for c in entry_b.chunks)


def test_read_blob_is_byte_exact_and_cached(sample_layer, open_layer):
    layer, src = open_layer(sample_layer, config=lazy_config(blob_block_size=64 << 10, blob_readahead=0))
    blob = sample_layer.path.read_bytes()
    rnd = random.Random(3)
    for _ in range(40):
        off = rnd.randrange(0, len(blob))
        size = rnd.choice([1, 1000, 65536, 200_000])
        assert layer.read_blob(off, size) == blob[off : off + size]
    assert layer.read_blob(0, len(blob) + 10) == blob
    assert layer.read_blob(len(blob), 10) == b""
    src.reset_counters()
    assert layer.read_blob(0, len(blob)) == blob
    assert src.calls == 0


def test_blob_readahead_fetches_the_next_blocks_once(sample_layer, open_layer):
    block = 64 << 10
    layer, src = open_layer(sample_layer, config=lazy_config(blob_block_size=block, blob_readahead=4 * block))
    src.reset_counters()
    layer.read_blob(0, 10)
    assert layer.drain(30)
    assert sorted(src.log) == [(i * block, block) for i in range(5)]
    src.reset_counters()
    blob = sample_layer.path.read_bytes()
    assert layer.read_blob(block, 4 * block) == blob[block : 5 * block]
    assert all(off >= 5 * block for off, _ in src.log)  # nothing re-fetched, only further readahead


def test_sequential_readahead_fetches_next_chunks(sample_layer, open_layer):
    layer, src = open_layer(sample_layer, config=lazy_config(readahead_size=3 * (64 << 10)))
    entry = layer.toc.lookup("bin/app")
    src.reset_counters()
    layer.read(entry, 0, 4096)
    wait_until(lambda: layer.stats()["in_flight"] == 0)
    assert layer.stats()["chunks_fetched"] >= 3
    src.reset_counters()
    data = sample_layer.files["bin/app"]
    assert layer.read(entry, 4096, 2 * (64 << 10)) == data[4096 : 4096 + 2 * (64 << 10)]
    # The readahead this read starts runs on worker threads: let it end, then look at all of it
    # (counting at the moment the read returns depends on how fast those threads are).
    wait_until(lambda: layer.stats()["in_flight"] == 0)
    ahead = entry.chunks[4:6]  # read up to chunk 2, chunk 3 already ahead: the window goes on to 5
    assert set(src.log) <= {(c.blob_offset, c.blob_end - c.blob_offset) for c in ahead}, \
        "only the readahead of what follows, never the chunks just read"


def test_empty_and_non_regular_entries_read_empty(sample_layer, open_layer):
    layer, src = open_layer(sample_layer)
    src.reset_counters()
    assert layer.read(layer.toc.lookup("empty"), 0, 100) == b""
    assert layer.read(layer.toc.lookup("bin"), 0, 100) == b""
    assert layer.read(layer.toc.lookup("small"), 5, 100) == b""
    assert src.calls == 0


def test_background_fetch_waits_while_a_read_is_fetching(sample_layer, open_layer):
    src = FaultySource(sample_layer.path)
    scheduler = WatchedScheduler(quiet_period=0.0)  # only the read in flight can hold it back
    layer, _ = open_layer(sample_layer, source=src, config=lazy_config(background_batch_size=100_000),
                          scheduler=scheduler)
    src.reset_counters()
    src.stall = True
    entry = layer.toc.lookup("bin/app")
    reader = threading.Thread(target=layer.read, args=(entry, 0, 10))
    reader.start()
    wait_until(lambda: src.started == 1)
    layer.start_background_fetch()
    # Either the background batch asked and was told to wait, or (the bug) it went to the source.
    wait_until(lambda: scheduler.refused.is_set() or src.started > 1)
    assert src.started == 1
    src.release.set()
    reader.join()
    assert layer.wait_background(60)
    assert src.started > 1
    assert layer.stats()["background_state"] == "done"


def test_close_wakes_waiting_readers_with_an_error(sample_layer, open_layer):
    src = FaultySource(sample_layer.path)
    layer, _ = open_layer(sample_layer, source=src, config=lazy_config(fetch_timeout=60))
    src.reset_counters()
    src.stall = True
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            layer.read(layer.toc.lookup("bin/app"), 0, 10)
        except LayerReadError as e:
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    wait_until(lambda: src.started == 1)
    layer.close(timeout=0.1)
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])
    src.release.set()


def test_a_broken_cache_disk_does_not_fail_verified_reads(sample_layer, cache, open_layer):
    layer, _ = open_layer(sample_layer, config=lazy_config())
    entry = layer.toc.lookup("usr/lib/lib.so")
    for c in entry.chunks:  # every fan-out directory these chunks need is a file: writes fail
        fan_out = cache.path_for(c.digest).parent
        if not fan_out.exists():
            fan_out.parent.mkdir(parents=True, exist_ok=True)
            fan_out.write_bytes(b"not a directory")
    assert layer.read(entry, 0, entry.size) == sample_layer.files["usr/lib/lib.so"]
    assert layer.drain(30)
    assert layer.stats()["cache_write_errors"] >= 1


def test_a_huge_prefetch_region_is_fetched_in_consecutive_pieces(sample_layer, open_layer):
    piece = 200_000
    layer, src = open_layer(sample_layer, config=lazy_config(no_prefetch=False, prefetch_wait=True, prefetch_request_size=piece))
    landmark = layer.toc.prefetch_landmark_offset
    assert landmark > piece  # the sample's prioritized files are bigger than one piece
    pieces = src.log[1:]
    assert len(pieces) > 1 and all(length <= piece or i == 0 for i, (_, length) in enumerate(pieces))
    assert pieces[0][0] == 0 and sum(length for _, length in pieces) <= landmark
    src.reset_counters()
    for name in ("etc/hello.txt", "usr/lib/lib.so"):
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == sample_layer.files[name]
    assert src.calls == 0


def test_background_fetch_leaves_the_link_alone_right_after_the_layer_opens(sample_layer, open_layer):
    # Between "layer ready" and the container's first read podman creates the container (a quiet
    # second or more); background fetch must not take the link in that gap.
    scheduler = WatchedScheduler(quiet_period=30.0)
    layer, src = open_layer(sample_layer, config=lazy_config(no_background_fetch=False), scheduler=scheduler)
    opened_with = len(src.log)
    # Either the background batch asked and was told to wait, or (the bug) it went to the source.
    wait_until(lambda: scheduler.refused.is_set() or len(src.log) > opened_with)
    assert len(src.log) == opened_with
    assert layer.stats()["background_bytes"] == 0
    assert layer.stats()["background_state"] == "running"
