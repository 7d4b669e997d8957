"""The registry client used by the daemon (lazy ranged reads) and the converter (pull and push).

Pull operations try the host's mirrors in order, then the origin; pushes go to the origin only.
Everything that names content by digest is verified before it is returned, except ranged reads,
which the layer reader verifies per chunk against the TOC.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .config import Endpoint, HostConfig, MirrorConfig, RegistryConfig, endpoints_for
from .credentials import CredentialStore
from .errors import (
    AuthError,
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
    redact_url,
)
from .multipart import (
    MultipartError,
    boundary_of,
    merge_regions,
    parse_byteranges,
    parse_content_range,
    range_header,
    slice_from_parts,
)
from .platforms import Platform, parse_platform, select_descriptor
from .reference import Reference, check_digest
from .transport import Target, Transport, TransientError, check_status

__all__ = [
    "RegistryClient", "RegistryConfig", "HostConfig", "MirrorConfig", "Manifest",
    "MEDIA_TYPE_OCI_MANIFEST", "MEDIA_TYPE_OCI_INDEX", "MEDIA_TYPE_DOCKER_MANIFEST", "MEDIA_TYPE_DOCKER_LIST",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
IMAGE_MANIFEST_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
INDEX_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})
MANIFEST_ACCEPT = ", ".join([
    MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED, MEDIA_TYPE_DOCKER_SCHEMA1,
])
MAX_MANIFEST_SIZE = 4 << 20
MAX_NESTED_INDEX = 4
MAX_RANGES_PER_REQUEST = 64
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """An image manifest (never an index); `digest` is sha256 of exactly `raw`."""

    digest: str
    media_type: str
    raw: bytes = field(repr=False)
    data: dict = field(repr=False)
    layers: list[dict] = field(repr=False)
    config: dict

    def __hash__(self) -> int:
        return hash(self.digest)

    @classmethod
    def from_raw(cls, raw: bytes, media_type: str, digest: str) -> Manifest:
        data = _parse_json(raw, "manifest")
        if media_type not in IMAGE_MANIFEST_TYPES:
            raise UnsupportedManifestError(f"manifest {digest} has unsupported media type {media_type!r}")
        layers, config = data.get("layers"), data.get("config")
        if not isinstance(layers, list) or not isinstance(config, dict) or not config.get("digest"):
            raise UnsupportedManifestError(f"manifest {digest} lacks a valid 'layers' list or 'config' descriptor")
        return cls(digest=digest, media_type=media_type, raw=raw, data=data, layers=layers, config=config)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _parse_json(raw: bytes, what: str) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise UnsupportedManifestError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise UnsupportedManifestError(f"{what} is not a JSON object")
    return doc


def sniff_media_type(raw: bytes, content_type: str | None) -> str:
    """The Content-Type without parameters, else guessed from the JSON (registry.md §4.1)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind and kind not in ("application/json", "text/plain", "application/octet-stream"):
        return kind
    try:
        doc = json.loads(raw)
    except ValueError:
        return kind or "application/octet-stream"
    if isinstance(doc, dict):
        if doc.get("mediaType"):
            return str(doc["mediaType"])
        if doc.get("schemaVersion") == 1:
            return MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED if "signatures" in doc else MEDIA_TYPE_DOCKER_SCHEMA1
        if "manifests" in doc:
            return MEDIA_TYPE_OCI_INDEX
        if "layers" in doc:
            return MEDIA_TYPE_OCI_MANIFEST
    return kind or "application/octet-stream"


@dataclass
class _BlobLocation:
    """Where a blob was last served from: an endpoint, and maybe a redirect target to reuse."""

    endpoint: Endpoint
    redirect_url: str | None = None
    resolved_at: float = 0.0


def _hasher_for(digest: str):
    algorithm = digest.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512", "sha384"):
        raise InvalidReferenceError(f"unsupported digest algorithm in {digest!r}")
    return hashlib.new(algorithm)


