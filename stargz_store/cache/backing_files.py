"""Whole-file copies of fully cached regular files, for FUSE passthrough (the kernel reads them).

The chunk cache keeps verified chunks, and every chunk read from disk is hashed again
(`chunk_cache`). A file the kernel reads directly (passthrough) is never seen by the store, so it
cannot be hashed per read; what it reads must be right when it is made and must not have changed
since. So:

- a backing file is made only from chunks read through `ChunkCache.get` (each hashed on the way)
  and, while it is written, hashed as a whole against the file's TOC digest (when the TOC has
  one) and checked against its size; it appears under its final name only by an atomic rename of
  that complete, checked temp file (`.<hex>.*.tmp` beside it);
- it is root's, mode 0400, in directories only root may enter (`files/` is 0700), so no other
  user can write it, replace it, or read it past the FUSE mount's permission checks;
- its identity when it was finished (size, mtime, ctime, inode, device) and the boot it was
  made in are recorded (`records.log`, one line per file). `open` opens it and compares the
  open file's `fstat` with the record: a write, truncation, `chmod`, `touch` or replacement
  after the fact changes one of them (ctime cannot be set back from user space), and the file is
  then removed and made again from verified chunks. A record from another boot is not trusted
  (a power cut may have lost data written without `fsync`): that file is removed and made again.

What this does not detect (README "Security model"): a change of the bytes that leaves the inode
untouched (a bit flip on the medium, a bad sector, root writing the block device). fs-verity
would (the kernel then checks every page against a Merkle tree on read), but this kernel is built
without it; without it, chunk reads stay the only path hashed on every read.

Layout under `root` (`<store root>/cache/files`): `<key[-2:]>/<key>` (key: the hex of the file's content
digest, else `chunks-<hex>` of a digest of its chunk list) and `records.log`. Temp files of an
interrupted copy are swept with the chunk cache's (`ChunkCache.sweep_temp_files`). Thread-safe.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .files import _WRITER_TOKEN, digest_hex

log = logging.getLogger(__name__)

MODE = 0o400
RECORDS = "records.log"
MAX_RECORDS = 1 << 20  # files recorded (~150 bytes of memory each); past it a file is simply not passed through


class BackingFileError(Exception):
    """A backing file could not be made: a chunk is missing, or the bytes do not verify."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Identity:
    """What `fstat` says of a finished backing file; any change means it was touched. Kept in
    memory packed (`packed`, 40 bytes: a record per cached file adds up)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    @property
    def packed(self) -> bytes:
        return _PACKED.pack(self.size, self.mtime_ns, self.ctime_ns, self.ino, self.dev)

    @classmethod
    def unpack(cls, packed: bytes) -> Identity:
        return cls(*_PACKED.unpack(packed))


_PACKED = struct.Struct("<QqqQQ")


@dataclass(frozen=True, slots=True)
class BackingFile:
    """A finished backing file: `path`, and how to open it checked (`BackingFileStore.open`)."""

    key: str
    path: str
    size: int


class BackingFileStore:
    """Verified whole-file copies by key (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._records: dict[str, bytes] = {}  # key -> Identity.packed
        self._lock = threading.Lock()
        self._boot = _boot_id()
        self._log_path = self.root / RECORDS
        self._log_read = 0  # bytes of the records file read so far
        self._stats = dict.fromkeys(("made", "bad_files", "opened"), 0)
        self._load_records()

    # -- keys and paths -------------------------------------------------------------------------

    @staticmethod
    def key_for(file_digest: str, chunk_digests: Iterable[str], size: int) -> str:
        """The key of a file: its content digest's hex, else a digest of its chunks (same bytes)."""
        if file_digest:
            try:
                return digest_hex(file_digest)
            except ValueError:
                pass
        h = hashlib.sha256(f"chunks {size}".encode())
        for d in chunk_digests:
            h.update(d.encode())
        return "chunks-" + h.hexdigest()

    def path_for(self, key: str) -> str:
        return f"{self.root}/{key[-2:]}/{key}"

    # -- lookups --------------------------------------------------------------------------------

    def get(self, key: str) -> BackingFile | None:
        """The finished backing file `key`, if one was recorded this boot (not opened: see `open`).
        A key not known here is looked for in records another process (the one serving before a
        restart or a crash, while this one was waiting) appended since they were read."""
        with self._lock:
            ident = self._records.get(key)
            if ident is None and self._read_new_records():
                ident = self._records.get(key)
        if ident is None:
            return None
        return BackingFile(key, self.path_for(key), Identity.unpack(ident).size)

    def _read_new_records(self) -> bool:
        """Read the lines appended to the records since last read (under `_lock`); True if any."""
        try:
            size = os.stat(self._log_path).st_size
        except OSError:
            return False
        if size < self._log_read:
            self._log_read = 0  # rewritten (compacted) by another process: read it all again
        if size <= self._log_read:
            return False
        try:
            with open(self._log_path) as f:
                f.seek(self._log_read)
                text = f.read(size - self._log_read)
        except OSError:
            return False
        complete = text.rfind("\n") + 1
        self._log_read += len(text[:complete].encode())
        for line in text[:complete].splitlines():
            parsed = self._parse(line)
            if parsed is not None and parsed[2] == self._boot:
                self._records[parsed[0]] = parsed[1].packed
        return complete > 0

    def known(self, key: str) -> bool:
        """Whether `key` is recorded here (records other processes appended are not read)."""
        return key in self._records

    def open(self, backing: BackingFile) -> int | None:
        """A read-only descriptor of `backing`, checked against its record (the caller closes
        it); None when it is gone or was touched (then it is removed, to be made again)."""
        try:
            fd = os.open(backing.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError as e:
            self._drop(backing.key, f"cannot open it: {e.strerror}", remove=False)
            return None
        st = os.fstat(fd)
        with self._lock:
            ident = self._records.get(backing.key)
        if ident is None or Identity.of(st).packed != ident or (st.st_mode & 0o7777) != MODE or st.st_nlink != 1:
            os.close(fd)
            self._drop(backing.key, "it changed after it was verified (size, times, inode or mode)", remove=True)
            return None
        self._count("opened")
        return fd

    # -- making ---------------------------------------------------------------------------------

    def make(self, key: str, size: int, file_digest: str, pieces: Iterable[bytes | memoryview]) -> BackingFile:
        """Write `pieces` (verified bytes, in order) as backing file `key`, checked against `size`
        and `file_digest` (sha256 of the whole file; "" when the TOC has none). Raises
        `BackingFileError` (nothing is left behind) or OSError."""
        path = self.path_for(key)
        directory = os.path.dirname(path)
        tmp = f"{directory}/.{key}.{_WRITER_TOKEN}.{secrets.token_hex(4)}.tmp"  # spared by our own sweep
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            h = hashlib.sha256()
            written = 0
            try:
                for piece in pieces:
                    h.update(piece)
                    view = memoryview(piece)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        written += n
                if written != size:
                    raise BackingFileError(f"{written} bytes, expected {size}")
                if file_digest and "sha256:" + h.hexdigest() != file_digest:
                    raise BackingFileError("its bytes do not hash to the file's TOC digest")
                os.fchmod(fd, MODE)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        ident = Identity.of(os.stat(path))  # after the rename: it changes ctime
        self._record(key, ident)
        self._count("made")
        return BackingFile(key, path, size)

    # -- records --------------------------------------------------------------------------------

    def _record(self, key: str, ident: Identity) -> None:
        line = f"{key} {ident.size} {ident.mtime_ns} {ident.ctime_ns} {ident.ino} {ident.dev} {self._boot}\n"
        with self._lock:
            if len(self._records) >= MAX_RECORDS:
                return
            self._records[key] = ident.packed
            with open(self._log_path, "a") as f:
                f.write(line)
                if f.tell() == self._log_read + len(line):
                    self._log_read = f.tell()  # nobody else appended meanwhile

    def _load_records(self) -> None:
        """Read `records.log` (last record per key wins); records of another boot are dropped and
        their files removed; the log is rewritten when it holds dead lines. (A file gone since
        is found at its next open.)"""
        try:
            with open(self._log_path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        self._log_read = sum(len(line.encode()) for line in lines)
        stale: set[str] = set()
        for line in lines:
            parsed = self._parse(line)
            if parsed is None:
                continue
            key, ident, boot = parsed
            if boot != self._boot:
                stale.add(key)
                self._records.pop(key, None)
            else:
                stale.discard(key)
                self._records[key] = ident.packed
        for key in stale:
            try:
                os.unlink(self.path_for(key))
            except OSError:
                pass
        if stale or len(lines) > 2 * len(self._records) + 16:
            self._rewrite()

    @staticmethod
    def _parse(line: str) -> tuple[str, Identity, str] | None:
        fields = line.split()
        if len(fields) != 7:
            return None
        key, *numbers, boot = fields
        try:
            return key, Identity(*(int(n) for n in numbers)), boot
        except ValueError:
            return None

    def _rewrite(self) -> None:
        tmp = self._log_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for key, packed in self._records.items():
                i = Identity.unpack(packed)
                f.write(f"{key} {i.size} {i.mtime_ns} {i.ctime_ns} {i.ino} {i.dev} {self._boot}\n")
        os.replace(tmp, self._log_path)
        self._log_read = os.stat(self._log_path).st_size

    def _drop(self, key: str, why: str, *, remove: bool) -> None:
        with self._lock:
            known = self._records.pop(key, None) is not None
        if remove:
            log.warning("backing file %s: %s; it is removed and made again from verified chunks", key, why)
            self._count("bad_files")
            try:
                os.unlink(self.path_for(key))
            except OSError:
                pass
        elif known:
            log.info("backing file %s: %s", key, why)

    def forget(self, key: str) -> None:
        """The file was removed (the cache janitor): no longer offered."""
        with self._lock:
            self._records.pop(key, None)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["files"] = len(self._records)
        return out
