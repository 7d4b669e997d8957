"""The disk cache's size: measured, reported, and held under `[store] cache_max_size_gb`.

The cache (`chunks/`, `blobs/`, `files/` under `<root>/cache`) grows with every chunk fetched; nothing in it
is needed for correctness, since every open layer can fetch any chunk again from its registry.
The janitor removes the least recently used files when the cache grows past its limit (down to
`LOW_WATER` of it, so it does not run on every write), and on demand (`prune`, the control
socket's `prune` operation behind `stargz-store prune`).

What must hold:
- never remove what a layer in use needs: the chunks and raw blob blocks of every layer that
  `protected()` names (the daemon names the layers the kernel holds, i.e. a container's overlay
  or an open file, and those with a read in progress) stay, even if the cache then stays over its
  limit (said once at warning level, not on every pass);
- a file written after a scan is never removed by that pass (it is not in the scan); a chunk
  removed just before a reader opens it is a cache miss, and fetched again (never wrong bytes:
  reads verify every chunk, see `chunk_cache`);
- passthrough copies (`files/`, `backing_files`) go before any chunk or block: they are made
  again from local chunks, while a chunk may cost a registry request;
- recency is the file's access or modification time, whichever is later (with `relatime` the
  kernel updates the access time at most once a day after the write, so "least recently used"
  has day granularity for files read again; files never read since written go by write time);
- one pass at a time (`_pass_lock`); the sizes are allocated bytes (`st_blocks`), what `du` says;
- the running size (`size`: the last scan plus the writes counted since) never loses a write: a
  write counted while a scan runs may have missed the scan, so it is added to the scan's total
  (counting one twice costs a pass, which measures again; losing one left the janitor asleep over
  its limit, since only a write or a change in the layers in use wakes it);
- a scan made for someone else (`measure`, `prune`: the `status` operation) that finds the cache
  over its limit wakes the automatic pass, as a write would.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterator

from ..sizes import size_text
from .chunk_cache import ChunkCache

log = logging.getLogger(__name__)

LOW_WATER = 0.9  # an automatic pass removes down to this share of the limit
CHECK_INTERVAL = 600.0  # seconds between re-measurements of the cache (writes are counted in between)
# Over the limit with nothing left to remove (all in use): how often to look whether the layers in use
# changed (cheap: no scan), and how much the cache must grow before writes wake a pass again.
STUCK_CHECK_INTERVAL = 5.0


@dataclass(frozen=True)
class Protected:
    """What a pass must keep: chunk digests and blob digests (raw blocks, kept TOC bytes)."""

    chunks: frozenset[str] = frozenset()
    blobs: frozenset[str] = frozenset()


@dataclass
class CacheFile:
    path: str
    size: int  # allocated bytes
    used: float  # max(atime, mtime)
    digest: str  # the chunk's or the blob's
    kind: str  # "chunk" or "blob"


@dataclass
class PruneResult:
    """What a pass found and did (also the control socket's `prune` and `status` answers)."""

    size_before: int = 0
    size_after: int = 0
    removed_files: int = 0
    removed_bytes: int = 0
    in_use_bytes: int = 0  # bytes of protected files (never removed)
    evictable_bytes: int = 0  # bytes a pass down to 0 could free (before this pass)
    target: int | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"size_before": self.size_before, "size_after": self.size_after, "removed_files": self.removed_files,
                "removed_bytes": self.removed_bytes, "in_use_bytes": self.in_use_bytes,
                "evictable_bytes": self.evictable_bytes, "target": self.target, "errors": self.errors[:10]}


def _digest_of_chunk(name: str) -> str | None:
    return f"sha256:{name}" if len(name) == 64 and not name.startswith(".") else None


