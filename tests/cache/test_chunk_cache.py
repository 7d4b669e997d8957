"""ChunkCache and BlobRangeCache on a real directory."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest

from stargz_store.cache import BlobRangeCache, CacheKeyError, ChunkCache, MemoryLru


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_put_get_roundtrip_with_fanout_layout(tmp_path):
    cache = ChunkCache(tmp_path)
    data = os.urandom(10_000)
    d = digest_of(data)
    assert cache.get(d) is None
    assert not cache.contains(d)
    cache.put(d, data)
    hexd = d.split(":")[1]
    path = tmp_path / "chunks" / hexd[:2] / hexd
    assert path.read_bytes() == data
    assert cache.get(d) == data
    assert cache.contains(d)
    # no temp file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == [hexd]


def test_entries_survive_a_new_instance(tmp_path):
    data = b"persisted" * 100
    d = digest_of(data)
    ChunkCache(tmp_path).put(d, data)
    fresh = ChunkCache(tmp_path)
    assert fresh.get(d, len(data)) == data
    assert fresh.stats()["disk_hits"] == 1


def test_memory_hit_does_not_touch_disk(tmp_path):
    cache = ChunkCache(tmp_path, memory_bytes=1 << 20)
    data = b"hot" * 1000
    d = digest_of(data)
    cache.put(d, data)
    cache.path_for(d).unlink()
    assert cache.get(d) == data
    assert cache.stats()["memory_hits"] == 1


def test_keep_in_memory_false_stays_on_disk_only(tmp_path):
    cache = ChunkCache(tmp_path)
    data = b"cold" * 1000
    d = digest_of(data)
    cache.put(d, data, keep_in_memory=False)
    assert len(cache.memory) == 0
    assert cache.get(d, keep_in_memory=False) == data
    assert len(cache.memory) == 0


def test_wrong_length_file_is_a_miss_and_removed(tmp_path):
    cache = ChunkCache(tmp_path, memory_bytes=0)
    data = b"x" * 4096
    d = digest_of(data)
    cache.put(d, data)
    cache.path_for(d).write_bytes(b"")  # what a crash without fsync could leave
    assert cache.get(d, len(data)) is None
    assert not cache.path_for(d).exists()
    assert cache.stats()["bad_files"] == 1


@pytest.mark.parametrize("key", ["", "sha256:abc", "sha512:" + "0" * 64, "sha256:../" + "0" * 61, "0" * 64])
def test_non_digest_keys_are_refused(tmp_path, key):
    cache = ChunkCache(tmp_path)
    with pytest.raises(CacheKeyError):
        cache.put(key, b"data")
    with pytest.raises(CacheKeyError):
        cache.get(key)


def test_memory_lru_is_bounded_in_bytes_and_evicts_oldest():
    lru = MemoryLru(4000)
    for i in range(10):
        lru.put(f"k{i}", bytes(1000))
        assert lru.size_bytes <= 4000
    assert lru.get("k9") is not None
    assert lru.get("k0") is None
    lru.get("k6")  # touch: now most recent
    lru.put("k10", bytes(1000))
    assert lru.get("k6") is not None
    assert lru.get("k7") is None


def test_memory_lru_skips_values_too_big_to_share():
    lru = MemoryLru(4000)
    lru.put("small", bytes(100))
    lru.put("huge", bytes(3000))
    assert lru.get("huge") is None
    assert lru.get("small") is not None


def test_concurrent_puts_and_gets_are_consistent(tmp_path):
    cache = ChunkCache(tmp_path, memory_bytes=64 << 10)
    payloads = [os.urandom(3000 + i) for i in range(40)]
    digests = [digest_of(p) for p in payloads]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for k in range(200):
                i = (seed * 7 + k) % len(payloads)
                cache.put(digests[i], payloads[i])
                got = cache.get(digests[i], len(payloads[i]))
                assert got == payloads[i]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    leftovers = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []
    assert cache.stats()["memory_bytes"] <= 64 << 10


def test_blob_range_cache_roundtrip_and_length_check(tmp_path):
    blobs = BlobRangeCache(tmp_path)
    blob = digest_of(b"the blob")
    assert blobs.get(blob, 1024, 0, 1024) is None
    blobs.put(blob, 1024, 3, b"a" * 1024)
    assert blobs.contains(blob, 1024, 3)
    assert blobs.get(blob, 1024, 3, 1024) == b"a" * 1024
    assert blobs.get(blob, 2048, 3, 1024) is None  # another block size never mixes
    assert blobs.get(blob, 1024, 3, 1000) is None  # wrong length: discarded
    assert not blobs.contains(blob, 1024, 3)


def test_chunk_cache_owns_a_blob_cache_under_its_root(tmp_path):
    cache = ChunkCache(tmp_path)
    assert cache.blob_cache.root == tmp_path / "blobs"
    assert cache.blob_cache is cache.blob_cache


def test_sweep_removes_only_temp_files(tmp_path):
    cache = ChunkCache(tmp_path)
    data = b"kept" * 10
    d = digest_of(data)
    cache.put(d, data)
    leftover = cache.path_for(d).parent / f".{cache.path_for(d).name}.abc123.tmp"
    leftover.write_bytes(b"half a chu")
    assert cache.sweep_temp_files() == 1
    assert not leftover.exists()
    assert ChunkCache(tmp_path).get(d) == data


def test_contains_does_not_refresh_recency(tmp_path):
    cache = ChunkCache(tmp_path, memory_bytes=4000)
    a, b = b"a" * 1000, b"b" * 1000
    cache.put(digest_of(a), a)
    for i in range(3):
        filler = bytes([i]) * 1000
        cache.put(digest_of(filler), filler)
    assert cache.contains(digest_of(a))  # on disk; memory order untouched
    cache.put(digest_of(b), b)  # evicts the least recent: a
    assert digest_of(a) not in cache.memory
