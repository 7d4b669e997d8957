"""File helpers of the caches: digest keys that are safe file names, atomic writes, temp sweeps."""
from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")

# In the name of every temp file this process writes: a sweep leaves this process's writes in
# progress alone and removes every other temp file (a pid could be reused after a restart).
_WRITER_TOKEN = secrets.token_hex(6)


class CacheKeyError(ValueError):
    """A cache key is not a `sha256:<64 hex>` digest (refused: keys become file names)."""


def digest_hex(digest: str) -> str:
    """The hex part of a sha256 digest, validated so it is safe as a file name."""
    m = _DIGEST_RE.match(digest)
    if not m:
        raise CacheKeyError(f"not a sha256 digest: {digest!r}")
    return m.group(1)


def atomic_write(path: Path, data: bytes | memoryview, *, fsync: bool = False, header: bytes = b"") -> None:
    """Write `header` then `data` to `path` so that readers see either no file or the complete file.

    The temp file (`.<name>.<writer token>.<random>.tmp`) is in the target directory, so
    `os.replace` is a same-filesystem rename; an interrupted write leaves only that temp file,
    which no reader opens and `sweep_temp_files` removes.
    """
    prefix = f".{path.name}.{_WRITER_TOKEN}."
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    except FileNotFoundError:  # first entry of its fan-out directory
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if header:
                f.write(header)
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(Path(tmp))
        raise


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cache: cannot remove %s: %s", path, e)


def read_if_present(path: Path | str, what: str) -> bytes | None:
    """The file's bytes, or None when it is missing or unreadable: either way a cache miss."""
    parts = read_parts_if_present(path, what, 0)
    return None if parts is None else parts[1]


def read_parts_if_present(path: Path | str, what: str, header_len: int) -> tuple[bytes, bytes] | None:
    """The file's first `header_len` bytes (fewer if it is shorter) and the rest, each its own
    bytes object (no copy of a large body to split it); None when missing or unreadable."""
    try:
        with open(path, "rb") as f:
            header = f.read(header_len) if header_len else b""
            return header, f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s: cannot read %s: %s", what, path, e)
        return None


def read_if_complete(path: Path, expected_len: int, what: str) -> bytes | None:
    """Like `read_if_present`, but a file of the wrong length (cut short by a crash) is removed and missed."""
    data = read_if_present(path, what)
    if data is not None and len(data) != expected_len:
        log.warning("%s: discarding %s: %d bytes, expected %d", what, path, len(data), expected_len)
        unlink_quietly(path)
        return None
    return data


def sweep_temp_files(directories: Iterable[Path], what: str) -> int:
    """Remove temp files of interrupted writes in `directories` (`.*.tmp`, see `atomic_write`);
    returns how many. Temp files of this process are left alone, so this is safe while the cache
    is in use (a write in progress here is never removed under its writer)."""
    removed = 0
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                names = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(".tmp")]
        except OSError:  # gone or unreadable: nothing to sweep there
            continue
        for name in names:
            if f".{_WRITER_TOKEN}." not in name:
                unlink_quietly(directory / name)
                removed += 1
    if removed:
        log.info("%s: removed %d temp files of interrupted writes", what, removed)
    return removed
