"""File helpers of the caches: digest keys that are safe file names, atomic writes."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


class CacheKeyError(ValueError):
    """A cache key is not a `sha256:<64 hex>` digest (refused: keys become file names)."""


def digest_hex(digest: str) -> str:
    """The hex part of a sha256 digest, validated so it is safe as a file name."""
    m = _DIGEST_RE.match(digest)
    if not m:
        raise CacheKeyError(f"not a sha256 digest: {digest!r}")
    return m.group(1)


def atomic_write(path: Path, data: bytes | memoryview, *, fsync: bool = False) -> None:
    """Write `data` to `path` so that readers see either no file or the complete file.

    The temp file is in the target directory, so `os.replace` is a same-filesystem rename.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError:  # first entry of its fan-out directory
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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


def read_if_present(path: Path, what: str) -> bytes | None:
    """The file's bytes, or None when it is missing or unreadable: either way a cache miss."""
    try:
        with open(path, "rb") as f:
            return f.read()
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
