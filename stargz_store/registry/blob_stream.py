"""A whole-blob reader that survives broken connections and verifies the digest at EOF.

It knows nothing of the client: it is handed a `BlobGet` (send one GET with these headers, run
`consume` on the response) and the retry settings, so `client` imports this module and not the
other way round.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Callable

import requests
import urllib3

from .auth import TransientError
from .errors import DigestMismatchError, RegistryTimeoutError, ShortReadError
from .multipart import parse_content_range
from .responses import READ_CHUNK, hasher_for, read_exact_body
from .transport import check_status

log = logging.getLogger(__name__)

# One GET of the blob with extra `headers`; `consume` checks the response and returns it (open,
# its body unread). The caller's endpoint choice (mirrors, then the origin) happens inside.
BlobGet = Callable[[dict[str, str], Callable[[requests.Response], requests.Response]], requests.Response]


@dataclass(frozen=True)
class ResumePolicy:
    """How often and how patiently a broken body is resumed (the client's `[blob]` settings)."""

    max_retries: int
    min_wait: float
    max_wait: float


class BlobStream(io.RawIOBase):
    """Whole-blob reader that resumes after a broken connection and verifies the digest at EOF."""

    def __init__(self, get: BlobGet, digest: str, what: str, resume: ResumePolicy) -> None:
        super().__init__()
        self._get = get
        self._resume = resume
        self._digest = digest
        self._hasher = hasher_for(digest)
        self._pos = 0
        self._size: int | None = None
        self._resp: requests.Response | None = None
        self._done = False
        self._failures = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        what = self._what
        pos = self._pos
        headers = {"Accept-Encoding": "identity"}
        if pos:
            headers["Range"] = f"bytes={pos}-"

        def consume(resp: requests.Response) -> requests.Response:
            check_status(resp, what, ok=(200, 206))
            if resp.status_code == 206:
                cr = parse_content_range(resp.headers.get("Content-Range"))
                if cr is None or cr.first != pos:
                    raise TransientError(ShortReadError(f"{what}: resumed at the wrong offset"))
                self._size = cr.total if cr.total is not None else self._size
            else:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit():
                    self._size = int(length)
                if pos:
                    self._skip(resp, pos)
            return resp

        self._resp = self._get(headers, consume)

    def _skip(self, resp: requests.Response, n: int) -> None:
        while n > 0:
            got = read_exact_body(resp, min(n, READ_CHUNK))
            if not got:
                raise TransientError(ShortReadError(f"{self._what}: ended while skipping to the resume offset"))
            n -= len(got)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._done or len(buffer) == 0:
            return 0
        while True:
            try:
                if self._resp is None:
                    self._open()
                assert self._resp is not None
                n = self._resp.raw.readinto(buffer)
                if n == 0 and self._size is not None and self._pos < self._size:
                    raise urllib3.exceptions.ProtocolError("body ended early")
            except (urllib3.exceptions.HTTPError, OSError, requests.exceptions.RequestException) as exc:
                self._drop_response()
                self._failures += 1
                if self._failures > self._resume.max_retries:
                    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                        raise RegistryTimeoutError(f"{self._what}: read timed out at byte {self._pos}") from None
                    raise ShortReadError(f"{self._what}: connection broken at byte {self._pos}") from None
                log.info("%s: connection broken at byte %d; resuming", self._what, self._pos)
                time.sleep(min(self._resume.max_wait, self._resume.min_wait * 2 ** self._failures))
                continue
            if n == 0:
                return self._finish()
            self._hasher.update(memoryview(buffer)[:n])
            self._pos += n
            return n

    def readall(self) -> bytes:
        """Whole remaining blob in 1 MiB reads (RawIOBase's default would use 8 KiB ones)."""
        out = bytearray()
        buf = bytearray(READ_CHUNK)
        while n := self.readinto(buf):
            out += memoryview(buf)[:n]
        return bytes(out)

    def _finish(self) -> int:
        self._drop_response()
        if self._size is not None and self._pos != self._size:
            raise ShortReadError(f"{self._what}: got {self._pos} of {self._size} bytes")
        actual = f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
        if actual != self._digest:
            raise DigestMismatchError(f"{self._what}: content hashes to {actual}")
        self._done = True
        return 0

    def _drop_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    def close(self) -> None:
        self._drop_response()
        super().close()

