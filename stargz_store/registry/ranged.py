"""Ranged blob reads through mirrors: endpoint choice per blob, and what to do with a whole body.

A ranged GET goes to the blob's redirect target while it is fresh, else to the endpoints in
order (mirrors, then the origin) minus the mirrors in back-off for that blob (`routes.BlobRoutes`).
The answers, and what each one leads to:

- 206: the bytes asked for; a mirror that answers so is confirmed for the blob.
- 200 with the whole blob (a pull-through mirror still filling from the origin, a server without
  range support): never a failure, handled on purpose, in this order:
  1. the blob is at most `whole_blob_limit` bytes and fits the memory budget: its body is read
     whole on a reader thread into `whole_blobs.WholeBlobStore`, the caller gets its bytes as
     soon as they have arrived, and every later range of the blob is answered from memory;
  2. the bytes asked for end within the first `FULL_BODY_FORWARD_LIMIT` bytes of the body (or
     there is no other endpoint to ask): the body is read forward to them, and no further;
  3. otherwise the answer is abandoned at once (`RangeIgnoredError`) and the next endpoint (the
     origin) serves this one request.
  A mirror that answered 200 is skipped for this blob for a short jittered back-off (cases 2
  and 3), then asked again: by then a pull-through cache has usually filled.
- anything else: a typed error; a mirror's failure sends the request to the next endpoint and
  skips that mirror for the blob for the back-off (a dead mirror for every blob, see the client).

A mirror not known to hold the blob (never served a range of it) is raced: it gets `mirror_race`
to answer (none after it answered with a whole body: it is likely still filling), then the next
endpoint is asked too and the first answer whose status says it serves the read takes it; the
other request is hung up on at that moment, before its own answer has come (`_race`,
`hangup.py`), and a mirror hung up on so is skipped for the blob for a back-off, after which it
gets its head start again. A cold pull-through mirror answers only after its own round trips
to the origin, queued when many nodes miss at once; a warm one answers in milliseconds. Reads
while a mirror is in back-off for the blob go to the origin unless `mirror_fill_wait` says to
wait for it.

Why abandon rather than read through: each 200 from distribution's proxy is a stream the mirror
pulls from the origin for this request alone, so reading it costs the origin what the client
reads; hanging up right after the status line costs the origin about one TCP window (measured:
~150 kB per abandoned answer on a 20 ms link), while the mirror's own fill, started by the first
miss, completes regardless.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import requests

from .config import Endpoint, RegistryConfig
from .errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RangeIgnoredError,
    RangeNotSatisfiableError,
    RegistryError,
    RegistryTimeoutError,
    ServerError,
    ShortReadError,
    UnreachableError,
)
from .hangup import Hangup, HungUp
from .multipart import merge_regions, parse_content_range, range_header, slice_from_parts
from .reference import Reference
from .responses import (
    READ_CHUNK,
    STREAM_PIECE,
    RangeSink,
    consume_multi_range,
    consume_single_range,
    consume_suffix_range,
    content_length,
    hasher_for,
    read_exact_body,
    url_host,
)
from .routes import BlobKey, BlobRoutes
from .transport import Target, Transport, check_status
from .whole_blobs import WholeBlob, WholeBlobStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# A 200 answer to a range request is read forward at most this far for the bytes asked for; past
# it, asking the next endpoint costs less than reading on (one round trip against this many bytes).
FULL_BODY_FORWARD_LIMIT = 1 << 20
# How fast a pull-through mirror is assumed to fill from the origin, to time the first retry after
# it answered with a whole body: 64 MiB/s (~500 Mbit/s) puts that of a 100 MB blob at ~1.5 s, of
# a 10 MB one at the configured minimum. Each retry that finds it still filling costs the origin
# another partial copy, so retrying much earlier than the fill can end only costs.
ASSUMED_FILL_RATE = 64 << 20
MAX_RANGES_PER_REQUEST = 64
_MAX_LOOKS = 4  # single-flight waits before a request goes ahead regardless


class _Want(Protocol[T]):
    """What one ranged request asks for: its Range header, how to read a 206 (or a 200 read
    forward) answer, and how to answer it from a blob held whole."""

    def header(self) -> str: ...

    def end(self, size: int | None) -> int | None: ...

    def consume(self, resp: requests.Response, what: str, last: bool) -> T: ...

    def from_whole(self, blob: WholeBlob, deadline: float) -> T: ...


@dataclass(frozen=True)
class RangeWant:
    offset: int
    length: int
    sink: RangeSink | None = None

    def header(self) -> str:
        return f"bytes={self.offset}-{self.offset + self.length - 1}"

    def end(self, size: int | None) -> int | None:
        return self.offset + self.length

    def consume(self, resp: requests.Response, what: str, last: bool) -> bytes:
        return consume_single_range(resp, self.offset, self.length, what, self.sink)

    def from_whole(self, blob: WholeBlob, deadline: float) -> bytes:
        if self.offset + self.length > blob.size:
            raise RangeNotSatisfiableError(f"blob {blob.digest}: range {self.offset}+{self.length} beyond "
                                           f"the end of the {blob.size}-byte blob")
        if self.sink is not None:
            blob.stream(self.offset, self.length, self.sink, deadline)
            return b""
        return blob.read(self.offset, self.length, deadline)


@dataclass(frozen=True)
class TailWant:
    length: int

    def header(self) -> str:
        return f"bytes=-{self.length}"

    def end(self, size: int | None) -> int | None:
        return size  # the tail of an unknown blob: the whole body is needed

    def consume(self, resp: requests.Response, what: str, last: bool) -> tuple[int, int, bytes]:
        return consume_suffix_range(resp, self.length, what, FULL_BODY_FORWARD_LIMIT)

    def from_whole(self, blob: WholeBlob, deadline: float) -> tuple[int, int, bytes]:
        start = max(0, blob.size - self.length)
        return start, blob.size, blob.read(start, blob.size - start, deadline)


@dataclass(frozen=True)
class RegionsWant:
    """Several merged regions in one multi-range request. `refused` records the status of an
    origin that would not serve multi-range (the caller then switches the host to single ranges)."""

    regions: tuple[tuple[int, int], ...]
    refused: list[int] = field(default_factory=list, compare=False)

    def header(self) -> str:
        return range_header(list(self.regions))

    def end(self, size: int | None) -> int | None:
        return max(off + length for off, length in self.regions)

    def consume(self, resp: requests.Response, what: str, last: bool) -> list[tuple[int, bytes]]:
        regions = list(self.regions)
        if resp.status_code in (400, 416, 501):
            self.refused.append(resp.status_code)
            return []  # multi-range refused: single ranges instead
        if resp.status_code == 200 and last:
            self.refused.append(200)
            wanted = sum(length for _, length in regions)
            if max(off + length for off, length in regions) > 2 * wanted + READ_CHUNK:
                return []  # whole blob coming (e.g. object storage): do not download it for this
        return consume_multi_range(resp, regions, what)

    def from_whole(self, blob: WholeBlob, deadline: float) -> list[tuple[int, bytes]]:
        return [(off, blob.read(off, length, deadline)) for off, length in self.regions]


_LOOK_AGAIN = object()
_NEXT = object()  # this endpoint could not serve the request: ask the next one


class _RaceLost(Exception):
    """Raised from a raced answer's consume when the other runner's answer was taken first."""


class _Race:
    """A mirror's answer raced against the next endpoint's (`RangedReader._race`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._winner: Endpoint | None = None
        self._hangups: dict[str, Hangup] = {}  # by endpoint host: the runners' requests
        self.answered = threading.Event()  # the mirror's status is known (or its attempt ended)
        self.done = threading.Event()  # the mirror's attempt ended; `outcome` is set
        self.outcome: tuple[str, object] = ("value", _NEXT)

    def hangup_for(self, endpoint: Endpoint) -> Hangup:
        """The switch of `endpoint`'s request in this race (hung up on at once if it already lost)."""
        hangup = Hangup()
        with self._lock:
            self._hangups[endpoint.host] = hangup
            lost = self._winner is not None and self._winner is not endpoint
        if lost:
            hangup.hang_up()
        return hangup

    def claim(self, endpoint: Endpoint) -> bool:
        """True for the first answer that claims the read (and for it again), False for any other.
        The first claim hangs up on the other runners' requests whose answers have not come yet:
        a cold mirror's answer is a whole blob streamed from the origin, paid for until the mirror
        sees the hang-up (see `hangup.py`)."""
        with self._lock:
            first = self._winner is None
            if first:
                self._winner = endpoint
            won = self._winner is endpoint
            others = [h for host, h in self._hangups.items() if host != endpoint.host] if first else []
        for hangup in others:
            hangup.hang_up()
        return won


def _claim(race: _Race | None, endpoint: Endpoint, what: str) -> None:
    if race is not None and not race.claim(endpoint):
        raise _RaceLost(f"{what}: answered by another endpoint first")


class RangedReader:
    """The ranged half of `RegistryClient`: owns the per-blob routes and the blobs held whole.

    `endpoints(ref)` gives the live pull endpoints (mirrors first), `target` builds a request
    target for an endpoint, `endpoint_failed` is the client's host-wide mirror cool-down."""

    def __init__(
        self,
        config: RegistryConfig,
        transport: Transport,
        endpoints: Callable[[Reference], list[Endpoint]],
        target: Callable[[Endpoint, str, Reference], Target],
        endpoint_failed: Callable[[Endpoint, RegistryError, str], None],
    ) -> None:
        self.config = config
        self.transport = transport
        self.endpoints = endpoints
        self.target = target
        self.endpoint_failed = endpoint_failed
        self.routes = BlobRoutes(config.mirror_retry)
        self.whole = WholeBlobStore(config.whole_blob_limit, config.whole_blob_memory)
        self.single_range_hosts: set[str] = set()

    # ---- the three kinds of ranged read --------------------------------------------------

    def read_range(self, ref: Reference, digest: str, offset: int, length: int, sink: RangeSink | None) -> bytes:
        return self._get(ref, digest, RangeWant(offset, length, sink), f"blob {digest} range {offset}+{length}")

    def read_tail(self, ref: Reference, digest: str, length: int) -> tuple[int, int, bytes]:
        return self._get(ref, digest, TailWant(length), f"blob {digest} last {length} bytes")

    def read_ranges(self, ref: Reference, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        regions = merge_regions(ranges)
        data: list[tuple[int, bytes]] = []
        if len(regions) == 1 or not self._multi_range_ok(ref) or self.whole.get(self._key(ref, digest)):
            data = [(off, self.read_range(ref, digest, off, length, None)) for off, length in regions]
        else:
            for i in range(0, len(regions), MAX_RANGES_PER_REQUEST):
                data.extend(self._fetch_regions(ref, digest, regions[i:i + MAX_RANGES_PER_REQUEST]))
        out = []
        for off, length in ranges:
            piece = slice_from_parts(data, off, length) if length else b""
            if piece is None or len(piece) != length:
                raise ShortReadError(f"blob {digest}: range {off}+{length} missing from the registry's answer")
            out.append(piece)
        return out

    def _multi_range_ok(self, ref: Reference) -> bool:
        return not self.config.force_single_range and ref.registry not in self.single_range_hosts

    def _fetch_regions(self, ref: Reference, digest: str, regions: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        want = RegionsWant(tuple(regions))
        parts = self._get(ref, digest, want, f"blob {digest} ({len(regions)} ranges)")
        if want.refused and want.refused[-1] != 416:
            log.info("%s does not serve multi-range requests (HTTP %d); using single ranges for it",
                     ref.registry, want.refused[-1])
            self.single_range_hosts.add(ref.registry)
        result = list(parts)
        for off, length in regions:
            if slice_from_parts(result, off, length) is None:
                result.append((off, self.read_range(ref, digest, off, length, None)))
        return result

    # ---- one ranged read ---------------------------------------------------------------------

    @staticmethod
    def _key(ref: Reference, digest: str) -> BlobKey:
        return (ref.registry, ref.repository, digest)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.max_retry_time

    def _get(self, ref: Reference, digest: str, want: _Want[T], what: str) -> T:
        key = self._key(ref, digest)
        stop_waiting = time.monotonic() + self.config.mirror_fill_wait
        for look in range(_MAX_LOOKS + 1):
            held = self.whole.get(key)
            if held is not None:
                try:
                    return want.from_whole(held, self._deadline())
                except ShortReadError as e:
                    log.info("%s: %s; asking the registry", what, e)
                    self.whole.drop(key, held)
            redirect = self.routes.redirect(key, self.config.redirect_valid_interval)
            if redirect is not None:
                headers = {"Range": want.header(), "Accept-Encoding": "identity"}
                try:
                    return self.transport.call(Target(None, url=redirect), "GET",
                                               lambda resp: want.consume(resp, what, True),
                                               headers=headers, what=what, follow_redirects=False)
                except (AuthError, NotFoundError, ServerError, UnreachableError, RegistryTimeoutError) as exc:
                    log.info("%s: redirect target failed (%s); resolving again", what, type(exc).__name__)
                    self.routes.forget_redirect(key)
            self._wait_for_filling_mirror(ref, key, stop_waiting)
            answer = self._from_endpoints(ref, key, want, what, single_flight=look < _MAX_LOOKS)
            if answer is not _LOOK_AGAIN:
                return answer  # type: ignore[return-value]
        raise AssertionError("the last look never waits")

    def _wait_for_filling_mirror(self, ref: Reference, key: BlobKey, stop_waiting: float) -> None:
        """When the first mirror is in back-off for this blob (it is filling from the origin, as
        far as we know) and asks to be tried again before `stop_waiting`, wait for it rather than
        send this read to the origin: in a fleet the origin would otherwise serve every node's
        reads on top of the mirror's fill (`mirror_fill_wait`, 0 = never wait)."""
        mirror = next((e for e in self.endpoints(ref) if e.is_mirror), None)
        if mirror is None:
            return
        now = time.monotonic()
        retry_at = self.routes.retry_at(key, mirror)
        if now < retry_at <= stop_waiting:
            time.sleep(retry_at - now)

    def _from_endpoints(self, ref: Reference, key: BlobKey, want: _Want[T], what: str, single_flight: bool):
        """The answer from the first endpoint that gives one, or _LOOK_AGAIN after waiting for
        another request's first contact with a mirror (its outcome changes the order)."""
        return self._walk(ref, key, self.routes.order(key, self.endpoints(ref)), want, what, single_flight, None)

    def _walk(self, ref: Reference, key: BlobKey, endpoints: list[Endpoint], want: _Want[T], what: str,
              single_flight: bool, race: _Race | None):
        for i, endpoint in enumerate(endpoints):
            last = i == len(endpoints) - 1
            delay = None if race is not None or last else self._race_delay(key, endpoint)
            if delay is not None:
                return self._race(ref, key, endpoint, endpoints[i + 1:], want, what, single_flight, delay)
            answer = self._attempt(ref, key, endpoint, want, what, last, single_flight, race)
            if answer is not _NEXT:
                return answer
        raise AssertionError("the last endpoint never passes")

    def _race_delay(self, key: BlobKey, endpoint: Endpoint) -> float | None:
        """How long a read gives a mirror not known to hold the blob before the origin is asked
        too (None: no race). A mirror met for the first time gets `mirror_race`; one that answered
        with a whole body before (still filling, as far as we know) gets no head start unless reads
        are configured to wait for filling mirrors."""
        if not endpoint.is_mirror or self.config.mirror_race <= 0:
            return None
        confirmed, failures, slow = self.routes.standing(key, endpoint)
        if confirmed:
            return None
        return self.config.mirror_race if not failures or slow or self.config.mirror_fill_wait > 0 else 0.0

    def _race(self, ref: Reference, key: BlobKey, mirror: Endpoint, rest: list[Endpoint], want: _Want[T],
              what: str, single_flight: bool, delay: float):
        """Ask `mirror` on a thread; when its answer's status has not come within `delay`, ask the
        `rest` (the origin) too. The first answer whose status says it serves the read takes it
        (`_Race.claim`); the other is hung up on, and only the taker writes to a sink. A cold
        pull-through mirror answers only after its own round trips to the origin (and queues them
        when many nodes miss at once): without the race every read of a node waited for that."""
        race = _Race()

        def run() -> None:
            try:
                race.outcome = ("value", self._attempt(ref, key, mirror, want, what, False, single_flight, race))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for this answer
                race.outcome = ("error", exc)
            finally:
                race.answered.set()
                race.done.set()

        threading.Thread(target=run, name=f"mirror-{key[2][7:19]}", daemon=True).start()
        if race.answered.wait(delay):
            return self._mirror_answer(ref, key, rest, want, what, single_flight, race)
        try:
            answer = self._walk(ref, key, rest, want, what, single_flight, race)
        except _RaceLost:
            return self._mirror_answer(ref, key, rest, want, what, single_flight, race)
        except RegistryError:
            race.done.wait()
            kind, value = race.outcome
            if kind == "value" and value is not _NEXT and value is not _LOOK_AGAIN:
                return value  # the origin failed, the mirror served
            raise
        if answer is _LOOK_AGAIN:
            return self._mirror_answer(ref, key, rest, want, what, single_flight, race)
        return answer

    def _mirror_answer(self, ref: Reference, key: BlobKey, rest: list[Endpoint], want: _Want[T], what: str,
                       single_flight: bool, race: _Race):
        """The raced mirror's answer once it has ended; the rest of the endpoints when it could not serve."""
        race.done.wait()
        kind, value = race.outcome
        if kind == "error":
            raise value
        if value is _NEXT:
            return self._walk(ref, key, rest, want, what, single_flight, None)
        return value

    def _attempt(self, ref: Reference, key: BlobKey, endpoint: Endpoint, want: _Want[T], what: str, last: bool,
                 single_flight: bool, race: _Race | None):
        """One endpoint's answer: the result, `_NEXT` (ask the next endpoint) or `_LOOK_AGAIN`.
        Raises `_RaceLost` when `race` went to another answer first."""
        path = f"/v2/{ref.repository}/blobs/{key[2]}"
        headers = {"Range": want.header(), "Accept-Encoding": "identity"}
        taken: list[WholeBlob] = []
        lost: list[bool] = []
        final_url: list[str] = []
        probe_wait = self.config.mirror_race if self.config.mirror_race > 0 else self.config.read_timeout
        with self.routes.first_contact(key, endpoint, probe_wait) as contact:
            if not contact.go:
                if not contact.settled and self.config.mirror_race > 0:
                    return _NEXT  # another read's first contact is still waiting for this mirror
                if single_flight:
                    return _LOOK_AGAIN

            def consume(resp: requests.Response):
                if getattr(resp, "redirected", False):
                    final_url[:] = [resp.url]
                try:
                    if resp.status_code == 200:
                        return self._full_body(key, endpoint, last, resp, want, what, taken, race, lost)
                    if resp.status_code == 206:
                        self.routes.served(key, endpoint, None)
                        _claim(race, endpoint, what)
                finally:
                    contact.settle()
                    if race is not None and endpoint.is_mirror:
                        race.answered.set()
                return want.consume(resp, what, last)

            hangup = race.hangup_for(endpoint) if race is not None else None
            try:
                result = self.transport.call(self.target(endpoint, path, ref), "GET", consume,
                                             repository=ref.repository, headers=headers, what=what, hangup=hangup)
            except HungUp:
                self._lost_before_answering(key, endpoint, what)
                raise _RaceLost(f"{what}: answered by another endpoint first") from None
            except RangeNotSatisfiableError:
                raise
            except RegistryError as exc:
                if hangup is not None and hangup.hung_up:  # e.g. a token request it made was hung up on
                    self._lost_before_answering(key, endpoint, what)
                    raise _RaceLost(f"{what}: answered by another endpoint first") from None
                if last:
                    raise
                if not isinstance(exc, RangeIgnoredError):
                    self.endpoint_failed(endpoint, exc, what)
                    self._skip_for_blob(key, endpoint, what, type(exc).__name__)
                return _NEXT
        if taken:
            held = self._start_reader(key, endpoint, taken[0], result, what)
            if lost:
                return _NEXT  # held for the blob's later reads; this one was answered by the other runner
            try:
                return want.from_whole(held, self._deadline())
            except ShortReadError as exc:
                if last:
                    raise
                log.info("%s: %s; asking the next endpoint", what, exc)
                return _NEXT
        redirect = final_url[0] if final_url and url_host(final_url[0]) != endpoint.host else None
        self.routes.served(key, endpoint, redirect)
        return result

    def _full_body(self, key: BlobKey, endpoint: Endpoint, last: bool, resp: requests.Response,
                   want: _Want[T], what: str, taken: list[WholeBlob], race: _Race | None, lost: list[bool]):
        """A 200 with the whole blob to a range request (see the module docstring). In a race it
        is never read forward: the origin is at hand."""
        size = content_length(resp)
        blob = self.whole.start(key, key[2], size) if size is not None and self.whole.fits(size) else None
        if blob is not None:
            taken.append(blob)
            if race is not None and not race.claim(endpoint):
                lost.append(True)
            log.info("%s: %s answered with the whole %d-byte blob; reading it whole", what, endpoint.host, size)
            return resp  # kept open: read on a reader thread
        if endpoint.is_mirror:
            self._skip_for_blob(key, endpoint, what, f"whole {size if size is not None else '?'}-byte body",
                                (size or 0) / ASSUMED_FILL_RATE)
        end = want.end(size)
        if last or (race is None and end is not None and end <= FULL_BODY_FORWARD_LIMIT):
            _claim(race, endpoint, what)
            return want.consume(resp, what, last)
        raise RangeIgnoredError(f"{what}: {endpoint.host} answered with the whole blob; not read")

    def _lost_before_answering(self, key: BlobKey, endpoint: Endpoint, what: str) -> None:
        """A mirror hung up on in a race it lost before its status came: skip it for this blob for
        a back-off (were it asked again at once, a cold mirror would start another copy for every
        read), but give it its head start again after it (it may be warm and only slow)."""
        if endpoint.is_mirror:
            self._skip_for_blob(key, endpoint, what, "slower than the origin; hung up on", slow=True)

    def _skip_for_blob(self, key: BlobKey, endpoint: Endpoint, what: str, reason: str, at_least: float = 0.0,
                       slow: bool = False) -> None:
        delay = self.routes.failed(key, endpoint, at_least, slow)
        if delay:
            log.info("%s: mirror %s could not serve the range (%s); asking it again for this blob in %.1f s",
                     what, endpoint.host, reason, delay)

    def _start_reader(self, key: BlobKey, endpoint: Endpoint, blob: WholeBlob, resp: requests.Response,
                      what: str) -> WholeBlob:
        def ended(b: WholeBlob) -> None:
            if b.failed:
                self.whole.drop(key, b)
                self._skip_for_blob(key, endpoint, what, "its whole body failed")
            else:
                log.debug("%s: whole blob held (%d bytes)", what, b.size)

        threading.Thread(target=blob.fill, args=(resp, f"blob {key[2]} from {endpoint.host}", ended),
                         name=f"whole-{key[2][7:19]}", daemon=True).start()
        return blob

    # ---- the whole blob as a stream (background fetch) ----------------------------------------

    def stream_blob(self, ref: Reference, digest: str, sink: RangeSink, offset: int, wait_for_mirror: float) -> int:
        """See `RegistryClient.stream_blob`."""
        key = self._key(ref, digest)
        held = self.whole.get(key)
        if held is not None:
            held.stream(offset, held.size - offset, sink, self._deadline())
            return held.size
        give_up_waiting = time.monotonic() + wait_for_mirror
        pos = offset
        verify = DigestCheck(digest) if offset == 0 else None
        failures = 0
        while True:
            endpoints = self.endpoints(ref)
            endpoint = self._stream_endpoint(key, endpoints, give_up_waiting)
            last = endpoint is endpoints[-1]
            state = _StreamState(pos, verify)
            try:
                self._stream_once(ref, key, endpoint, state, sink,
                                  accept_full_body=last or time.monotonic() >= give_up_waiting)
            except RangeIgnoredError:
                continue  # a filling mirror: wait for it (it is in back-off for this blob now)
            except RangeNotSatisfiableError:
                raise
            except RegistryError as exc:
                pos = state.pos  # resume where it broke
                failures += 1
                if not last:
                    self.endpoint_failed(endpoint, exc, f"blob {digest}")
                    self._skip_for_blob(key, endpoint, f"blob {digest}", type(exc).__name__)
                elif failures > self.config.max_retries:
                    raise
                continue
            if verify is not None:
                verify.check(f"blob {digest} from {endpoint.host}")
            self.routes.served(key, endpoint, None)
            return state.size if state.size is not None else state.pos

    def _stream_endpoint(self, key: BlobKey, endpoints: list[Endpoint], give_up_waiting: float) -> Endpoint:
        """The first mirror not in back-off; a mirror in back-off is waited for when its retry time
        comes before `give_up_waiting`; else the origin."""
        for endpoint in endpoints[:-1]:
            retry_at = self.routes.retry_at(key, endpoint)
            now = time.monotonic()
            if retry_at <= now:
                return endpoint
            if retry_at <= give_up_waiting:
                time.sleep(retry_at - now)
                return endpoint
        return endpoints[-1]

    def _stream_once(self, ref: Reference, key: BlobKey, endpoint: Endpoint, state: _StreamState,
                     sink: RangeSink, accept_full_body: bool) -> None:
        what = f"blob {key[2]} from byte {state.pos}"

        def consume(resp: requests.Response) -> None:
            if resp.status_code == 200 and not accept_full_body:
                self._skip_for_blob(key, endpoint, what, "whole body from a filling mirror",
                                (content_length(resp) or 0) / ASSUMED_FILL_RATE)
                raise RangeIgnoredError(f"{what}: {endpoint.host} is still filling")
            state.open(resp, what)
            if resp.status_code == 206 and endpoint.is_mirror:
                # It holds the blob: the node's reads of it go to it from now on, without racing the
                # origin. Not only once the stream has ended: a mirror serving every node's stream
                # answers reads slower than the origin, and a read that lost a race to the origin
                # would be hung up on before its answer could confirm the mirror.
                self.routes.served(key, endpoint, None)
            state.copy(resp, sink, what)

        self.transport.call(self.target(endpoint, f"/v2/{ref.repository}/blobs/{key[2]}", ref), "GET", consume,
                            repository=ref.repository, what=what, retries=0,
                            headers={"Range": f"bytes={state.pos}-", "Accept-Encoding": "identity"})


class DigestCheck:
    """sha256 (or the digest's algorithm) of a blob streamed from its first byte, in order."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self._hasher = hasher_for(digest)
        self.pos = 0

    def update(self, offset: int, piece: bytes) -> None:
        if offset + len(piece) <= self.pos:
            return
        fresh = memoryview(piece)[self.pos - offset:]
        self._hasher.update(fresh)
        self.pos += len(fresh)

    def check(self, what: str) -> None:
        actual = f"{self.digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatchError(f"{what}: content hashes to {actual}")


class _StreamState:
    """Progress of one `stream_blob`: where the next byte goes, the blob size once known."""

    def __init__(self, pos: int, verify: DigestCheck | None) -> None:
        self.start = pos
        self.pos = pos
        self.size: int | None = None
        self.verify = verify

    def open(self, resp: requests.Response, what: str) -> None:
        check_status(resp, what, ok=(200, 206))
        if resp.status_code == 206:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr.first != self.pos:
                raise ShortReadError(f"{what}: server answered another range ({resp.headers.get('Content-Range')!r})")
            self.size = cr.total
            return
        self.size = content_length(resp)
        skipped = 0
        while skipped < self.pos:  # a 200 we accepted: read forward to where we are
            got = read_exact_body(resp, min(READ_CHUNK, self.pos - skipped))
            if not got:
                raise ShortReadError(f"{what}: body ended at byte {skipped}")
            skipped += len(got)

    def copy(self, resp: requests.Response, sink: RangeSink, what: str) -> None:
        while True:
            piece = read_exact_body(resp, STREAM_PIECE)
            if not piece:
                break
            sink(self.pos, piece)
            if self.verify is not None:
                self.verify.update(self.pos, piece)
            self.pos += len(piece)
        if self.size is not None and self.pos < self.size:
            raise ShortReadError(f"{what}: body ended at byte {self.pos} of {self.size}")
