"""Damage on disk is never served: chunk files and blob blocks are checked on every disk read,
and interrupted writes leave nothing a reader could take for data."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from stargz_store.cache import BlobRangeCache, ChunkCache, files
from tests.fixtures.disk_damage import flip_bit


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_flipped_byte_in_a_chunk_file_is_never_served(tmp_path, caplog):
    data = os.urandom(10_000)
    d = digest_of(data)
    ChunkCache(tmp_path).put(d, data)
    cache = ChunkCache(tmp_path)  # a restart: nothing in memory
    flip_bit(cache.path_for(d), 5_000)
    caplog.set_level(logging.WARNING)
    assert cache.get(d, len(data)) is None
    assert not cache.path_for(d).exists()  # removed, so the refetched bytes are written anew
    assert d not in cache.memory
    assert cache.stats()["bad_files"] == 1
    assert cache.get(d, len(data)) is None  # a plain miss now: counted and logged once
    assert cache.stats()["bad_files"] == 1
    assert len([m for m in warnings_of(caplog) if d in m]) == 1
    cache.put(d, data)  # what the caller does with the refetched, verified bytes
    assert ChunkCache(tmp_path).get(d, len(data)) == data


def test_damage_after_an_entry_was_served_is_caught_too(tmp_path):
    # Disk reads are checked every time, not only the first after a write or a start.
    data = os.urandom(4096)
    d = digest_of(data)
    cache = ChunkCache(tmp_path, memory_bytes=0)
    cache.put(d, data)
    assert cache.get(d, len(data)) == data
    flip_bit(cache.path_for(d), 0)
    assert cache.get(d, len(data)) is None
    assert cache.stats()["bad_files"] == 1


def test_a_truncated_chunk_file_is_never_served_even_when_its_size_is_not_given(tmp_path):
    data = os.urandom(8192)
    d = digest_of(data)
    cache = ChunkCache(tmp_path, memory_bytes=0)
    cache.put(d, data)
    path = cache.path_for(d)
    os.truncate(path, 3000)  # a write cut short by a power cut without fsync
    assert cache.get(d) is None
    assert not path.exists()
    cache.put(d, data)
    os.truncate(path, 0)
    assert cache.get(d, len(data)) is None
    assert cache.stats()["bad_files"] == 2


def test_a_chunk_file_holding_another_chunk_is_never_served(tmp_path):
    # A whole-file mix-up (another process writing there): right length, wrong bytes.
    data, other = b"a" * 4096, b"b" * 4096
    d = digest_of(data)
    cache = ChunkCache(tmp_path, memory_bytes=0)
    cache.put(d, data)
    cache.path_for(d).write_bytes(other)
    assert cache.get(d, len(data)) is None


def _block_file(blobs: BlobRangeCache, blob: str) -> Path:
    hexd = blob.split(":")[1]
    [path] = [p for p in (blobs.root / hexd[:2] / hexd).iterdir() if not p.name.startswith((".", "range-"))]
    return path


def test_a_flipped_byte_in_a_blob_block_is_never_served(tmp_path, caplog):
    blob = digest_of(b"the blob")
    block = os.urandom(4096)
    BlobRangeCache(tmp_path).put(blob, 4096, 2, block)
    blobs = BlobRangeCache(tmp_path)
    path = _block_file(blobs, blob)
    assert blobs.get(blob, 4096, 2, 4096) == block
    flip_bit(path, path.stat().st_size - 100)  # in the block's bytes
    caplog.set_level(logging.WARNING)
    assert blobs.get(blob, 4096, 2, 4096) is None
    assert not path.exists() and not blobs.contains(blob, 4096, 2)
    assert blobs.bad_blocks == 1
    assert len(warnings_of(caplog)) == 1
    blobs.put(blob, 4096, 2, block)
    flip_bit(_block_file(blobs, blob), 3)  # in the recorded sha256
    assert blobs.get(blob, 4096, 2, 4096) is None
    blobs.put(blob, 4096, 2, block)
    os.truncate(_block_file(blobs, blob), 10)  # cut short by a power cut
    assert blobs.get(blob, 4096, 2, 4096) is None
    assert blobs.bad_blocks == 3


def test_the_chunk_cache_counts_damaged_blob_blocks(tmp_path):
    cache = ChunkCache(tmp_path)
    blob = digest_of(b"counted")
    cache.blob_cache.put(blob, 1024, 0, b"x" * 1024)
    flip_bit(_block_file(cache.blob_cache, blob), 40)
    assert cache.blob_cache.get(blob, 1024, 0, 1024) is None
    assert cache.stats()["bad_blob_blocks"] == 1


def test_temp_files_of_interrupted_writes_are_swept_from_both_caches(tmp_path):
    cache = ChunkCache(tmp_path)
    data = b"kept chunk" * 10
    d = digest_of(data)
    cache.put(d, data)
    blob = digest_of(b"a blob")
    cache.blob_cache.put(blob, 1024, 0, b"k" * 1024)
    cache.blob_cache.put_range(blob, 10, b"toc bytes")
    # What a crash mid-write leaves: temp files beside the final names, from another process.
    chunk_tmp = cache.path_for(d).parent / f".{cache.path_for(d).name}.0123456789ab.x1y2z3.tmp"
    block_dir = _block_file(cache.blob_cache, blob).parent
    block_tmp = block_dir / ".1024-1.sha256.0123456789ab.q9w8e7.tmp"
    range_tmp = block_dir / ".range-0-9.0123456789ab.r5t6y7.tmp"
    for tmp in (chunk_tmp, block_tmp, range_tmp):
        tmp.write_bytes(b"half written")
    # A write in progress in this process (the daemon sweeps while it serves) is left alone.
    ours = block_dir / f".1024-2.sha256.{files._WRITER_TOKEN}.abc.tmp"
    ours.write_bytes(b"being written")
    assert cache.sweep_temp_files() == 3
    assert not chunk_tmp.exists() and not block_tmp.exists() and not range_tmp.exists()
    assert ours.exists()
    fresh = ChunkCache(tmp_path)
    assert fresh.get(d, len(data)) == data
    assert fresh.blob_cache.get(blob, 1024, 0, 1024) == b"k" * 1024
    assert fresh.blob_cache.get_range(blob, 10, 9) == b"toc bytes"



def test_concurrent_reads_of_one_chunk_share_one_disk_read_and_hash(tmp_path, monkeypatch):
    # The kernel sends a sequential reader's readahead as parallel reads of one chunk: each
    # re-reading and re-hashing it would multiply the cost of verifying disk reads.
    from stargz_store.cache import chunk_cache

    data = os.urandom(1 << 20)
    d = digest_of(data)
    ChunkCache(tmp_path).put(d, data)
    cache = ChunkCache(tmp_path)
    release = threading.Event()
    disk_reads: list[Path] = []
    real_read = chunk_cache.read_if_present

    def slow_disk(path: Path, what: str) -> bytes | None:
        disk_reads.append(path)
        assert release.wait(10)
        return real_read(path, what)

    monkeypatch.setattr(chunk_cache, "read_if_present", slow_disk)
    results: list[bytes | None] = []
    readers = [threading.Thread(target=lambda: results.append(cache.get(d, len(data)))) for _ in range(4)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 10
    while cache.stats().get("shared_disk_reads", 0) < 3:  # three readers wait for the first one's read
        assert time.monotonic() < deadline, "readers did not join the read in progress"
        time.sleep(0.005)
    release.set()
    for t in readers:
        t.join(10)
    assert results == [data] * 4
    assert len(disk_reads) == 1
    assert cache.stats()["disk_hits"] == 1
