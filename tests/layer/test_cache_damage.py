"""A damaged disk cache under a Layer: the right bytes are served, fetched again from the source."""
from __future__ import annotations

from stargz_store.cache import ChunkCache
from tests.fixtures.disk_damage import flip_bit

from .conftest import lazy_config


def test_a_flipped_byte_in_a_cached_chunk_is_fetched_again_not_served(sample_layer, cache, open_layer):
    name = "usr/lib/lib.so"
    want = sample_layer.files[name]
    layer, src = open_layer(sample_layer)
    entry = layer.toc.lookup(name)
    assert layer.read(entry, 0, entry.size) == want
    assert layer.drain(30)  # the disk writes follow the read's return
    damaged = entry.chunks[1]
    flip_bit(cache.path_for(damaged.digest), damaged.size // 2)
    cache.clear_memory()  # the memory LRU only holds verified bytes; make the next read go to disk
    src.reset_counters()
    assert layer.read(entry, 0, entry.size) == want
    assert src.log == [(damaged.blob_offset, damaged.blob_end - damaged.blob_offset)]  # that chunk only
    assert cache.stats()["bad_files"] == 1
    assert layer.drain(30)
    assert cache.path_for(damaged.digest).read_bytes() == want[damaged.file_offset : damaged.file_offset + damaged.size]


def test_damaged_chunks_found_after_a_restart_are_fetched_again(sample_layer, tmp_path, open_layer):
    name = "bin/app"
    want = sample_layer.files[name]
    first, _ = open_layer(sample_layer, cache_=ChunkCache(tmp_path / "c"))
    entry = first.toc.lookup(name)
    assert first.read(entry, 0, entry.size) == want
    first.close()
    fresh = ChunkCache(tmp_path / "c")
    for c in entry.chunks:  # a bit flip in every chunk of the file, and one chunk cut short
        flip_bit(fresh.path_for(c.digest), 0)
    last = fresh.path_for(entry.chunks[-1].digest)
    last.write_bytes(last.read_bytes()[:100])
    second, src = open_layer(sample_layer, cache_=fresh)
    src.reset_counters()
    assert second.read(entry, 0, entry.size) == want
    assert src.bytes_read == entry.chunks[-1].blob_end - entry.chunks[0].blob_offset  # every chunk again
    assert fresh.stats()["bad_files"] == len(entry.chunks)


def test_a_damaged_blob_block_is_fetched_again_not_served(sample_layer, cache, open_layer):
    block = 64 << 10
    layer, src = open_layer(sample_layer, config=lazy_config(blob_block_size=block, blob_readahead=0))
    blob = sample_layer.path.read_bytes()
    assert layer.read_blob(0, len(blob)) == blob
    hexd = layer.blob_digest.split(":")[1]
    block_files = sorted(p for p in (cache.blob_cache.root / hexd[:2] / hexd).iterdir() if p.name.split(".")[0] == f"{block}-1")
    assert len(block_files) == 1
    flip_bit(block_files[0], block_files[0].stat().st_size - 1)
    cache.clear_memory()
    src.reset_counters()
    assert layer.read_blob(0, len(blob)) == blob
    assert src.log == [(block, block)]
    assert cache.stats()["bad_blob_blocks"] == 1
