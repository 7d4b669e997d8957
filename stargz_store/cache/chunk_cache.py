"""Content-addressed cache of verified, uncompressed chunks: on disk, plus a memory LRU of hot ones.

Keyed by the chunk's sha256 digest, so every layer and image that holds the same bytes shares one
entry, and an entry can never hold the bytes of another chunk. Layout under `root`:

    chunks/<hex[0:2]>/<hex>          one file per chunk, its exact uncompressed bytes
    chunks/<hex[0:2]>/.<hex>.*.tmp   a write in progress (same directory, so the rename is atomic),
                                     or left by an interrupted one (`sweep_temp_files`)
    blobs/...                        raw blob ranges (`BlobRangeCache`, see blob_cache.py)

Trust model (decided here, documented once): nothing read from disk is trusted. `put` is only
called with bytes the caller has verified against the digest (the format's `decompress_chunk`
hashes them), and a file appears under its final name only by an atomic rename of a complete temp
file; but a file can still change after it was written (a bit flip, a bad sector, a short or
zeroed file after a power cut without `fsync`, another process writing there). So `get` hashes
every chunk it reads from disk (sha256) and serves it, or puts it in the memory LRU, only when it
matches its digest and the expected size; a bad file is removed, counted (`bad_files`), logged at
warning, and missed, so the caller fetches the chunk again. The memory LRU only ever holds bytes
that were verified (fetched and hashed, or read and hashed), so its hits are not hashed again.
Every disk read is hashed, not only the first after a write or a start. Measured with `python -m
benchmarks store` (2026-12, 2 cores shared at load 5-20, so the daemon's CPU time is the figure to
trust): sha256 costs ~0.13 s of CPU per 200 MiB read from disk; concurrent reads of one chunk (the
kernel's readahead) share one read and one hash, which saves about as much. The daemon's CPU for
the warm 200 MiB read was 0.31-0.46 s in 5 runs, against 0.29-0.51 s unverified (7 runs) and
0.83-0.85 s verified without the sharing; the warm walk of 20,000 small files took 5.1-8.4 s of
CPU against 5.5-9.1 s. "First read after a write or a start" costs the same on that pass (it is
the first read after the write) and saves only on later disk reads, for a record per chunk that
grows with the cache, and it misses damage done while the daemon runs.

The disk cache is never evicted by this class; `janitor.CacheJanitor` measures it and holds it
under `[store] cache_max_size_gb` (it learns of each new file through `on_write`). Memory use is bounded by `memory_bytes` (hot chunks) plus `RECENT_BLOCKS_BYTES`.

The API has two paths. The chunk path (`get`, `put`, `hold`) keeps hot verified chunks in the
memory LRU. The direct path never touches that LRU: raw blob blocks (`get_block`, `put_block`:
the ALS `blob` file, read whole and once by a push or save) go to disk and to a small buffer of
recent blocks of their own, and a caller that fetches in bulk (background fetch, prefetch) passes
`keep_in_memory=False`, so neither evicts the chunks a running container reads again and again
(the Go store's `cache.Direct()`). The bytes a TOC was read from are kept on disk
(`kept_range`, `keep_range`, `forget_range`). Nothing outside this package reaches into
`memory` or `blob_cache`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from .blob_cache import BlobRangeCache
from .files import atomic_write, digest_hex, read_if_present, sweep_temp_files, unlink_quietly

log = logging.getLogger(__name__)

# Raw blob blocks recently read or fetched (direct path): a `blob` file is read in 128 KiB pieces,
# so each 1 MiB block is asked for eight times in a row; without this each would re-read and
# re-hash the block file. Separate from the chunk LRU, so a push never evicts hot chunks.
RECENT_BLOCKS_BYTES = 8 << 20


class MemoryLru:
    """A byte-bounded LRU of immutable values. Values larger than a quarter of the bound are not
    kept, so one huge chunk cannot flush every hot small one."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def accepts(self, size: int) -> bool:
        """Whether a value of `size` bytes would be kept at all."""
        return size <= self.max_bytes // 4

    def put(self, key: str, value: bytes) -> None:
        if not self.accepts(len(value)):
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def __contains__(self, key: str) -> bool:
        """Membership without refreshing the entry's recency."""
        with self._lock:
            return key in self._items

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class _DiskLoad:
    """One disk read (and hash) of a chunk in progress. `running` is held by the reader until
    `data` is set (a lock, not an Event: every small file of a walk makes one, and an Event costs
    more than ten times as much)."""

    __slots__ = ("data", "running")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.running = threading.Lock()
        self.running.acquire()

    def wait(self) -> bytes | None:
        with self.running:
            return self.data