class RegistryClient:
    """Thread-safe client; create one per process and share it (it owns the connection pool)."""

    def __init__(self, config: RegistryConfig | None = None, credentials: CredentialStore | None = None) -> None:
        self.config = config or RegistryConfig()
        self.transport = Transport(self.config, credentials)
        self._locations: dict[tuple[str, str, str], _BlobLocation] = {}
        self._single_range_hosts: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- endpoints -------------------------------------------------------------------------

    def _endpoints(self, ref: Reference, pull: bool = True) -> list[Endpoint]:
        return endpoints_for(self.config, ref.registry, pull=pull)

    def _target(self, endpoint: Endpoint, path: str) -> Target:
        if endpoint.is_mirror:
            path += ("&" if "?" in path else "?") + f"ns={endpoint.registry}"
        return Target(endpoint, path)

    def _pull(self, ref: Reference, path: str, method: str, consume: Callable[[requests.Response], T],
              what: str, headers: dict[str, str] | None = None) -> tuple[T, Endpoint]:
        """Try mirrors then the origin; a mirror's failure is logged and the next endpoint tried."""
        endpoints = self._endpoints(ref)
        for i, endpoint in enumerate(endpoints):
            try:
                result = self.transport.call(self._target(endpoint, path), method, consume,
                                             repository=ref.repository, headers=headers, what=what)
                return result, endpoint
            except RegistryError as exc:
                if i == len(endpoints) - 1 or isinstance(exc, (DigestMismatchError, InvalidReferenceError)):
                    raise
                log.warning("%s via mirror %s failed (%s); trying the next endpoint", what, endpoint.host, exc)
        raise AssertionError("endpoint list is never empty")

    # ---- manifests -------------------------------------------------------------------------

    def get_raw_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest); may be an index. Pinned digests are verified."""
        what = f"manifest {ref}"
        path = f"/v2/{ref.repository}/manifests/{ref.manifest_ref}"

        def consume(resp: requests.Response) -> tuple[bytes, str]:
            check_status(resp, what)
            raw = _read_limited(resp, MAX_MANIFEST_SIZE, what)
            return raw, resp.headers.get("Content-Type", "")

        (raw, content_type), _ = self._pull(ref, path, "GET", consume, what, {"Accept": MANIFEST_ACCEPT})
        digest = sha256_digest(raw)
        if ref.digest:
            _check_same_digest(ref.digest, raw, what)
            digest = ref.digest
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

        (digest, media_type, size), _ = self._pull(ref, path, "HEAD", consume, what, {"Accept": MANIFEST_ACCEPT})
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
            index = _parse_json(raw, f"index {digest}")
            chosen = select_descriptor(index, wanted)
            if chosen is None or not chosen.get("digest"):
                available = sorted({
                    "/".join(filter(None, [str((d.get("platform") or {}).get(k, "")) for k in
                                           ("os", "architecture", "variant")]))
                    for d in index.get("manifests") or [] if isinstance(d, dict)
                })
                raise PlatformNotFoundError(f"{ref} has no image for {wanted} (available: {', '.join(available)})")
            raw, media_type, digest = self.get_raw_manifest(ref.with_digest(chosen["digest"]))
            if chosen.get("mediaType") and media_type not in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
                media_type = chosen["mediaType"]
        raise UnsupportedManifestError(f"{ref}: indexes nested deeper than {MAX_NESTED_INDEX}")

    def get_config(self, ref: Reference, manifest: Manifest) -> dict:
        """The image config JSON of `manifest`, sha256 verified."""
        return _parse_json(self.get_blob(ref, manifest.config["digest"]), f"config {manifest.config['digest']}")

    # ---- blobs: whole ---------------------------------------------------------------------

    def get_blob(self, ref: Reference, digest: str) -> bytes:
        """The whole blob in memory, verified against `digest`."""
        with self.open_blob(ref, digest) as stream:
            return stream.read()

    def open_blob(self, ref: Reference, digest: str) -> BinaryIO:
        """A streaming reader of the whole blob. It resumes with a Range request when the connection
        breaks and raises DigestMismatchError at EOF when the content is not `digest`."""
        check_digest(digest)
        return io.BufferedReader(_BlobStream(self, ref, digest), buffer_size=_READ_CHUNK)  # type: ignore[return-value]

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

    def read_blob_range(self, ref: Reference, digest: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or an error (ShortReadError, RangeNotSatisfiableError...)."""
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        check_digest(digest)
        what = f"blob {digest} range {offset}+{length}"

        def consume(resp: requests.Response) -> bytes:
            return _consume_single_range(resp, offset, length, what)

        return self._ranged_get(ref, digest, f"bytes={offset}-{offset + length - 1}", consume, what)

    def read_blob_ranges(self, ref: Reference, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) pair, in the given order, with as few requests as the
        registry allows: one multi-range request (multipart/byteranges) where supported, else one
        request per merged region (remembered per host after the first refusal)."""
        for off, length in ranges:
            if off < 0 or length < 0:
                raise ValueError(f"invalid range offset={off} length={length}")
        check_digest(digest)
        regions = merge_regions(ranges)
        data: list[tuple[int, bytes]] = []
        if len(regions) == 1 or not self._multi_range_ok(ref):
            data = [(off, self.read_blob_range(ref, digest, off, length)) for off, length in regions]
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
        if self.config.force_single_range:
            return False
        return ref.registry not in self._single_range_hosts

    def _fetch_regions(self, ref: Reference, digest: str, regions: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        what = f"blob {digest} ({len(regions)} ranges)"

        refused: list[int] = []

        def consume(resp: requests.Response) -> list[tuple[int, bytes]]:
            if resp.status_code in (400, 416, 501):
                refused.append(resp.status_code)
                return []  # multi-range refused: single ranges below
            if resp.status_code == 200:
                refused.append(200)
                wanted = sum(length for _, length in regions)
                if max(off + length for off, length in regions) > 2 * wanted + _READ_CHUNK:
                    return []  # whole blob coming (e.g. object storage): do not download it for this
            return _consume_multi_range(resp, regions, what)

        parts = self._ranged_get(ref, digest, range_header(regions), consume, what)
        if refused and refused[-1] != 416:
            log.info("%s does not serve multi-range requests (HTTP %d); using single ranges for it",
                     ref.registry, refused[-1])
            self._single_range_hosts.add(ref.registry)
        result = list(parts)
        for off, length in regions:
            if slice_from_parts(result, off, length) is None:
                result.append((off, self.read_blob_range(ref, digest, off, length)))
        return result

    def _loc_key(self, ref: Reference, digest: str) -> tuple[str, str, str]:
        return (ref.registry, ref.repository, digest)

    def _ranged_get(self, ref: Reference, digest: str, range_value: str,
                    consume: Callable[[requests.Response], T], what: str) -> T:
        """GET with Range, reusing the blob's redirect target while fresh and re-resolving it when it
        expires or is refused (403/401/404 from storage), as stargz-snapshotter does."""
        headers = {"Range": range_value, "Accept-Encoding": "identity"}
        key = self._loc_key(ref, digest)
        loc = self._locations.get(key)
        if loc and loc.redirect_url and time.monotonic() - loc.resolved_at < self.config.redirect_valid_interval:
            try:
                return self.transport.call(Target(None, url=loc.redirect_url), "GET", consume,
                                           headers=headers, what=what, follow_redirects=False)
            except (AuthError, NotFoundError, ServerError) as exc:
                log.info("%s: redirect target refused (%s); resolving again", what, type(exc).__name__)
                with self._lock:
                    self._locations.pop(key, None)
                loc = None
        path = f"/v2/{ref.repository}/blobs/{digest}"
        endpoints = [loc.endpoint] if loc else self._endpoints(ref)
        for i, endpoint in enumerate(endpoints):
            final_url: list[str] = []

            def consume_and_note(resp: requests.Response) -> T:
                if getattr(resp, "redirected", False):
                    final_url[:] = [resp.url]
                return consume(resp)

            try:
                result = self.transport.call(self._target(endpoint, path), "GET", consume_and_note,
                                             repository=ref.repository, headers=headers, what=what)
            except (RangeNotSatisfiableError, ShortReadError, DigestMismatchError):
                raise
            except RegistryError as exc:
                if i == len(endpoints) - 1:
                    raise
                log.warning("%s via mirror %s failed (%s); trying the next endpoint", what, endpoint.host, exc)
                continue
            redirect = final_url[0] if final_url and _host(final_url[0]) != endpoint.host else None
            with self._lock:
                self._locations[key] = _BlobLocation(endpoint, redirect, time.monotonic())
            return result
        raise AssertionError("endpoint list is never empty")

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
        if _host(url) == endpoint.host:
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
        what = f"push blob {digest} to {ref.name}"
        location = self._start_upload(ref, endpoint, what)
        chunk = max(1, self.config.push_chunk_size)
        offset = 0
        failures = 0
        with opener() as f:
            while offset < size:
                n = min(chunk, size - offset)
                f.seek(offset)
                piece = f.read(n)

                def consume(resp: requests.Response) -> str:
                    check_status(resp, what, ok=(202, 204))
                    return urljoin(resp.url, resp.headers.get("Location") or location)

                try:
                    location = self.transport.call(
                        self._upload_target(endpoint, location), "PATCH", consume,
                        repository=ref.repository, actions=("pull", "push"),
                        headers={"Content-Type": "application/octet-stream",
                                 "Content-Range": f"{offset}-{offset + n - 1}", "Content-Length": str(n)},
                        body=piece, what=what, retries=0)
                    offset += n
                except (UnreachableError, RegistryTimeoutError, ShortReadError, ServerError, RangeNotSatisfiableError):
                    failures += 1
                    if failures > self.config.max_retries:
                        raise
                    offset, location = self._upload_status(ref, endpoint, location, what)
                    log.info("%s: chunk failed; resuming at byte %d", what, offset)
        self.transport.call(self._upload_target(endpoint, location, f"digest={digest}"), "PUT",
                            lambda resp: check_status(resp, what, ok=(201, 204)),
                            repository=ref.repository, actions=("pull", "push"),
                            headers={"Content-Length": "0"}, body=b"", what=what)

    def _upload_status(self, ref: Reference, endpoint: Endpoint, location: str, what: str) -> tuple[int, str]:
        """Bytes the registry holds for an upload (its `Range: 0-N` header) and the session URL."""
        def consume(resp: requests.Response) -> tuple[int, str]:
            check_status(resp, what, ok=(204,))
            rng = resp.headers.get("Range", "")
            nxt = urljoin(resp.url, resp.headers.get("Location") or location)
            if "-" in rng:
                return int(rng.rsplit("-", 1)[1]) + 1, nxt
            return 0, nxt

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


# ---- response helpers ---------------------------------------------------------------------

def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1]


def _check_same_digest(expected: str, raw: bytes, what: str) -> None:
    h = _hasher_for(expected)
    h.update(raw)
    actual = f"{expected.split(':', 1)[0]}:{h.hexdigest()}"
    if actual != expected:
        raise DigestMismatchError(f"{what}: content hashes to {actual}")


def _read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise UnsupportedManifestError(f"{what}: {length} bytes exceeds the {limit}-byte limit")
    data = _read_exact_body(resp, limit + 1)
    if len(data) > limit:
        raise UnsupportedManifestError(f"{what}: larger than the {limit}-byte limit")
    return data


def _read_exact_body(resp: requests.Response, limit: int) -> bytes:
    """Read the body (up to `limit`); a connection cut short surfaces as a transient error."""
    try:
        return resp.raw.read(limit, decode_content=True)
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError, OSError) as exc:
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            raise TransientError(RegistryTimeoutError(f"reading {redact(resp)} timed out")) from None
        raise TransientError(ShortReadError(f"connection broken while reading {redact(resp)}")) from None
    except urllib3.exceptions.HTTPError as exc:
        raise TransientError(ShortReadError(f"reading {redact(resp)} failed ({type(exc).__name__})")) from None


def redact(resp: requests.Response) -> str:
    return redact_url(resp.url)


def _consume_single_range(resp: requests.Response, offset: int, length: int, what: str) -> bytes:
    check_status(resp, what, ok=(200, 206))
    if resp.status_code == 206:
        cr = parse_content_range(resp.headers.get("Content-Range"))
        if cr is None or cr.first != offset:
            raise TransientError(ShortReadError(f"{what}: server answered a different range "
                                                f"({resp.headers.get('Content-Range')!r})"))
        if cr.length < length:
            if cr.total is not None and cr.total < offset + length:
                raise RangeNotSatisfiableError(f"{what}: beyond the end of the {cr.total}-byte blob")
            raise TransientError(ShortReadError(f"{what}: server sent only {cr.length} bytes"))
        data = _read_exact_body(resp, length)
        if len(data) < length:
            raise TransientError(ShortReadError(f"{what}: got {len(data)} of {length} bytes"))
        return data
    # 200: the server ignored Range; skip to the offset in the stream and stop after the range.
    skipped = 0
    while skipped < offset:
        got = _read_exact_body(resp, min(_READ_CHUNK, offset - skipped))
        if not got:
            raise RangeNotSatisfiableError(f"{what}: blob ends at byte {skipped}")
        skipped += len(got)
    data = _read_exact_body(resp, length)
    if len(data) < length:
        total = resp.headers.get("Content-Length")
        if total and total.isdigit() and int(total) < offset + length:
            raise RangeNotSatisfiableError(f"{what}: beyond the end of the {total}-byte blob")
        raise TransientError(ShortReadError(f"{what}: got {len(data)} of {length} bytes"))
    return data


def _consume_multi_range(resp: requests.Response, regions: list[tuple[int, int]], what: str) -> list[tuple[int, bytes]]:
    check_status(resp, what, ok=(200, 206))
    if resp.status_code == 200:
        end = max(off + length for off, length in regions)
        parts: list[tuple[int, bytes]] = []
        data = _read_exact_body(resp, end)
        if len(data) < end:
            raise TransientError(ShortReadError(f"{what}: body ended at byte {len(data)}"))
        for off, length in regions:
            parts.append((off, data[off:off + length]))
        return parts
    boundary = boundary_of(resp.headers.get("Content-Type", ""))
    if boundary is None:
        cr = parse_content_range(resp.headers.get("Content-Range"))
        if cr is None:
            raise TransientError(ShortReadError(f"{what}: 206 without Content-Range"))
        data = _read_exact_body(resp, cr.length)
        if len(data) != cr.length:
            raise TransientError(ShortReadError(f"{what}: got {len(data)} of {cr.length} bytes"))
        return [(cr.first, data)]
    expected = resp.headers.get("Content-Length")
    limit = int(expected) if expected and expected.isdigit() else sum(l for _, l in regions) + 4096 * len(regions) + 65536
    body = _read_exact_body(resp, limit)
    if expected and expected.isdigit() and len(body) != int(expected):
        raise TransientError(ShortReadError(f"{what}: got {len(body)} of {expected} multipart bytes"))
    try:
        return parse_byteranges(body, boundary)
    except MultipartError as exc:
        raise TransientError(ShortReadError(f"{what}: bad multipart body ({exc})")) from None


class _BlobStream(io.RawIOBase):
    """Whole-blob reader that resumes after a broken connection and verifies the digest at EOF."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str) -> None:
        super().__init__()
        self._client = client
        self._ref = ref
        self._digest = digest
        self._hasher = _hasher_for(digest)
        self._pos = 0
        self._size: int | None = None
        self._resp: requests.Response | None = None
        self._done = False
        self._failures = 0
        self._what = f"blob {digest} in {ref.name}"

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

        self._resp, _ = self._client._pull(self._ref, f"/v2/{self._ref.repository}/blobs/{self._digest}", "GET",
                                           consume, what, headers)

    def _skip(self, resp: requests.Response, n: int) -> None:
        while n > 0:
            got = _read_exact_body(resp, min(n, _READ_CHUNK))
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
                if self._failures > self._client.config.max_retries:
                    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                        raise RegistryTimeoutError(f"{self._what}: read timed out at byte {self._pos}") from None
                    raise ShortReadError(f"{self._what}: connection broken at byte {self._pos}") from None
                log.info("%s: connection broken at byte %d; resuming", self._what, self._pos)
                time.sleep(min(self._client.config.max_wait, self._client.config.min_wait * 2 ** self._failures))
                continue
            if n == 0:
                return self._finish()
            self._hasher.update(memoryview(buffer)[:n])
            self._pos += n
            return n

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
