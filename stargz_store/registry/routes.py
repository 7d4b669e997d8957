"""Where each blob is read from: its redirect target, and which mirrors to skip for it for now.

Mirrors are always preferred (config order, then the origin). A mirror that could not serve a
blob's range (it answered the whole body, as a pull-through cache does while it is still filling
from the origin; it failed; it does not have the blob) is skipped *for that blob* for a short,
jittered, doubling back-off, then asked again: a filling mirror is full a few seconds later, and
pinning the blob to the origin from then on (as this client used to) would make a fleet send
every node's reads to the origin for good. Jitter keeps N nodes that met the same cold mirror at
the same moment from returning to it at the same moment.

The first ranged request to a mirror for a blob whose state there is unknown is a single flight:
requests for the same blob that arrive meanwhile wait for its answer (up to the client's
`mirror_race`, then they go to the next endpoint) instead of each meeting the cold mirror, where
every concurrent miss costs the origin one more streamed copy (distribution's proxy starts one
fill, then streams a copy per concurrent miss).

Bounded: at most `max_blobs` blobs are remembered (oldest forgotten first).
"""
from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .config import Endpoint

BlobKey = tuple[str, str, str]  # (registry, repository, digest)

MAX_BACKOFF = 30.0  # seconds: the longest a mirror is skipped for one blob


@dataclass
class _MirrorState:
    retry_at: float = 0.0  # monotonic time before which the mirror is skipped for this blob
    failures: int = 0  # consecutive failures (the back-off doubles with each)
    confirmed: bool = False  # it served a range of this blob: no single flight needed
    slow: bool = False  # the last failure was only slowness (hung up on in a race it lost)


@dataclass
class _BlobRoute:
    endpoint: Endpoint | None = None  # the endpoint that served this blob last
    redirect_url: str | None = None  # its redirect target, reused while fresh
    resolved_at: float = 0.0
    mirrors: dict[str, _MirrorState] = field(default_factory=dict)  # by mirror host
    probes: dict[str, threading.Event] = field(default_factory=dict)  # first contacts in flight


