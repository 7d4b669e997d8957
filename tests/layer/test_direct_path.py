"""The cache's direct path (issue 12, point 2): a push or save reading the raw `blob` file, and a
background fetch bringing in a whole layer, leave the memory LRU of hot chunks alone."""
from __future__ import annotations

from stargz_store.cache import ChunkCache

from .conftest import lazy_config


def test_raw_blob_reads_and_background_fetch_do_not_evict_hot_chunks(sample_layer, tmp_path, open_layer):
    cache = ChunkCache(tmp_path / "c", memory_bytes=1 << 20)  # room for the hot files, not for the blob
    config = lazy_config(blob_block_size=64 << 10, background_batch_size=100_000, background_quiet_period=0.0)
    layer, src = open_layer(sample_layer, config=config, cache_=cache)
    hot = [layer.toc.lookup(name) for name in ("etc/hello.txt", "usr/lib/lib.so")]
    for entry in hot:  # what a running container reads again and again
        assert layer.read(entry, 0, entry.size) == sample_layer.files[entry.name]
    assert layer.drain(30)
    digests = [c.digest for e in hot for c in e.chunks]
    assert all(cache.in_memory(d) for d in digests)
    held = cache.stats()["memory_bytes"]

    blob = sample_layer.path.read_bytes()
    assert len(blob) > 1 << 20  # more than the whole memory LRU
    assert layer.read_blob(0, len(blob)) == blob  # podman push: the whole blob, once
    layer.start_background_fetch()
    assert layer.wait_background(60) and layer.background_state == "done"

    assert all(cache.in_memory(d) for d in digests)
    assert cache.stats()["memory_bytes"] == held  # nothing of the blob or the rest of the layer joined them
    src.reset_counters()
    for entry in hot:
        assert layer.read(entry, 0, entry.size) == sample_layer.files[entry.name]
    assert src.calls == 0
