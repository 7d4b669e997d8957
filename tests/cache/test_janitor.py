"""The cache janitor on a real cache directory: least recently used first, never what is in use,
never a write in progress, and the automatic pass held back while nothing can go."""
from __future__ import annotations

import hashlib
import os
import threading

from stargz_store.cache.chunk_cache import ChunkCache
from stargz_store.cache.janitor import LOW_WATER, CacheJanitor, Protected
from tests.fixtures.waiting import wait_for


def chunk(cache: ChunkCache, text: bytes, used: float) -> str:
    """A chunk of 8 KiB (two 4 KiB blocks on disk), last used at `used` (epoch seconds)."""
    data = text * (8192 // len(text))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache.put(digest, data, keep_in_memory=False)
    os.utime(cache.path_for(digest), (used, used))
    return digest


def test_least_recently_used_go_first_and_protected_ones_never(tmp_path):
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    digests = [chunk(cache, b"%d" % i, used=1_000_000 + i) for i in range(6)]  # oldest first
    keep = {digests[0], digests[1]}  # the two oldest: a layer in use
    janitor = CacheJanitor(cache, lambda: Protected(chunks=frozenset(keep)))
    size = janitor.measure()
    per_file = size // 6
    assert per_file >= 8192

    result = janitor.prune(size - 2 * per_file)  # room for two less
    gone = {d for d in digests if not cache.path_for(d).exists()}
    assert gone == {digests[2], digests[3]}  # the oldest ones not in use
    assert result.removed_files == 2 and result.size_after == size - 2 * per_file
    assert result.in_use_bytes == 2 * per_file and result.evictable_bytes == 4 * per_file

    result = janitor.prune(0)
    assert {d for d in digests if cache.path_for(d).exists()} == keep
    assert result.size_after == result.in_use_bytes == 2 * per_file


def test_writes_in_progress_and_kept_blob_bytes_of_layers_in_use_stay(tmp_path):
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    digest = chunk(cache, b"x", used=1_000_000)
    temp = cache.path_for(digest).parent / f".{digest[7:]}.abc.tmp"
    temp.write_bytes(b"half")
    blob_in_use, blob_unused = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    cache.keep_range(blob_in_use, 0, b"toc" * 100)
    cache.keep_range(blob_unused, 0, b"toc" * 100)
    janitor = CacheJanitor(cache, lambda: Protected(blobs=frozenset({blob_in_use})))
    janitor.prune(0)
    assert temp.exists()
    assert not cache.path_for(digest).exists()
    assert cache.kept_range(blob_in_use, 0, 300) == b"toc" * 100
    assert cache.kept_range(blob_unused, 0, 300) is None
    assert not (cache.root / "blobs" / "bb" / ("b" * 64)).exists()  # its emptied directory too


def test_over_the_limit_a_write_wakes_one_pass_and_a_stuck_cache_warns_once(tmp_path, caplog):
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    first = chunk(cache, b"a", used=1_000_000)
    in_use = {"layers": frozenset({first})}
    passes = threading.Semaphore(0)

    def protected() -> Protected:
        return Protected(chunks=in_use["layers"])

    janitor = CacheJanitor(cache, protected, max_bytes=1, in_use=lambda: in_use["layers"])
    janitor.measure()
    original = janitor.over_limit_pass

    def counted():
        result = original()
        passes.release()
        return result

    janitor.over_limit_pass = counted
    with caplog.at_level("INFO", logger="stargz_store.cache.janitor"):
        janitor.start()
        try:
            assert passes.acquire(timeout=30)  # the first pass, at start: over, and stuck (all in use)
            assert cache.path_for(first).exists()
            assert janitor._stuck == frozenset({first})
            # Nothing in use any more: the stuck janitor notices without a write, and empties the cache.
            in_use["layers"] = frozenset()
            assert passes.acquire(timeout=30)
            assert not cache.path_for(first).exists()
            assert janitor.size == 0 and janitor._stuck is None
        finally:
            janitor.close()
    warnings = [r for r in caplog.records if "stays over its limit" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert any("under its limit" in r.getMessage() for r in caplog.records)
    assert LOW_WATER < 1


def test_backing_files_are_counted_and_go_even_while_their_chunks_are_in_use(tmp_path):
    """Copies for passthrough are never protected: an open one stays readable after its unlink,
    and a later open is served by the (protected) chunks while the copy is made again."""
    from stargz_store.cache.backing_files import BackingFileStore

    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    digest = chunk(cache, b"y", used=1_000_000)
    data = cache.get(digest)
    store = BackingFileStore(cache.root / "files")
    made = store.make(digest[7:], len(data), digest, [data])
    janitor = CacheJanitor(cache, lambda: Protected(chunks=frozenset({digest})))
    size = janitor.measure()
    assert size >= 2 * len(data)  # the chunk and its copy
    fd = store.open(made)
    assert fd is not None
    try:
        result = janitor.prune(0)
        assert result.removed_files == 1 and not os.path.exists(made.path)
        assert cache.path_for(digest).exists()
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert store.open(made) is None and store.get(made.key) is None
    assert (cache.root / "files" / "records.log").exists()


def test_copies_go_before_older_chunks(tmp_path):
    from stargz_store.cache.backing_files import BackingFileStore

    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    old = chunk(cache, b"o", used=1_000_000)  # long unused, but fetched from a registry
    newer = chunk(cache, b"n", used=2_000_000)
    data = cache.get(newer)
    made = BackingFileStore(cache.root / "files").make(newer[7:], len(data), newer, [data])
    janitor = CacheJanitor(cache, lambda: Protected())
    size = janitor.measure()
    result = janitor.prune(size - 1)
    assert result.removed_files == 1 and not os.path.exists(made.path)
    assert cache.path_for(old).exists() and cache.path_for(newer).exists()


def test_a_write_during_a_scan_is_not_lost_from_the_running_size(tmp_path):
    """A chunk written while a scan runs (here: between the listing and the end of the pass) may be
    missing from the listing; the running size must still count it, or the janitor believes the
    cache under its limit while it is over, and sleeps."""
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    first = chunk(cache, b"a", used=1_000_000)
    written: list[str] = []

    def protected() -> Protected:  # called by a pass after its listing of the files
        if not written:
            written.append(chunk(cache, b"b", used=1_000_001))
        return Protected(chunks=frozenset({first}))

    janitor = CacheJanitor(cache, protected, max_bytes=12 << 10)  # room for one 8 KiB chunk, not two
    janitor.measure()
    janitor.prune(None)  # a scan for `status`: the second chunk arrives during it
    assert janitor.size == janitor.measure() == 16 << 10
    result = janitor.over_limit_pass()
    assert result is not None and result.removed_files == 1
    assert cache.path_for(first).exists() and not cache.path_for(written[0]).exists()
    assert janitor.size == 8 << 10


def test_a_scan_for_status_that_finds_the_cache_over_wakes_the_pass(tmp_path):
    """A file the janitor was not told of (written before it counted writes, or by another way)
    is found by the next scan anyone makes: that scan wakes the automatic pass, which must not
    sleep on until its next periodic check."""
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    first = chunk(cache, b"a", used=1_000_000)
    janitor = CacheJanitor(cache, lambda: Protected(chunks=frozenset({first})), max_bytes=12 << 10)
    janitor.start()
    try:
        assert wait_for(lambda: janitor.size == 8 << 10, timeout=30)
        cache.on_write = None  # this write goes uncounted
        other = chunk(cache, b"b", used=1_000_001)
        assert janitor.size == 8 << 10
        janitor.prune(None)
        assert wait_for(lambda: not cache.path_for(other).exists(), timeout=30)
        assert cache.path_for(first).exists()
    finally:
        janitor.close()
