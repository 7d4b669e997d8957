"""Raw compressed blob bytes, kept in fixed-size aligned blocks per blob digest (for the ALS `blob`).

Podman reads a layer's `blob` file whole and sequentially (to copy or push the layer), and checks
its digest itself; a block of a blob cannot be authenticated on its own (the manifest names only
the whole blob's digest), so a block is not verified against the registry. What is guaranteed:
a block read back from disk holds exactly the bytes the registry sent for `[i*B, (i+1)*B)` of the
blob when the block was written. Each block file starts with the sha256 of its bytes, taken from
the bytes received before they were written; `get` re-hashes the bytes on every read, and a block
whose length or hash does not match (a flipped bit, a bad sector, a short file after a power cut,
another process writing there) is removed, counted (`bad_blocks`), logged and missed, so the
caller fetches it again: damage on disk is never served.

Layout: `<root>/<hex[0:2]>/<hex>/<B>-<i>.sha256`, the 32-byte sha256 of the block then its bytes;
the block size is in the name so a changed block size never mixes with old blocks. Writes are
atomic (temp + rename), so a name only ever appears with a complete file.

Arbitrary ranges (`get_range`/`put_range`, files `range-<offset>-<length>`) keep the bytes a TOC
was read from, so a restarted store can re-open a layer without the registry; those bytes are
re-authenticated against the TOC digest on every use, so keeping them is as safe as fetching them.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from .files import atomic_write, digest_hex, read_if_complete, read_parts_if_present, unlink_quietly

log = logging.getLogger(__name__)

_HASH_LEN = 32  # the sha256 at the start of each block file


class BlobRangeCache:
    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._bad_lock = threading.Lock()
        self.bad_blocks = 0  # block files found damaged (and removed) by `get`

    def _path(self, blob_digest: str, block_size: int, index: int) -> Path:
        hexd = digest_hex(blob_digest)
        return self.root / hexd[:2] / hexd / f"{block_size}-{index}.sha256"

    def get(self, blob_digest: str, block_size: int, index: int, expected_len: int) -> bytes | None:
        """Block `index` of the blob as it was received, or None: not cached, or damaged (then the
        file is removed, so the caller's fetch writes it anew)."""
        path = self._path(blob_digest, block_size, index)
        parts = read_parts_if_present(path, "blob cache", _HASH_LEN)
        if parts is None:
            return None
        recorded, data = parts
        if len(recorded) != _HASH_LEN or len(data) != expected_len:
            problem = f"{len(recorded) + len(data)} bytes, expected {_HASH_LEN} + {expected_len}"
        elif hashlib.sha256(data).digest() != recorded:
            problem = "sha256 does not match the one recorded when it was written"
        else:
            return data
        log.warning("blob cache: discarding damaged block %s of %s: %s", path.name, blob_digest, problem)
        with self._bad_lock:
            self.bad_blocks += 1
        unlink_quietly(path)
        return None

    def put(self, blob_digest: str, block_size: int, index: int, data: bytes | memoryview) -> None:
        """Keep block `index` as received from the registry, with its sha256 for `get` to check."""
        atomic_write(self._path(blob_digest, block_size, index), data, fsync=self.fsync,
                     header=hashlib.sha256(data).digest())

    def contains(self, blob_digest: str, block_size: int, index: int) -> bool:
        """Whether a block file exists (not checked: only to skip a read-ahead; `get` checks)."""
        return self._path(blob_digest, block_size, index).exists()

    def _range_path(self, blob_digest: str, offset: int, length: int) -> Path:
        hexd = digest_hex(blob_digest)
        return self.root / hexd[:2] / hexd / f"range-{offset}-{length}"

    def get_range(self, blob_digest: str, offset: int, length: int) -> bytes | None:
        return read_if_complete(self._range_path(blob_digest, offset, length), length, "blob cache")

    def put_range(self, blob_digest: str, offset: int, data: bytes) -> None:
        atomic_write(self._range_path(blob_digest, offset, len(data)), data, fsync=self.fsync)

    def discard_range(self, blob_digest: str, offset: int, length: int) -> None:
        unlink_quietly(self._range_path(blob_digest, offset, length))

    def blob_dirs(self) -> list[Path]:
        """Every blob's directory (`<root>/<hex[0:2]>/<hex>`), for the start-up temp sweep."""
        try:
            return [blob for fan in self.root.iterdir() if fan.is_dir() for blob in fan.iterdir() if blob.is_dir()]
        except OSError:  # no blob cached yet
            return []
