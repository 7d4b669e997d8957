"""Whole blobs held in memory after a server answered a range request with the whole body.

A pull-through mirror that has not cached a blob yet (distribution's proxy, Harbor's proxy cache)
ignores `Range` and streams the whole blob; so does a server without range support. For a blob
of at most `per_blob_limit` bytes the client reads that body once, here, and answers every range
of the blob from it: the range a caller asked for as soon as its bytes have arrived (the rest
keeps arriving on a reader thread), every later range without a request. Such a blob is small by
definition, and the layer above fetches a small layer whole at its first miss anyway.

Why memory and not the disk cache: the client has no disk of its own (the layer's caches keep
what the layer verified), a held blob is only needed while the layer's first reads run, and the
bounds keep it cheap: at most `per_blob_limit` bytes per blob, `total_limit` bytes in all (a blob
that does not fit is not held: the caller falls back to ranged reads elsewhere), and a blob not
read for `idle_ttl` seconds is dropped. A blob whose bytes do not hash to its digest at the end
is dropped too (the ranges already handed out were unverified, as every ranged read is: the layer
verifies chunks against the TOC); `held` blobs are verified.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import requests
import urllib3

from .errors import DigestMismatchError, ShortReadError
from .responses import READ_CHUNK, STREAM_PIECE, hasher_for

log = logging.getLogger(__name__)

BlobKey = tuple[str, str, str]  # (registry, repository, digest)
IDLE_TTL = 60.0


class WholeBlob:
    """One blob's bytes, arriving or complete. Readers wait for the bytes they need."""

    def __init__(self, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size
        self._buf = bytearray(size)
        self._received = 0
        self._error: Exception | None = None
        self._done = False
        self._cond = threading.Condition()
        self.last_used = time.monotonic()

    @property
    def complete(self) -> bool:
        with self._cond:
            return self._done and self._error is None

    @property
    def failed(self) -> bool:
        with self._cond:
            return self._error is not None

    def fill(self, resp: requests.Response, what: str, on_end: Callable[[WholeBlob], None]) -> None:
        """Read `resp`'s body into the buffer and verify it (on the reader thread); `on_end` runs last."""
        hasher = hasher_for(self.digest)
        view = memoryview(self._buf)
        try:
            while self._received < self.size:
                n = resp.raw.readinto(view[self._received:self._received + READ_CHUNK])
                if not n:
                    raise ShortReadError(f"{what}: whole body ended at byte {self._received} of {self.size}")
                hasher.update(view[self._received:self._received + n])
                with self._cond:
                    self._received += n
                    self._cond.notify_all()
            actual = f"{self.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if actual != self.digest:
                raise DigestMismatchError(f"{what}: whole body hashes to {actual}")
            with self._cond:
                self._done = True
                self._cond.notify_all()
        except (urllib3.exceptions.HTTPError, OSError, requests.exceptions.RequestException,
                ShortReadError, DigestMismatchError) as e:
            self.fail(e if isinstance(e, (ShortReadError, DigestMismatchError))
                      else ShortReadError(f"{what}: connection broken at byte {self._received} ({type(e).__name__})"))
        finally:
            view.release()
            resp.close()
            on_end(self)

    def fail(self, error: Exception) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._done = True
            self._cond.notify_all()

    def _wait_for(self, end: int, deadline: float) -> int:
        """Bytes received once at least `end` are in (or the blob failed: ShortReadError)."""
        with self._cond:
            while self._received < end:
                if self._error is not None:
                    raise ShortReadError(f"whole body of {self.digest} not available: {self._error}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ShortReadError(f"whole body of {self.digest}: no byte {end - 1} in time")
                self._cond.wait(remaining)
            if self._error is not None and isinstance(self._error, DigestMismatchError):
                raise ShortReadError(f"whole body of {self.digest} refused: {self._error}")
            self.last_used = time.monotonic()
            return self._received

    def read(self, offset: int, length: int, deadline: float) -> bytes:
        """Bytes [offset, offset+length) (clipped to the blob), once they have arrived."""
        end = min(self.size, offset + length)
        self._wait_for(end, deadline)
        return bytes(self._buf[offset:end])

    def stream(self, offset: int, length: int, sink: Callable[[int, bytes], None], deadline: float) -> None:
        """Hand [offset, offset+length) to `sink` in pieces as they arrive."""
        pos, end = offset, min(self.size, offset + length)
        while pos < end:
            have = self._wait_for(min(end, pos + STREAM_PIECE), deadline)
            upto = min(end, have, pos + STREAM_PIECE)
            sink(pos, bytes(self._buf[pos:upto]))
            pos = upto


class WholeBlobStore:
    """The blobs held whole by one client, bounded in size, count of bytes and idle time."""

    def __init__(self, per_blob_limit: int, total_limit: int, idle_ttl: float = IDLE_TTL) -> None:
        self.per_blob_limit = per_blob_limit
        self.total_limit = total_limit
        self.idle_ttl = idle_ttl
        self._blobs: OrderedDict[BlobKey, WholeBlob] = OrderedDict()
        self._lock = threading.Lock()
        self._held_bytes = 0
        self.started = 0  # whole bodies taken (for stats and tests)

    def fits(self, size: int | None) -> bool:
        return size is not None and 0 < size <= min(self.per_blob_limit, self.total_limit)

    def get(self, key: BlobKey) -> WholeBlob | None:
        """The blob's bytes (complete or arriving), unless it failed or expired."""
        with self._lock:
            self._expire_locked(time.monotonic())
            blob = self._blobs.get(key)
            if blob is None:
                return None
            if blob.failed:
                self._drop_locked(key)
                return None
            self._blobs.move_to_end(key)
            blob.last_used = time.monotonic()
            return blob

    def start(self, key: BlobKey, digest: str, size: int) -> WholeBlob | None:
        """Room for a new blob of `size` bytes (older complete blobs are dropped for it), or None
        when it does not fit the bounds."""
        if not self.fits(size):
            return None
        with self._lock:
            self._expire_locked(time.monotonic())
            if key in self._blobs:
                return None  # someone else is taking it
            for old in list(self._blobs):
                if self._held_bytes + size <= self.total_limit:
                    break
                if self._blobs[old].complete or self._blobs[old].failed:
                    self._drop_locked(old)
            if self._held_bytes + size > self.total_limit:
                return None  # the rest are still arriving
            blob = self._blobs[key] = WholeBlob(digest, size)
            self._held_bytes += size
            self.started += 1
            return blob

    def drop(self, key: BlobKey, blob: WholeBlob) -> None:
        with self._lock:
            if self._blobs.get(key) is blob:
                self._drop_locked(key)

    def held_bytes(self) -> int:
        with self._lock:
            return self._held_bytes

    def _drop_locked(self, key: BlobKey) -> None:
        blob = self._blobs.pop(key)
        self._held_bytes -= blob.size

    def _expire_locked(self, now: float) -> None:
        for key in [k for k, b in self._blobs.items()
                    if (b.complete or b.failed) and now - b.last_used > self.idle_ttl]:
            self._drop_locked(key)
