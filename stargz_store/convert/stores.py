"""What the conversion needs from the two ends, as two small interfaces.

A source hands out manifests (verified against their digest), small blobs (configs) and big
blobs as local files the layer writers can read; a destination takes blobs first and manifests
last, so a reader never sees a manifest whose blobs are missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..registry.manifest import sha256_digest
from .errors import BlobDigestMismatchError


@dataclass(frozen=True)
class RawManifest:
    """A manifest or index exactly as stored: its bytes are what `digest` names."""

    raw: bytes
    media_type: str
    digest: str


class ImageSource(Protocol):
    def describe(self) -> str:
        """How to name the source in messages (`oci:DIR:TAG`, `docker://REF`)."""

    def root(self) -> RawManifest:
        """The manifest or index the user named."""

    def manifest(self, digest: str) -> RawManifest:
        """A manifest referenced from an index."""

    def blob_bytes(self, digest: str) -> bytes:
        """A small blob (a config), verified."""

    def blob_file(self, digest: str, size: int, tmpdir: Path) -> Path:
        """A local file holding the blob; may be the source's own file (never modify it), not yet verified."""

    def close(self) -> None: ...


class ImageDestination(Protocol):
    def describe(self) -> str: ...

    def prepare(self) -> None:
        """Check the destination can be written (reachable, authorised) before the work starts."""

    def tmpdir_parent(self) -> Path | None:
        """Where converted layers are written before `put_blob_file` (a place it can rename from)."""

    def put_blob_file(self, digest: str, path: Path) -> None:
        """Store a blob; `path` may be moved away. Called for every blob before any manifest."""

    def put_blob_bytes(self, digest: str, data: bytes) -> None: ...

    def put_manifest(self, manifest: RawManifest, root: bool) -> None:
        """Store a manifest; `root` is the one tagged with the destination's tag (pushed last)."""

    def close(self) -> None: ...


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    algorithm = digest.partition(":")[0]
    if algorithm != "sha256":
        raise BlobDigestMismatchError(f"{what}: unsupported digest algorithm in {digest}")
    actual = sha256_digest(data)
    if actual != digest:
        raise BlobDigestMismatchError(f"{what}: content is {actual}, but it is named {digest}")