class BlobRoutes:
    """Thread-safe per-blob routing memory of one client."""

    def __init__(self, retry_base: float, max_blobs: int = 4096, rng: random.Random | None = None) -> None:
        self.retry_base = retry_base
        self.max_blobs = max_blobs
        self._rng = rng or random.Random()
        self._routes: OrderedDict[BlobKey, _BlobRoute] = OrderedDict()
        self._lock = threading.Lock()

    def _route(self, key: BlobKey) -> _BlobRoute:
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _BlobRoute()
            while len(self._routes) > self.max_blobs:
                self._routes.popitem(last=False)
        else:
            self._routes.move_to_end(key)
        return route

    def order(self, key: BlobKey, endpoints: list[Endpoint], now: float | None = None) -> list[Endpoint]:
        """`endpoints` (mirrors first) without the mirrors in back-off for this blob; the origin
        always stays, so the list is never empty."""
        now = time.monotonic() if now is None else now
        with self._lock:
            route = self._routes.get(key)
            if route is None:
                return list(endpoints)
            return [e for e in endpoints
                    if not e.is_mirror or route.mirrors.get(e.host, _MirrorState()).retry_at <= now]

    def retry_at(self, key: BlobKey, endpoint: Endpoint) -> float:
        """When a mirror in back-off for this blob may be asked again (0.0: now)."""
        with self._lock:
            route = self._routes.get(key)
            state = route.mirrors.get(endpoint.host) if route else None
            return state.retry_at if state else 0.0

    def standing(self, key: BlobKey, endpoint: Endpoint) -> tuple[bool, int, bool]:
        """(confirmed, consecutive failures, slow) of a mirror for this blob: whether it served a
        range of it last time, how many times in a row it could not, and whether the last of those
        was only slowness (it lost a race before answering)."""
        with self._lock:
            route = self._routes.get(key)
            state = route.mirrors.get(endpoint.host) if route else None
            return (state.confirmed, state.failures, state.slow) if state else (False, 0, False)

    def failed(self, key: BlobKey, endpoint: Endpoint, at_least: float = 0.0, slow: bool = False) -> float:
        """A mirror could not serve this blob: skip it for it for a jittered, doubling back-off
        that starts at `retry_base`, or at `at_least` when that is longer (e.g. the time a mirror
        needs to fill a large blob). `slow`: it only answered later than the origin (hung up on
        before its status came). Returns the delay in seconds (0.0 for the origin, which is never
        skipped)."""
        if not endpoint.is_mirror:
            return 0.0
        with self._lock:
            state = self._route(key).mirrors.setdefault(endpoint.host, _MirrorState())
            state.failures += 1
            state.confirmed = False
            state.slow = slow
            base = max(self.retry_base, at_least)
            delay = min(MAX_BACKOFF, base * 2 ** (state.failures - 1)) * self._rng.uniform(0.5, 1.5)
            state.retry_at = time.monotonic() + delay
            return delay

    def served(self, key: BlobKey, endpoint: Endpoint, redirect_url: str | None) -> None:
        """`endpoint` answered a range of this blob: remember it (and its redirect target)."""
        with self._lock:
            route = self._route(key)
            route.endpoint, route.redirect_url, route.resolved_at = endpoint, redirect_url, time.monotonic()
            if endpoint.is_mirror:
                state = route.mirrors.setdefault(endpoint.host, _MirrorState())
                state.failures, state.retry_at, state.confirmed, state.slow = 0, 0.0, True, False

    def redirect(self, key: BlobKey, valid_for: float) -> str | None:
        """The blob's redirect target while it is fresh, else None."""
        with self._lock:
            route = self._routes.get(key)
            if route is None or not route.redirect_url or time.monotonic() - route.resolved_at >= valid_for:
                return None
            return route.redirect_url

    def forget_redirect(self, key: BlobKey) -> None:
        with self._lock:
            route = self._routes.get(key)
            if route is not None:
                route.redirect_url = None

    def last_endpoint(self, key: BlobKey) -> Endpoint | None:
        with self._lock:
            route = self._routes.get(key)
            return route.endpoint if route else None

    @contextmanager
    def first_contact(self, key: BlobKey, endpoint: Endpoint, timeout: float) -> Iterator[FirstContact]:
        """Single flight of the first request to a mirror for a blob (see the module docstring).

        Yields a `FirstContact`: `go` is True when the caller may send its request now (the mirror
        is confirmed for this blob, or the caller is the probe; it then calls `settle()` as soon
        as the answer's status is known, and at the latest when the block ends), False after
        waiting (up to `timeout`) for another caller's probe: the caller then looks again (the
        mirror may be in back-off now, or the blob held whole); `settled` says whether that probe
        had its answer within `timeout` (if not, the mirror is slow to answer for this blob)."""
        if not endpoint.is_mirror:
            yield FirstContact(True)
            return
        with self._lock:
            route = self._route(key)
            state = route.mirrors.get(endpoint.host)
            theirs = None if state is not None and state.confirmed else route.probes.get(endpoint.host)
            mine = None
            if theirs is None and not (state is not None and state.confirmed):
                mine = route.probes[endpoint.host] = threading.Event()
        if theirs is not None:
            yield FirstContact(False, settled=theirs.wait(timeout))
            return
        contact = FirstContact(True, mine, lambda: self._end_probe(key, endpoint, mine))
        try:
            yield contact
        finally:
            contact.settle()

    def _end_probe(self, key: BlobKey, endpoint: Endpoint, event: threading.Event | None) -> None:
        if event is None:
            return
        with self._lock:
            route = self._routes.get(key)
            if route is not None and route.probes.get(endpoint.host) is event:
                del route.probes[endpoint.host]
        event.set()


class FirstContact:
    """What `BlobRoutes.first_contact` yields: go ahead or look again; `settle()` releases waiters."""

    __slots__ = ("go", "settled", "_event", "_end")

    def __init__(self, go: bool, event: threading.Event | None = None, end=None, settled: bool = True) -> None:
        self.go = go
        self.settled = settled
        self._event = event
        self._end = end

    def settle(self) -> None:
        end, self._end = self._end, None
        if end is not None:
            end()
