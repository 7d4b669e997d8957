"""Manifest media types, the image-manifest model and media-type sniffing."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .errors import UnsupportedManifestError

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
        data = parse_json(raw, "manifest")
        if media_type not in IMAGE_MANIFEST_TYPES:
            raise UnsupportedManifestError(f"manifest {digest} has unsupported media type {media_type!r}")
        layers, config = data.get("layers"), data.get("config")
        if not isinstance(layers, list) or not isinstance(config, dict) or not config.get("digest"):
            raise UnsupportedManifestError(f"manifest {digest} lacks a valid 'layers' list or 'config' descriptor")
        return cls(digest=digest, media_type=media_type, raw=raw, data=data, layers=layers, config=config)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_json(raw: bytes, what: str) -> dict:
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