class ChunkCache:
    """Verified uncompressed chunks by digest; thread-safe; shared by all layers of a daemon.

    `fsync=True` makes `put` durable before it returns (slower; off by default like the Go
    store's `sync_add`): without it a crash can leave a short or zeroed file, which `get` detects
    like any other damage.
    """

    def __init__(
        self,
        root: Path,
        *,
        memory_bytes: int = 64 << 20,
        fsync: bool = False,
    ) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self._chunk_dir_str = str(self.chunk_dir)
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.memory = MemoryLru(memory_bytes)
        self._recent_blocks = MemoryLru(RECENT_BLOCKS_BYTES)
        self._blob_cache: BlobRangeCache | None = None
        self._blob_cache_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(("memory_hits", "disk_hits", "shared_disk_reads", "misses", "puts", "bad_files"), 0)
        self._loads: dict[str, _DiskLoad] = {}  # digest -> the disk read in progress
        self._loads_lock = threading.Lock()
        self.on_write: Callable[[int], None] | None = None  # told the size of each new file (the janitor)

    @property
    def blob_cache(self) -> BlobRangeCache:
        """Raw blob ranges for the ALS `blob` file, under `<root>/blobs`."""
        with self._blob_cache_lock:
            if self._blob_cache is None:
                self._blob_cache = BlobRangeCache(self.root / "blobs", fsync=self.fsync)
            return self._blob_cache

    def path_for(self, digest: str) -> Path:
        hexd = digest_hex(digest)
        return self.chunk_dir / hexd[:2] / hexd

    def _file_of(self, digest: str) -> str:
        """`path_for` as a string: the hot paths' form (building a Path costs 6x the `stat`)."""
        hexd = digest_hex(digest)
        return f"{self._chunk_dir_str}/{hexd[:2]}/{hexd}"

    def get(self, digest: str, size: int | None = None, *, keep_in_memory: bool = True) -> bytes | None:
        """The chunk's bytes, verified against `digest` (and `size`, when known), or None.

        Concurrent gets of one chunk that is not in memory share one disk read and one hash (the
        kernel sends a sequential reader's readahead as several parallel reads of one chunk)."""
        data = self.memory.get(digest)
        if data is not None:
            self._count("memory_hits")
            return data
        with self._loads_lock:
            load = self._loads.get(digest)
            leading = load is None
            if leading:
                load = self._loads[digest] = _DiskLoad()
        if not leading:
            self._count("shared_disk_reads")
            return load.wait()
        try:
            load.data = self._read_verified(digest, size, keep_in_memory)
        finally:
            with self._loads_lock:
                del self._loads[digest]
            load.running.release()
        return load.data

    def _read_verified(self, digest: str, size: int | None, keep_in_memory: bool) -> bytes | None:
        path = self._file_of(digest)
        data = read_if_present(path, "chunk cache")
        if data is None:
            self._count("misses")
            return None
        if size is not None and len(data) != size:
            problem = f"{len(data)} bytes, expected {size}"
        elif hashlib.sha256(data).hexdigest() != path.rpartition("/")[2]:  # (its name is the hex digest)
            problem = "its bytes do not hash to its digest"
        else:
            self._count("disk_hits")
            if keep_in_memory:
                self.memory.put(digest, data)
            return data
        log.warning("chunk cache: discarding damaged entry %s: %s; it will be fetched again", digest, problem)
        self._count("bad_files")
        self._count("misses")
        unlink_quietly(Path(path))
        return None

    def contains(self, digest: str) -> bool:
        """Whether the chunk is in memory or has a file (not hashed: only to skip a fetch ahead of
        need; `get` checks what it serves)."""
        return digest in self.memory or os.path.exists(self._file_of(digest))

    def put(self, digest: str, data: bytes, *, keep_in_memory: bool = True) -> None:
        """Store bytes the caller has verified against `digest`. Idempotent; concurrent puts of the
        same digest are harmless (same bytes, last rename wins)."""
        path = self._file_of(digest)  # (refuses a key that is not a sha256 digest)
        if keep_in_memory:
            self.memory.put(digest, bytes(data))
        if os.path.exists(path):
            return
        atomic_write(Path(path), data, fsync=self.fsync)
        self._count("puts")
        self._written(len(data))

    def hold(self, digest: str, data: bytes) -> None:
        """Keep verified bytes in the memory LRU only (a disk write of them follows, or they are
        made locally, like a zstd:chunked hole). No-op for a chunk larger than `holds` allows."""
        self.memory.put(digest, data)

    def holds(self, size: int) -> bool:
        """Whether the memory LRU keeps a chunk of `size` bytes at all."""
        return self.memory.accepts(size)

    def in_memory(self, digest: str) -> bool:
        """Whether the chunk is in the memory LRU (its recency is not refreshed)."""
        return digest in self.memory

    def clear_memory(self) -> None:
        """Drop everything held in memory (hot chunks, recent raw blocks); the disk stays."""
        self.memory.clear()
        self._recent_blocks.clear()

    def discard(self, digest: str) -> None:
        """Forget a chunk (memory and disk)."""
        self.memory.discard(digest)
        unlink_quietly(self.path_for(digest))

    # ---- direct path: raw blob blocks and kept TOC bytes (never in the chunk LRU) ----------------

    def get_block(self, blob_digest: str, block_size: int, index: int, length: int) -> bytes | None:
        """Block `index` of a blob as received (from the recent buffer, else the disk, where it
        is checked against the sha256 recorded when it arrived), or None."""
        key = _block_key(blob_digest, block_size, index)
        data = self._recent_blocks.get(key)
        if data is None:
            data = self.blob_cache.get(blob_digest, block_size, index, length)
            if data is not None:
                self._recent_blocks.put(key, data)
        return data

    def put_block(self, blob_digest: str, block_size: int, index: int, data: bytes) -> None:
        """Keep a block as received from the registry: on disk (raises OSError when that fails)
        and in the recent buffer."""
        self._recent_blocks.put(_block_key(blob_digest, block_size, index), data)
        self.blob_cache.put(blob_digest, block_size, index, data)
        self._written(len(data))

    def has_block(self, blob_digest: str, block_size: int, index: int) -> bool:
        """Whether a block is kept (not checked: only to skip a fetch ahead; `get_block` checks)."""
        return (_block_key(blob_digest, block_size, index) in self._recent_blocks
                or self.blob_cache.contains(blob_digest, block_size, index))

    def kept_range(self, blob_digest: str, offset: int, length: int) -> bytes | None:
        """Bytes of a blob kept by `keep_range` (the caller re-authenticates them)."""
        return self.blob_cache.get_range(blob_digest, offset, length)

    def keep_range(self, blob_digest: str, offset: int, data: bytes) -> None:
        self.blob_cache.put_range(blob_digest, offset, data)
        self._written(len(data))

    def _written(self, nbytes: int) -> None:
        on_write = self.on_write
        if on_write is not None:
            on_write(nbytes)

    def forget_range(self, blob_digest: str, offset: int, length: int) -> None:
        self.blob_cache.discard_range(blob_digest, offset, length)

    def sweep_temp_files(self) -> int:
        """Remove the temp files interrupted writes left in the chunk and blob caches (never
        visible under a final name); returns how many. Safe while the cache is in use: writes in
        progress in this process are left alone. The daemon runs it once at start."""
        chunk_dirs = [d for d in self.chunk_dir.iterdir() if d.is_dir()]
        files = self.root / "files"  # backing files for passthrough (`backing_files`)
        file_dirs = [d for d in files.iterdir() if d.is_dir()] if files.is_dir() else []
        return sweep_temp_files([*chunk_dirs, *self.blob_cache.blob_dirs(), *file_dirs], "cache")

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            out = dict(self._stats)
        out["memory_entries"] = len(self.memory)
        out["memory_bytes"] = self.memory.size_bytes
        out["bad_blob_blocks"] = self.blob_cache.bad_blocks
        return out

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1


def _block_key(blob_digest: str, block_size: int, index: int) -> str:
    return f"{blob_digest}/{block_size}/{index}"
