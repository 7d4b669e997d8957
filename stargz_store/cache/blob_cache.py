"""Raw compressed blob bytes, kept in fixed-size aligned blocks per blob digest (for the ALS `blob`).

Podman reads a layer's `blob` file whole and sequentially (to copy or push the layer), and checks
its digest itself; a block of a blob cannot be authenticated on its own, so these blocks are a
transport cache, not a verified one: they hold what the registry sent for `[i*B, (i+1)*B)` of the
blob named by its digest. Layout: `<root>/<hex[0:2]>/<hex>/<B>-<i>`; the block size is in the
name so a changed block size never mixes with old blocks. Writes are atomic (temp + rename).

Arbitrary ranges (`get_range`/`put_range`, files `range-<offset>-<length>`) keep the bytes a TOC
was read from, so a restarted store can re-open a layer without the registry; those bytes are
re-authenticated against the TOC digest on every use, so keeping them is as safe as fetching them.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .files import atomic_write, digest_hex, read_if_complete, unlink_quietly

log = logging.getLogger(__name__)


class BlobRangeCache:
    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def _path(self, blob_digest: str, block_size: int, index: int) -> Path:
        hexd = digest_hex(blob_digest)
        return self.root / hexd[:2] / hexd / f"{block_size}-{index}"

    def get(self, blob_digest: str, block_size: int, index: int, expected_len: int) -> bytes | None:
        """Block `index` of the blob, or None (also when a stored block has the wrong length)."""
        return read_if_complete(self._path(blob_digest, block_size, index), expected_len, "blob cache")

    def _range_path(self, blob_digest: str, offset: int, length: int) -> Path:
        hexd = digest_hex(blob_digest)
        return self.root / hexd[:2] / hexd / f"range-{offset}-{length}"

    def get_range(self, blob_digest: str, offset: int, length: int) -> bytes | None:
        return read_if_complete(self._range_path(blob_digest, offset, length), length, "blob cache")

    def put_range(self, blob_digest: str, offset: int, data: bytes) -> None:
        atomic_write(self._range_path(blob_digest, offset, len(data)), data, fsync=self.fsync)

    def discard_range(self, blob_digest: str, offset: int, length: int) -> None:
        unlink_quietly(self._range_path(blob_digest, offset, length))

    def contains(self, blob_digest: str, block_size: int, index: int) -> bool:
        return self._path(blob_digest, block_size, index).exists()

    def put(self, blob_digest: str, block_size: int, index: int, data: bytes | memoryview) -> None:
        atomic_write(self._path(blob_digest, block_size, index), data, fsync=self.fsync)
