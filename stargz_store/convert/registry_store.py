"""Registry ends of a conversion (`docker://HOST[:PORT]/REPO:TAG`), through `RegistryClient`.

Errors are the client's typed ones (`NotFoundError`, `AuthError`, `UnreachableError`, ...); the
CLI words them. Manifests by digest are verified here as well, since that is what lets the
converter trust every blob digest they name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..registry.reference import Reference
from .errors import LocationSyntaxError, UnsupportedImageError
from .location import RegistryLocation
from .media_types import sniff_media_type
from .stores import RawManifest, verify_bytes

log = logging.getLogger(__name__)

_COPY_BUFFER = 1 << 20
_EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _by_digest(ref: Reference, digest: str) -> Reference:
    return dataclasses.replace(ref, tag=None, digest=digest)


class RegistrySource:
    def __init__(self, location: RegistryLocation, client: RegistryClient) -> None:
        self.location = location
        self.ref = location.reference
        self.client = client

    def describe(self) -> str:
        return f"docker://{self.ref}"

    def root(self) -> RawManifest:
        raw, media_type, digest = self.client.get_raw_manifest(self.ref)
        if self.ref.digest:
            verify_bytes(raw, self.ref.digest, f"{self.describe()}: manifest")
        return self._wrap(raw, media_type, digest)

    def manifest(self, digest: str) -> RawManifest:
        raw, media_type, _ = self.client.get_raw_manifest(_by_digest(self.ref, digest))
        verify_bytes(raw, digest, f"{self.describe()}: manifest")
        return self._wrap(raw, media_type, digest)

    def _wrap(self, raw: bytes, media_type: str, digest: str) -> RawManifest:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedImageError(f"{self.describe()}: manifest {digest} is not JSON: {exc}") from None
        return RawManifest(raw, sniff_media_type(data, media_type), digest)

    def blob_bytes(self, digest: str) -> bytes:
        data = self.client.get_blob(self.ref, digest)
        verify_bytes(data, digest, f"{self.describe()}: blob")
        return data

    def blob_file(self, digest: str, size: int, tmpdir: Path) -> Path:
        path = tmpdir / f"source-{digest.partition(':')[2]}"
        with self.client.open_blob(self.ref, digest) as stream, open(path, "wb") as out:
            shutil.copyfileobj(stream, out, _COPY_BUFFER)
        return path

    def close(self) -> None:
        pass


class RegistryDestination:
    def __init__(self, location: RegistryLocation, client: RegistryClient) -> None:
        if not location.reference.tag or location.reference.digest:
            raise LocationSyntaxError(f"{location.text!r}: a destination needs a tag (docker://HOST/REPO:TAG)")
        self.location = location
        self.ref = location.reference
        self.client = client

    def describe(self) -> str:
        return f"docker://{self.ref}"

    def prepare(self) -> None:
        """Fail fast (unreachable, bad credentials) before any layer is converted."""
        try:
            self.client.blob_exists(self.ref, _EMPTY_DIGEST)
        except RegistryError as exc:
            # The probe's blob is an implementation detail; name the destination instead.
            message = str(exc).replace(f"blob {_EMPTY_DIGEST} in ", "destination ")
            try:
                renamed = type(exc)(message)
            except TypeError:
                raise exc from None
            raise renamed from None

    def tmpdir_parent(self) -> Path | None:
        return None

    def put_blob_file(self, digest: str, path: Path) -> None:
        self.client.push_blob(self.ref, digest, path)

    def put_blob_bytes(self, digest: str, data: bytes) -> None:
        self.client.push_blob(self.ref, digest, data)

    def put_manifest(self, manifest: RawManifest, root: bool) -> None:
        target = self.ref if root else _by_digest(self.ref, manifest.digest)
        pushed = self.client.push_manifest(target, manifest.raw, manifest.media_type)
        if pushed and pushed != manifest.digest:
            log.warning("registry reports manifest digest %s, expected %s", pushed, manifest.digest)

    def close(self) -> None:
        pass
