"""The open files per inode and mode, on disk, for a process that takes over after a crash.

With passthrough the kernel wants every open of an inode answered in the mode of the files
already open (and, by passthrough, with the same backing id: `Session._open_mode`). A stopping
process hands its table over; a crashed one cannot, so every change is appended here first (one
16-byte record, one `write`, before the OPEN or RELEASE is answered), and the next process
replays it. Records: inode, backing id, change of the files open by passthrough, change of the
files open through the page cache. The file is a shared memory mapping (`JOURNAL_BYTES`, sparse):
a record is a store into memory, no system call, and what is stored is in the page cache when
the process dies. A record of inode 0 (never a node id) ends the records. The file is rewritten
from the current table when it is full, and at every take-over.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

RECORD = struct.Struct("<Qihh")  # ino, backing id, passthrough change, cached change
JOURNAL_BYTES = 4 << 20

OpenFiles = dict[str, list[list[int]]]  # Session.open_files(): {"backing": [[ino, id, n]], "cached": [[ino, n]]}


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
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        usable = len(data) - len(data) % RECORD.size
        for ino, backing_id, passthrough, through_cache in RECORD.iter_unpack(data[:usable]):
            if ino == 0:
                break  # the end of the records
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
                "cached": [[ino, n] for ino, n in cached.items()]}

    def rewrite(self, files: OpenFiles) -> None:
        """Start over with `files` as the whole table (replacing the file atomically)."""
        records = [RECORD.pack(ino, bid, n, 0) for ino, bid, n in files.get("backing", ())]
        records += [RECORD.pack(ino, 0, 0, n) for ino, n in files.get("cached", ())]
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

    def note(self, ino: int, backing_id: int, passthrough: int, through_cache: int) -> bool:
        """Store one change; True when the journal is full and must be rewritten (`rewrite`)."""
        journal = self._map
        if journal is None:
            return False
        end = self._size + RECORD.size
        RECORD.pack_into(journal, self._size, ino, backing_id, passthrough, through_cache)
        self._size = end
        return end + RECORD.size > len(journal)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
