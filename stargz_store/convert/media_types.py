"""Manifest, config and layer media types the converter reads and writes (`registry.md` §4.2)."""
from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+prettyjws",
                  "application/vnd.docker.distribution.manifest.v1+json")

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Layer blobs holding a tar (any compression the writers detect by magic bytes).
TAR_LAYERS = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})

# What a registry or layout is asked for; the index types last so a plain manifest is preferred.
ACCEPT = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST)


def sniff_media_type(data: dict, declared: str | None) -> str:
    """The manifest's media type: the declared one, else its `mediaType` field, else its shape."""
    if declared and declared not in ("application/json", "text/plain", "application/octet-stream"):
        return declared
    if isinstance(data.get("mediaType"), str):
        return data["mediaType"]
    if "manifests" in data:
        return OCI_INDEX
    if "fsLayers" in data:
        return DOCKER_SCHEMA1[1]
    return OCI_MANIFEST
