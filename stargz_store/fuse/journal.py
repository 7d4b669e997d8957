"""The open files per inode and mode, on disk, for a process that takes over after a crash.

With passthrough the kernel wants every open of an inode answered in the mode of the files
already open (and, by passthrough, with the same backing id: `Session._open_mode`). A stopping
process hands its table over; a crashed one cannot, so every change is appended here first (one
16-byte record, one `write`, before the OPEN or RELEASE is answered), and the next process
replays it. Records: inode, the request's `unique`, backing id, change of the files open by
passthrough, change of the files open through the page cache. The file is a shared memory mapping
(`JOURNAL_BYTES`, sparse): a record is a store into memory, no system call, and what is stored is
in the page cache when the process dies. A record of inode 0 and unique 0 ends the records. The
file is rewritten from the current table when it is full, and at every take-over.

Why the `unique`: a process killed after noting an OPEN or RELEASE but before answering it leaves
the request unanswered, and the kernel sends it again to the next process (`FUSE_NOTIFY_RESEND`,
the same `unique` with `RESEND_BIT`). Counted twice, a RELEASE makes the count of an inode's
passthrough files one too low: the last real release would then let go of the backing id while
the kernel still reads through it, and every later open of the file fails (EIO). So the uniques
of the changes noted are replayed too (`applied`, the latest `APPLIED_KEPT`: a dead process had at
most one request per worker under way), and a resent request found there is answered without
counting it again. A rewrite keeps them as records of inode 0 with no change.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

RECORD = struct.Struct("<QQihh")  # ino, unique, backing id, passthrough change, cached change
JOURNAL_BYTES = 4 << 20
APPLIED_KEPT = 1024  # uniques of the latest changes replayed (more than a process has workers)

# Session.hand_over_open_files(): {"backing": [[ino, id, n]], "cached": [[ino, n]], "applied": [unique, ...]}
OpenFiles = dict[str, list]


class OpenFilesJournal:
    """Append-only record of `Session`'s open-file table (see the module docstring). Not
    thread-safe by itself: the session writes under its own lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._size = 0

    def replay(self) -> OpenFiles:
        """The table the records on disk add up to (empty when there are none)."""
        backing: dict[int, list[int]] = {}
        cached: dict[int, int] = {}
        applied: dict[int, None] = {}  # ordered: the latest last
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        usable = len(data) - len(data) % RECORD.size
        for ino, unique, backing_id, passthrough, through_cache in RECORD.iter_unpack(data[:usable]):
            if ino == 0 and unique == 0:
                break  # the end of the records
            if unique:
                applied.pop(unique, None)
                applied[unique] = None
            if ino == 0:
                continue  # only a unique applied before the last rewrite
            if passthrough:
                held = backing.setdefault(ino, [backing_id, 0])
                held[1] += passthrough
                if held[1] <= 0:
                    del backing[ino]
            if through_cache:
                n = cached.get(ino, 0) + through_cache
                if n > 0:
                    cached[ino] = n
                else:
                    cached.pop(ino, None)
        return {"backing": [[ino, bid, n] for ino, (bid, n) in backing.items()],
                "cached": [[ino, n] for ino, n in cached.items()],
                "applied": list(applied)[-APPLIED_KEPT:]}

    def rewrite(self, files: OpenFiles) -> None:
        """Start over with `files` as the whole table (replacing the file atomically)."""
        records = [RECORD.pack(0, unique, 0, 0, 0) for unique in files.get("applied", ())[-APPLIED_KEPT:]]
        records += [RECORD.pack(ino, 0, bid, n, 0) for ino, bid, n in files.get("backing", ())]
        records += [RECORD.pack(ino, 0, 0, 0, n) for ino, n in files.get("cached", ())]
        data = b"".join(records)
        size = max(JOURNAL_BYTES, len(data) * 2 + RECORD.size)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.ftruncate(fd, size)
            os.replace(tmp, self.path)
            self.close()
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the file
        self._size = len(data)

    def note(self, ino: int, unique: int, backing_id: int, passthrough: int, through_cache: int) -> bool:
        """Store one change made by request `unique`; True when the journal is full and must be
        rewritten (`rewrite`)."""
        journal = self._map
        if journal is None:
            return False
        end = self._size + RECORD.size
        RECORD.pack_into(journal, self._size, ino, unique, backing_id, passthrough, through_cache)
        self._size = end
        return end + RECORD.size > len(journal)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