class CacheJanitor:
    """Measures the cache and removes least recently used unprotected files; see the module docstring.

    `max_bytes` None: no limit (measures, and prunes only when asked). `protected()` is called at
    each pass, after the scan. `in_use()` is a cheap summary of what `protected()` depends on (the
    layers in use): while the cache is stuck over its limit, a change in it wakes a pass."""

    def __init__(self, cache: ChunkCache, protected: Callable[[], Protected], *, max_bytes: int | None = None,
                 interval: float = CHECK_INTERVAL, on_removed: Callable[[int], None] | None = None,
                 in_use: Callable[[], Hashable] | None = None) -> None:
        self.cache = cache
        self.protected = protected
        self.in_use = in_use or protected
        self.max_bytes = max_bytes
        self.interval = interval
        self.on_removed = on_removed
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()
        self._size: int | None = None  # last measured size plus what was written since
        self._scan_writes: int | None = None  # bytes written since the running scan began (None: no scan)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._warned_over = False
        self._stuck: Hashable | None = None  # `in_use()` when a pass could not get under the limit
        self._wake_above: int | None = max_bytes  # writes wake the thread once the size passes this
        self._thread: threading.Thread | None = None
        cache.on_write = self.written

    # -- accounting -----------------------------------------------------------------------------

    def written(self, nbytes: int) -> None:
        """The cache wrote a new file of `nbytes` (ChunkCache.on_write): wake the pass when over."""
        allocated = (nbytes + 4095) & ~4095  # what the measure counts: allocated blocks, mostly 4 KiB
        with self._lock:
            if self._scan_writes is not None:
                self._scan_writes += allocated
            if self._size is None:
                return
            self._size += allocated
            over = self._wake_above is not None and self._size > self._wake_above
        if over:
            self._wake.set()

    def _scan_began(self) -> None:
        with self._lock:
            self._scan_writes = 0

    def _scan_ended(self, scanned: int) -> None:
        """The size is what a scan found, plus what was written while it ran (see the module
        docstring: a write the scan missed must not be lost)."""
        with self._lock:
            self._size = scanned + (self._scan_writes or 0)
            self._scan_writes = None

    def _wake_if_over(self) -> None:
        """Wake the automatic pass when the running size is past what wakes it."""
        with self._lock:
            over = self._size is not None and self._wake_above is not None and self._size > self._wake_above
        if over:
            self._wake.set()

    @property
    def size(self) -> int | None:
        """The cache's size in bytes as last measured plus writes since (None before the first scan)."""
        with self._lock:
            return self._size

    def files(self) -> Iterator[CacheFile]:
        """Every complete file of the cache (temp files of writes in progress left out)."""
        for kind, top in (("chunk", self.cache.chunk_dir), ("blob", self.cache.root / "blobs"),
                          ("file", self.cache.root / "files")):
            try:
                fans = list(os.scandir(top))
            except FileNotFoundError:
                continue
            for fan in fans:
                if not fan.is_dir(follow_symlinks=False):
                    continue
                if kind == "chunk":
                    yield from self._chunk_files(fan.path)
                elif kind == "file":
                    yield from self._backing_files(fan.path)
                else:
                    yield from self._blob_files(fan.path)

    def _chunk_files(self, directory: str) -> Iterator[CacheFile]:
        for entry in _scandir(directory):
            digest = _digest_of_chunk(entry.name)
            if digest is None:
                continue
            st = _stat(entry)
            if st is not None:
                yield CacheFile(entry.path, st.st_blocks * 512, max(st.st_atime, st.st_mtime), digest, "chunk")

    def _backing_files(self, directory: str) -> Iterator[CacheFile]:
        """Backing files for passthrough (`backing_files`): copies of cached chunks, never
        protected (a file open by passthrough stays readable after its unlink; a later open is
        served by chunks and the copy made again)."""
        for entry in _scandir(directory):
            if entry.name.startswith("."):
                continue
            st = _stat(entry)
            if st is not None:
                yield CacheFile(entry.path, st.st_blocks * 512, max(st.st_atime, st.st_mtime), "", "file")

    def _blob_files(self, directory: str) -> Iterator[CacheFile]:
        for blob in _scandir(directory):
            if not blob.is_dir(follow_symlinks=False) or len(blob.name) != 64:
                continue
            digest = f"sha256:{blob.name}"
            for entry in _scandir(blob.path):
                if entry.name.startswith(".") or entry.name.endswith(".tmp"):
                    continue
                st = _stat(entry)
                if st is not None:
                    yield CacheFile(entry.path, st.st_blocks * 512, max(st.st_atime, st.st_mtime), digest, "blob")

    def measure(self) -> int:
        """Scan the cache and return its size (kept as `size`, with the writes made meanwhile)."""
        with self._pass_lock:
            self._scan_began()
            total = sum(f.size for f in self.files())
            self._scan_ended(total)
        self._wake_if_over()
        return total

    # -- passes ---------------------------------------------------------------------------------

    def prune(self, target: int | None) -> PruneResult:
        """Remove least recently used unprotected files until the cache is at most `target`
        bytes (0: everything unprotected; None: only measure). Wakes the automatic pass when
        the cache is still over its limit (`status` scans with this)."""
        result = self._prune(target)[0]
        self._wake_if_over()
        return result

    def _prune(self, target: int | None) -> tuple[PruneResult, Hashable]:
        with self._pass_lock:
            self._scan_began()
            files = list(self.files())
            in_use = self.in_use()
            keep = self.protected()
            result = PruneResult(target=target)
            result.size_before = sum(f.size for f in files)
            candidates = []
            for f in files:
                if (f.digest in keep.chunks) if f.kind == "chunk" else (f.digest in keep.blobs):
                    result.in_use_bytes += f.size
                else:
                    candidates.append(f)
            result.evictable_bytes = sum(f.size for f in candidates)
            size = result.size_before
            if target is not None and size > target:
                candidates.sort(key=lambda f: (f.kind != "file", f.used))  # copies first: made again locally
                for f in candidates:
                    if size <= target:
                        break
                    try:
                        os.unlink(f.path)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        result.errors.append(f"{f.path}: {e.strerror}")
                        continue
                    size -= f.size
                    result.removed_files += 1
                    result.removed_bytes += f.size
                self._remove_empty_blob_dirs()
            result.size_after = size
            self._scan_ended(size)
            if result.removed_bytes and self.on_removed is not None:
                self.on_removed(result.removed_bytes)
            return result, in_use

    def _remove_empty_blob_dirs(self) -> None:
        blobs = self.cache.root / "blobs"
        for fan in _scandir(str(blobs)):
            for blob in _scandir(fan.path):
                try:
                    os.rmdir(blob.path)  # only when empty
                except OSError:
                    pass

    def over_limit_pass(self) -> PruneResult | None:
        """One automatic pass: when over `max_bytes`, down to `LOW_WATER` of it."""
        if self.max_bytes is None:
            return None
        size = self.size
        if size is None:
            size = self.measure()
        if size <= self.max_bytes:
            # Under it (things were removed some other way): writes wake a pass again as soon as
            # the cache is over, not only past the mark of an earlier stuck pass.
            self._stuck = None
            with self._lock:
                self._wake_above = self.max_bytes
            return None
        began = time.monotonic()
        result, in_use = self._prune(int(self.max_bytes * LOW_WATER))
        log.info("cache over its limit of %s: removed %d file(s), %s, in %.1f s; now %s (%s in use)",
                 size_text(self.max_bytes), result.removed_files, size_text(result.removed_bytes),
                 time.monotonic() - began, size_text(result.size_after), size_text(result.in_use_bytes))
        if result.size_after > self.max_bytes:
            self._stuck = in_use
            with self._lock:  # not a pass per write while nothing can go: again after 10% of growth
                self._wake_above = result.size_after + int(self.max_bytes * (1 - LOW_WATER))
            if not self._warned_over:
                self._warned_over = True
                log.warning("cache stays over its limit of %s: %s are chunks of layers in use (not removed); "
                            "raise [store] cache_max_size_gb or stop containers", size_text(self.max_bytes),
                            size_text(result.in_use_bytes))
        else:
            self._stuck = None
            with self._lock:
                self._wake_above = self.max_bytes
            if self._warned_over:
                self._warned_over = False
                log.info("cache is under its limit of %s again", size_text(self.max_bytes))
        self._wake_if_over()  # written while the pass ran, past what wakes the next one
        return result

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> CacheJanitor:
        self._thread = threading.Thread(target=self._run, name="cache-janitor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        try:
            size = self.measure()
            log.info("disk cache %s: %s%s", self.cache.root, size_text(size),
                     f" (limit {size_text(self.max_bytes)})" if self.max_bytes is not None else "")
        except OSError as e:
            log.warning("cannot measure the disk cache %s: %s", self.cache.root, e)
        while not self._stop.is_set():
            self._wake.clear()  # what woke us is covered by this pass; a write during it wakes the next
            try:
                self.over_limit_pass()
            except Exception:
                log.exception("cache janitor pass failed")
            woken = self._wait()
            if not woken and not self._stop.is_set():
                try:
                    self.measure()  # writes are counted, but files also go other ways (damage, a second store)
                except OSError:
                    pass

    def _wait(self) -> bool:
        """Until woken (True), or the check interval passed (False). While stuck over the limit,
        also returns (True) as soon as the layers in use are no longer those of the stuck pass
        (a container stopped, an image was removed): their chunks may go now."""
        if self._stop.is_set():
            return True
        stuck = self._stuck
        if stuck is None:
            woken = self._wake.wait(self.interval)
            self._wake.clear()
            return woken
        deadline = time.monotonic() + self.interval
        while time.monotonic() < deadline:
            if self._wake.wait(STUCK_CHECK_INTERVAL):
                self._wake.clear()
                return True
            try:
                if self.in_use() != stuck:
                    return True
            except Exception:
                log.exception("cache janitor: listing the layers in use failed")
        return False


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _stat(entry: os.DirEntry) -> os.stat_result | None:
    try:
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
