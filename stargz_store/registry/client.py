"""The registry client used by the daemon (lazy ranged reads) and the converter (pull and push).

Pull operations try the host's mirrors in order, then the origin; pushes go to the origin only.
Everything that names content by digest is verified before it is returned, except ranged reads,
which the layer reader verifies per chunk against the TOC.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar
from urllib.parse import urljoin, urlsplit

import requests

from .blob_stream import BlobStream, ResumePolicy
from .config import Endpoint, HostConfig, MirrorConfig, RegistryConfig, endpoints_for
from .credentials import CredentialStore
from .runtime_credentials import RuntimeCredentials
from .errors import (
    DigestMismatchError,
    InvalidReferenceError,
    NotFoundError,
    PlatformNotFoundError,
    RangeNotSatisfiableError,
    RegistryError,
    RegistryTimeoutError,
    ServerError,
    ShortReadError,
    UnreachableError,
    UnsupportedManifestError,
)
from .manifest import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_SCHEMA1,
    MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Manifest,
    parse_json,
    sha256_digest,
    sniff_media_type,
)
from .multipart import parse_content_range
from .platforms import Platform, parse_platform, select_descriptor
from .ranged import RangedReader
from .reference import Reference, check_digest
from .responses import (
    READ_CHUNK,
    RangeSink,
    check_same_digest,
    read_limited,
    url_host,
)
from .transport import Target, Transport, check_status

__all__ = [
    "RegistryClient", "RegistryConfig", "HostConfig", "MirrorConfig", "Manifest", "sha256_digest",
    "sniff_media_type", "MEDIA_TYPE_OCI_MANIFEST", "MEDIA_TYPE_OCI_INDEX", "MEDIA_TYPE_DOCKER_MANIFEST",
    "MEDIA_TYPE_DOCKER_LIST", "MEDIA_TYPE_DOCKER_SCHEMA1", "MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED",
    "IMAGE_MANIFEST_TYPES", "INDEX_TYPES",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_NESTED_INDEX = 4
MIRROR_COOLDOWN = 30.0  # seconds a failing mirror is skipped
_UPLOAD_RETRYABLE = (UnreachableError, RegistryTimeoutError, ShortReadError, ServerError, RangeNotSatisfiableError)


class RegistryClient:
    """Thread-safe client; create one per process and share it (it owns the connection pool)."""

    def __init__(self, config: RegistryConfig | None = None, credentials: CredentialStore | None = None,
                 runtime_credentials: RuntimeCredentials | None = None) -> None:
        self.config = config or RegistryConfig()
        self.transport = Transport(self.config, credentials, runtime_credentials)
        # What the runtime's auth helper sent, per image reference (used by pulls for that reference)
        self.runtime_credentials = self.transport.runtime_credentials
        self._endpoint_cache: dict[tuple[str, bool], list[Endpoint]] = {}
        self._mirror_down_until: dict[str, float] = {}
        self._ranged = RangedReader(self.config, self.transport, self._live_endpoints, self._target, self._mirror_failed)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- endpoints -------------------------------------------------------------------------

    def _endpoints(self, ref: Reference, pull: bool = True) -> list[Endpoint]:
        """A fresh list (callers reorder it); the config is fixed for the client's lifetime."""
        key = (ref.registry, pull)
        cached = self._endpoint_cache.get(key)
        if cached is None:
            cached = self._endpoint_cache[key] = endpoints_for(self.config, ref.registry, pull=pull)
        return list(cached)

    def learn_schemes(self) -> int:
        """Find out, ahead of the first pull, which configured insecure hosts speak plain HTTP.

        Such a host is tried with HTTPS first; finding out on the first pull costs a failed TLS
        handshake and a second connection (three round trips, about 60 ms on a 20 ms link) on the
        critical path of that pull. Returns how many endpoints were probed; failures are only
        logged (the first real request tries again)."""
        registries = sorted(set(self.config.hosts) | set(self.config.insecure_hosts) | set(self.config.mirrors))
        probed = 0
        for registry in registries:
            for endpoint in endpoints_for(self.config, registry):
                if endpoint.tls is not None or not endpoint.insecure or endpoint.default_scheme() != "https":
                    continue  # nothing to discover (loopback hosts start with plain HTTP)
                probed += 1
                try:
                    scheme = self.transport.learn_scheme(endpoint)
                    log.debug("%s: scheme %s", endpoint.host, scheme or "https (not confirmed)")
                except requests.exceptions.RequestException as e:
                    log.debug("%s: not reachable yet (%s)", endpoint.host, type(e).__name__)
        return probed

    def _live_endpoints(self, ref: Reference) -> list[Endpoint]:
        """Pull endpoints without the mirrors that failed recently (the origin always stays)."""
        now = time.monotonic()
        return [e for e in self._endpoints(ref) if not e.is_mirror or self._mirror_down_until.get(e.host, 0) <= now]

    def has_mirror(self, ref: Reference) -> bool:
        """Whether pulls of `ref` are configured to go through a mirror first."""
        return any(e.is_mirror for e in self._endpoints(ref))

    def _mirror_failed(self, endpoint: Endpoint, exc: RegistryError, what: str) -> None:
        """A mirror that cannot be reached (or does not answer in time) is skipped for a while, so a
        dead mirror costs one round of retries per cool-down instead of one per read. A mirror that
        answers with an error is alive and is not skipped host-wide: distribution's pull-through
        proxy answers 404 or 500 to an OCI manifest asked for by tag, and skipping it then sent
        every blob read of the node to the origin for 30 s (a blob's reads have their own back-off
        per mirror, `routes.BlobRoutes`)."""
        if isinstance(exc, (UnreachableError, RegistryTimeoutError)):
            self._mirror_down_until[endpoint.host] = time.monotonic() + MIRROR_COOLDOWN
            log.warning("%s via mirror %s failed (%s); skipping it for %.0fs", what, endpoint.host, exc,
                        MIRROR_COOLDOWN)
        else:
            log.info("%s via mirror %s failed (%s); trying the next endpoint", what, endpoint.host, exc)

    def _target(self, endpoint: Endpoint, path: str, ref: Reference) -> Target:
        if endpoint.is_mirror:
            path += ("&" if "?" in path else "?") + f"ns={endpoint.registry}"
        return Target(endpoint, path, reference=ref)

    def _pull(self, ref: Reference, path: str, method: str, consume: Callable[[requests.Response], T],
              what: str, headers: dict[str, str] | None = None, image: Reference | None = None,
              race: bool = False) -> tuple[T, Endpoint]:
        """Try mirrors then the origin; a mirror's failure is logged and the next endpoint tried
        at once (a mirror is not retried: the next endpoint is the better retry).

        `image`: the reference the runtime asked for when `ref` is derived from it (an index's
        platform manifest); runtime credentials are chosen by it. `race`: a mirror that has not
        answered within `mirror_race` is raced against the next endpoint (`_pull_raced`); only
        for a `consume` that returns data, never the open response."""
        return self._pull_from(self._live_endpoints(ref), ref, path, method, consume, what, headers, image, race)

    def _pull_from(self, endpoints: list[Endpoint], ref: Reference, path: str, method: str,
                   consume: Callable[[requests.Response], T], what: str, headers: dict[str, str] | None,
                   image: Reference | None, race: bool) -> tuple[T, Endpoint]:
        for i, endpoint in enumerate(endpoints):
            last = i == len(endpoints) - 1
            if race and not last and self.config.mirror_race > 0:
                return self._pull_raced(endpoint, endpoints[i + 1:], ref, path, method, consume, what, headers, image)
            try:
                return self._pull_once(endpoint, last, ref, path, method, consume, what, headers, image), endpoint
            except RegistryError as exc:
                if last or isinstance(exc, InvalidReferenceError):
                    raise
                self._mirror_failed(endpoint, exc, what)
        raise AssertionError("endpoint list is never empty")

    def _pull_once(self, endpoint: Endpoint, last: bool, ref: Reference, path: str, method: str,
                   consume: Callable[[requests.Response], T], what: str, headers: dict[str, str] | None,
                   image: Reference | None) -> T:
        return self.transport.call(self._target(endpoint, path, image or ref), method, consume,
                                   repository=ref.repository, headers=headers, what=what,
                                   retries=None if last else 0)

    def _pull_raced(self, mirror: Endpoint, rest: list[Endpoint], ref: Reference, path: str, method: str,
                    consume: Callable[[requests.Response], T], what: str, headers: dict[str, str] | None,
                    image: Reference | None) -> tuple[T, Endpoint]:
        """Ask `mirror` on a thread; when it has not answered within `mirror_race`, ask the `rest`
        too and take the first success. A pull-through mirror that misses asks the origin itself
        before it answers, and queues those round trips when many nodes miss at once (seconds,
        measured with distribution 2.8): a node's image lookup should not wait for that."""
        outcome: dict[str, object] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = self._pull_once(mirror, False, ref, path, method, consume, what, headers, image)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for this answer
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="mirror-pull", daemon=True).start()
        if not done.wait(self.config.mirror_race):
            try:
                return self._pull_from(rest, ref, path, method, consume, what, headers, image, True)
            except RegistryError:
                done.wait()
                if "value" in outcome:
                    return outcome["value"], mirror  # type: ignore[return-value]
                raise
        if "value" in outcome:
            return outcome["value"], mirror  # type: ignore[return-value]
        exc = outcome["error"]
        if not isinstance(exc, RegistryError) or isinstance(exc, InvalidReferenceError):
            raise exc  # type: ignore[misc]
        self._mirror_failed(mirror, exc, what)
        return self._pull_from(rest, ref, path, method, consume, what, headers, image, True)

    # ---- manifests -------------------------------------------------------------------------

    def get_raw_manifest(self, ref: Reference, image: Reference | None = None) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest); may be an index. Pinned digests are verified.

        `image`: the reference `ref` was derived from, if any (see `_pull`)."""
        what = f"manifest {ref}"
        path = f"/v2/{ref.repository}/manifests/{ref.manifest_ref}"

        def consume(resp: requests.Response) -> tuple[bytes, str]:
            check_status(resp, what)
            raw = read_limited(resp, MAX_MANIFEST_SIZE, what)
            if ref.digest:
                check_same_digest(ref.digest, raw, what)  # inside: a bad mirror falls back to the origin
            return raw, resp.headers.get("Content-Type", "")

        (raw, content_type), _ = self._pull(ref, path, "GET", consume, what, {"Accept": MANIFEST_ACCEPT}, image=image,
                                            race=True)
        digest = ref.digest or sha256_digest(raw)
        return raw, sniff_media_type(raw, content_type), digest

    def head_manifest(self, ref: Reference) -> tuple[str, str, int]:
        """(digest, media type, size) without the body, e.g. to resolve a tag cheaply.

        Falls back to a GET when the registry omits Docker-Content-Digest.
        """
        what = f"manifest {ref}"
        path = f"/v2/{ref.repository}/manifests/{ref.manifest_ref}"

        def consume(resp: requests.Response) -> tuple[str | None, str, int]:
            check_status(resp, what)
            return (resp.headers.get("Docker-Content-Digest"), resp.headers.get("Content-Type", ""),
                    int(resp.headers.get("Content-Length") or 0))

        (digest, media_type, size), _ = self._pull(ref, path, "HEAD", consume, what, {"Accept": MANIFEST_ACCEPT},
                                                   race=True)
        if ref.digest:
            return ref.digest, media_type.split(";")[0].strip(), size
        if not digest:
            raw, media_type, digest = self.get_raw_manifest(ref)
            return digest, media_type, len(raw)
        return digest, media_type.split(";")[0].strip(), size

    def get_manifest(self, ref: Reference, platform: str | None = None) -> Manifest:
        """The image manifest for `ref`, following an index to `platform` (default: the host's)."""
        wanted: Platform = parse_platform(platform)
        raw, media_type, digest = self.get_raw_manifest(ref)
        for _ in range(MAX_NESTED_INDEX):
            if media_type in (MEDIA_TYPE_DOCKER_SCHEMA1, MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED):
                raise UnsupportedManifestError(
                    f"{ref} is a Docker schema 1 image, which has no config; convert it with a newer tool")
            if media_type not in INDEX_TYPES:
                return Manifest.from_raw(raw, media_type, digest)
            index = parse_json(raw, f"index {digest}")
            chosen = select_descriptor(index, wanted)
            if chosen is None or not chosen.get("digest"):
                available = sorted({
                    "/".join(filter(None, [str((d.get("platform") or {}).get(k, "")) for k in
                                           ("os", "architecture", "variant")]))
                    for d in index.get("manifests") or [] if isinstance(d, dict)
                })
                raise PlatformNotFoundError(f"{ref} has no image for {wanted} (available: {', '.join(available)})")
            raw, media_type, digest = self.get_raw_manifest(ref.with_digest(chosen["digest"]), image=ref)
            if chosen.get("mediaType") and media_type not in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
                media_type = chosen["mediaType"]
        raise UnsupportedManifestError(f"{ref}: indexes nested deeper than {MAX_NESTED_INDEX}")

    def get_config(self, ref: Reference, manifest: Manifest) -> dict:
        """The image config JSON of `manifest`, sha256 verified."""
        return parse_json(self.get_blob(ref, manifest.config["digest"]), f"config {manifest.config['digest']}")

    # ---- blobs: whole ---------------------------------------------------------------------

    def get_blob(self, ref: Reference, digest: str) -> bytes:
        """The whole blob in memory, verified against `digest`."""
        with self.open_blob(ref, digest) as stream:
            return stream.read()

    def open_blob(self, ref: Reference, digest: str) -> BinaryIO:
        """A streaming reader of the whole blob. It resumes with a Range request when the connection
        breaks and raises DigestMismatchError at EOF when the content is not `digest`."""
        check_digest(digest)
        path = f"/v2/{ref.repository}/blobs/{digest}"
        what = f"blob {digest} in {ref.name}"

        def get(headers: dict[str, str], consume: Callable[[requests.Response], requests.Response]) -> requests.Response:
            return self._pull(ref, path, "GET", consume, what, headers)[0]

        resume = ResumePolicy(self.config.max_retries, self.config.min_wait, self.config.max_wait)
        return io.BufferedReader(BlobStream(get, digest, what, resume), buffer_size=READ_CHUNK)  # type: ignore[return-value]

    def blob_size(self, ref: Reference, digest: str) -> int:
        """Size from HEAD; some storage backends refuse HEAD, then a 1-byte ranged GET tells the total."""
        check_digest(digest)
        what = f"blob {digest} in {ref.name}"
        path = f"/v2/{ref.repository}/blobs/{digest}"

        def consume(resp: requests.Response) -> int | None:
            if resp.status_code in (403, 405) and getattr(resp, "redirected", False):
                return None
            check_status(resp, what)
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None

        size, _ = self._pull(ref, path, "HEAD", consume, what)
        if size is not None:
            return size

        def consume_get(resp: requests.Response) -> int:
            check_status(resp, what, ok=(200, 206))
            if resp.status_code == 206:
                cr = parse_content_range(resp.headers.get("Content-Range"))
                if cr and cr.total is not None:
                    return cr.total
            length = resp.headers.get("Content-Length")
            if resp.status_code == 200 and length and length.isdigit():
                return int(length)
            raise ServerError(f"{what}: registry does not tell the blob size")

        size2, _ = self._pull(ref, path, "GET", consume_get, what, {"Range": "bytes=0-0", "Accept-Encoding": "identity"})
        return size2

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        """True/False from HEAD on the origin (pushes need the origin's answer, not a mirror's)."""
        check_digest(digest)
        what = f"blob {digest} in {ref.name}"
        endpoint = self._endpoints(ref, pull=False)[-1]

        def consume(resp: requests.Response) -> bool:
            if resp.status_code == 404:
                return False
            check_status(resp, what)
            return True

        return self.transport.call(Target(endpoint, f"/v2/{ref.repository}/blobs/{digest}"), "HEAD", consume,
                                   repository=ref.repository, what=what)

    # ---- blobs: ranges --------------------------------------------------------------------
    # Ranged reads go through `ranged.RangedReader`: mirrors first, a mirror's whole-body answer
    # handled on purpose (held whole, read forward a little, or abandoned for the origin), a
    # mirror that could not serve a blob skipped for that blob for a short back-off only.

    @property
    def _single_range_hosts(self) -> set[str]:
        return self._ranged.single_range_hosts

    def read_blob_range(
        self, ref: Reference, digest: str, offset: int, length: int, sink: RangeSink | None = None
    ) -> bytes:
        """Exactly `length` bytes at `offset`, or an error (ShortReadError, RangeNotSatisfiableError...).

        With a `sink`, the bytes go to it piece by piece as they arrive (b"" is returned), so a
        caller can use the start of a large range before its end has arrived; after a retry the
        sink sees the range again from its start."""
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        check_digest(digest)
        return self._ranged.read_range(ref, digest, offset, length, sink)

    def read_blob_tail(self, ref: Reference, digest: str, length: int) -> tuple[int, int, bytes]:
        """The last `length` bytes of a blob whose size is not known yet (a suffix range):
        (their offset, the blob size, the bytes). The whole blob when it is shorter. Raises
        ShortReadError when no server answers with that range (a whole body is used only when it
        is small: see `ranged`)."""
        if length <= 0:
            raise ValueError(f"invalid tail length {length}")
        check_digest(digest)
        return self._ranged.read_tail(ref, digest, length)

    def read_blob_ranges(self, ref: Reference, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) pair, in the given order, with as few requests as the
        registry allows: one multi-range request (multipart/byteranges) where supported, else one
        request per merged region (remembered per host after the first refusal)."""
        for off, length in ranges:
            if off < 0 or length < 0:
                raise ValueError(f"invalid range offset={off} length={length}")
        check_digest(digest)
        return self._ranged.read_ranges(ref, digest, ranges)

    def stream_blob(self, ref: Reference, digest: str, sink: RangeSink, *, offset: int = 0,
                    wait_for_mirror: float = 0.0) -> int:
        """The blob from `offset` to its end, handed to `sink(offset, piece)` in order as it
        arrives, with one GET (`Range: bytes=offset-`) per attempt; returns the blob size.

        Made for background fetch, which wants a whole layer at low priority: one request per
        blob instead of one per batch, from a mirror rather than the origin. A mirror is asked
        first; one that answers with a whole body while it is still filling from the origin
        (a pull-through cache) is waited for, up to `wait_for_mirror` seconds, by the per-blob
        back-off (each answer abandoned costs the origin little; reading it would cost a full
        copy), and the origin is used after that, or at once when no mirror is configured.
        A connection that breaks resumes from the next byte (`max_retries` times at the origin).
        Read from byte 0 to the end, the blob is verified against `digest` (DigestMismatchError
        at the end; the pieces already handed over were not verified: the sink verifies them).
        The sink may block (flow control: the server waits), but not longer than the read
        timeout, or the connection breaks and the stream resumes with a new request."""
        check_digest(digest)
        if offset < 0:
            raise ValueError(f"invalid offset {offset}")
        return self._ranged.stream_blob(ref, digest, sink, offset, wait_for_mirror)

    # ---- push ------------------------------------------------------------------------------

    def push_blob(self, ref: Reference, digest: str, path_or_bytes: str | os.PathLike | bytes) -> None:
        """Upload a blob unless the registry has it: monolithic up to `monolithic_push_limit`, else
        chunked PATCHes of `push_chunk_size`, streaming from the file (never all in memory)."""
        check_digest(digest)
        if self.blob_exists(ref, digest):
            log.debug("blob %s already in %s", digest, ref.name)
            return
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            data = bytes(path_or_bytes)
            if sha256_digest(data) != digest and digest.startswith("sha256:"):
                raise DigestMismatchError(f"refusing to push: content does not match {digest}")
            size = len(data)
            opener: Callable[[], BinaryIO] = lambda: io.BytesIO(data)  # noqa: E731
        else:
            path = Path(path_or_bytes)
            size = path.stat().st_size
            opener = lambda: open(path, "rb")  # noqa: E731
        endpoint = self._endpoints(ref, pull=False)[-1]
        if size <= self.config.monolithic_push_limit:
            self._push_monolithic(ref, endpoint, digest, opener, size)
        else:
            self._push_chunked(ref, endpoint, digest, opener, size)

    def _start_upload(self, ref: Reference, endpoint: Endpoint, what: str) -> str:
        def consume(resp: requests.Response) -> str:
            check_status(resp, what, ok=(202,))
            location = resp.headers.get("Location")
            if not location:
                raise ServerError(f"{what}: upload started without a Location")
            return urljoin(resp.url, location)

        return self.transport.call(Target(endpoint, f"/v2/{ref.repository}/blobs/uploads/"), "POST", consume,
                                   repository=ref.repository, actions=("pull", "push"),
                                   headers={"Content-Length": "0"}, what=what)

    def _upload_target(self, endpoint: Endpoint, url: str, extra_query: str = "") -> Target:
        parts = urlsplit(url)
        path = parts.path + ("?" + parts.query if parts.query else "")
        if extra_query:
            path += ("&" if parts.query else "?") + extra_query
        if url_host(url) == endpoint.host:
            return Target(endpoint, path)
        return Target(None, url=url + (("&" if parts.query else "?") + extra_query if extra_query else ""))

    def _push_monolithic(self, ref: Reference, endpoint: Endpoint, digest: str,
                         opener: Callable[[], BinaryIO], size: int) -> None:
        what = f"push blob {digest} to {ref.name}"
        for attempt in range(2):
            location = self._start_upload(ref, endpoint, what)
            files: list[BinaryIO] = []

            def body() -> BinaryIO:
                for f in files:
                    f.close()
                files[:] = [opener()]
                return files[0]

            try:
                self.transport.call(
                    self._upload_target(endpoint, location, f"digest={digest}"), "PUT",
                    lambda resp: check_status(resp, what, ok=(201, 204)),
                    repository=ref.repository, actions=("pull", "push"),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    body=body, what=what, retries=0)
                return
            except (UnreachableError, RegistryTimeoutError, ShortReadError, ServerError):
                if attempt == 1:
                    raise
                log.info("%s: upload failed; starting a new upload session", what)
            finally:
                for f in files:
                    f.close()

    def _push_chunked(self, ref: Reference, endpoint: Endpoint, digest: str,
                      opener: Callable[[], BinaryIO], size: int) -> None:
        """PATCH chunks; after a failed chunk, ask the registry how far it got and go on from there.
        When the session itself is lost (docker-registry cancels an upload resumed with a stale
        state token), start a new session from byte 0, a bounded number of times."""
        what = f"push blob {digest} to {ref.name}"
        failures = 0
        with opener() as f:
            while True:
                location = self._start_upload(ref, endpoint, what)
                try:
                    location, failures = self._patch_chunks(ref, endpoint, f, size, location, failures, what)
                    self.transport.call(self._upload_target(endpoint, location, f"digest={digest}"), "PUT",
                                        lambda resp: check_status(resp, what, ok=(201, 204)),
                                        repository=ref.repository, actions=("pull", "push"),
                                        headers={"Content-Length": "0"}, body=b"", what=what)
                    return
                except (_UPLOAD_RETRYABLE + (NotFoundError,)) as exc:
                    failures += 1
                    if failures > self.config.max_retries:
                        raise
                    log.info("%s: upload session lost (%s); starting a new one", what, type(exc).__name__)

    def _patch_chunks(self, ref: Reference, endpoint: Endpoint, f: BinaryIO, size: int, location: str,
                      failures: int, what: str) -> tuple[str, int]:
        chunk = max(1, self.config.push_chunk_size)
        offset = 0

        def consume(resp: requests.Response) -> str:
            check_status(resp, what, ok=(202, 204))
            return urljoin(resp.url, resp.headers.get("Location") or location)

        while offset < size:
            n = min(chunk, size - offset)
            f.seek(offset)
            piece = f.read(n)
            try:
                location = self.transport.call(
                    self._upload_target(endpoint, location), "PATCH", consume,
                    repository=ref.repository, actions=("pull", "push"),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{offset}-{offset + n - 1}", "Content-Length": str(n)},
                    body=piece, what=what, retries=0)
                offset += n
            except _UPLOAD_RETRYABLE:
                failures += 1
                if failures > self.config.max_retries:
                    raise
                offset, location = self._upload_status(ref, endpoint, location, what)
                log.info("%s: chunk failed; resuming at byte %d", what, offset)
        return location, failures

    def _upload_status(self, ref: Reference, endpoint: Endpoint, location: str, what: str) -> tuple[int, str]:
        """Bytes the registry holds for an upload (its `Range: 0-N` header) and the session URL."""
        def consume(resp: requests.Response) -> tuple[int, str]:
            check_status(resp, what, ok=(204,))
            rng = resp.headers.get("Range", "")
            nxt = urljoin(resp.url, resp.headers.get("Location") or location)
            first, _, last = rng.strip().partition("-")
            if not (first.isdigit() and last.isdigit()) or rng.strip() == "0-0":
                return 0, nxt  # docker-registry reports an empty upload as "0-0"
            return int(last) + 1, nxt

        return self.transport.call(self._upload_target(endpoint, location), "GET", consume,
                                   repository=ref.repository, actions=("pull", "push"), what=what)

    def push_manifest(self, ref: Reference, raw: bytes, media_type: str) -> str:
        """PUT the manifest at `ref.tag` (or its digest when untagged); returns sha256 of `raw`."""
        digest = sha256_digest(raw)
        if ref.digest and not ref.tag and ref.digest != digest:
            raise DigestMismatchError(f"manifest bytes hash to {digest}, not {ref.digest}")
        target_ref = ref.tag or digest
        what = f"push manifest {ref.name}:{target_ref}" if ref.tag else f"push manifest {ref.name}@{digest}"
        endpoint = self._endpoints(ref, pull=False)[-1]

        def consume(resp: requests.Response) -> None:
            check_status(resp, what, ok=(200, 201, 202, 204))
            remote = resp.headers.get("Docker-Content-Digest")
            if remote and remote != digest:
                log.warning("%s: registry reports digest %s, content is %s", what, remote, digest)

        self.transport.call(Target(endpoint, f"/v2/{ref.repository}/manifests/{target_ref}"), "PUT", consume,
                            repository=ref.repository, actions=("pull", "push"),
                            headers={"Content-Type": media_type}, body=raw, what=what)
        return digest


