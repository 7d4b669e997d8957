"""Hanging up on a request from another thread before its answer has come (a race's loser).

Why: a read raced between a mirror and the origin takes the first answer; the other request used
to run until its own status line came and its thread was scheduled to close it. For a cold
pull-through mirror that answer is a copy of the whole blob streamed from the origin for this
request alone, and everything the origin sent until the mirror noticed the hang-up is origin
egress (`benchmarks.fleet.proxy_probe`: 0.45 MB per concurrent miss hung up on 50 ms after the
status line, as a busy node does, against 0.15 MB right after it). Hanging up as soon as the race is decided, from the winner's
thread, closes the socket before the mirror has started (or just as it starts) that copy.

How: the transport's connections (`HangupAdapter`) tell the `Hangup` bound to the requesting
thread which connection carries its request; `Hangup.hang_up()` shuts that socket down, which
wakes the requesting thread (its read fails) and makes `Transport.call` raise `HungUp` instead
of retrying. A request whose answer has started (`answered()`) is never hung up on this way: its
reader decides (a whole small blob being read on, a 206 that lost the race).
"""
from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import Iterator

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_bound = threading.local()


class HungUp(Exception):
    """The request was hung up on by `Hangup.hang_up` (another answer was taken). Not a
    `RegistryError`: the endpoint did nothing wrong."""


class Hangup:
    """One request's hang-up switch; bind it to the requesting thread with `active()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: HTTPConnection | None = None
        self.hung_up = False
        self._answered = False

    @contextmanager
    def active(self) -> Iterator[Hangup]:
        """Requests sent on this thread inside the block are the ones `hang_up` ends."""
        previous = getattr(_bound, "hangup", None)
        _bound.hangup = self
        try:
            yield self
        finally:
            _bound.hangup = previous

    def answered(self) -> bool:
        """The answer's status is here: from now on only its reader ends it. False when it was hung
        up on first (the caller then drops the answer)."""
        with self._lock:
            if self.hung_up:
                return False
            self._answered = True
            return True

    def hang_up(self) -> bool:
        """End the request now unless its answer has started; True when it did (or will, at connect)."""
        with self._lock:
            if self._answered or self.hung_up:
                return False
            self.hung_up = True
            conn = self._conn
        if conn is not None:
            _shut(conn)
        return True

    def _bind(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            hung_up = self.hung_up
        if hung_up:
            _shut(conn)


def _shut(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return  # not connected yet: `_HangupMixin.connect` shuts it once it is
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _HangupMixin:
    """Tells the thread's `Hangup` which connection carries the request it is sending."""

    _hangup: Hangup | None = None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        hangup = self._hangup
        if hangup is not None and hangup.hung_up:
            _shut(self)  # type: ignore[arg-type]

    def request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib3's signature, passed through
        hangup = getattr(_bound, "hangup", None)
        self._hangup = hangup
        if hangup is not None:
            hangup._bind(self)  # type: ignore[arg-type]
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_HangupMixin, HTTPConnection):
    pass


class _HTTPSConnection(_HangupMixin, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class HangupAdapter(HTTPAdapter):
    """`requests` adapter whose direct connections can be hung up on (through a proxy they cannot:
    such a request runs to its answer, as before)."""

    def init_poolmanager(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - requests' signature
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
