"""Small helpers to put test images into a registry through the client under test."""
from __future__ import annotations

import json
import os

from stargz_store.registry import RegistryClient, Reference
from stargz_store.registry.client import (
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    sha256_digest,
)


def push_image(client: RegistryClient, ref: Reference, layers: list[bytes], *, arch: str = "amd64",
               variant: str = "", docker: bool = False, tag: str | None = None) -> tuple[str, bytes]:
    """Push layers + config + manifest; returns (manifest digest, manifest bytes)."""
    config = {"architecture": arch, "os": "linux", "rootfs": {"type": "layers",
              "diff_ids": [sha256_digest(layer) for layer in layers]}}
    if variant:
        config["variant"] = variant
    config_raw = json.dumps(config).encode()
    client.push_blob(ref, sha256_digest(config_raw), config_raw)
    for layer in layers:
        client.push_blob(ref, sha256_digest(layer), layer)
    media_type = MEDIA_TYPE_DOCKER_MANIFEST if docker else MEDIA_TYPE_OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json" if docker
                   else "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(config_raw), "size": len(config_raw)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(layer),
                    "size": len(layer)} for layer in layers],
    }
    raw = json.dumps(manifest, indent=2).encode()
    target = ref.with_tag(tag) if tag else ref
    digest = client.push_manifest(target if (tag or ref.tag) else ref.with_digest(sha256_digest(raw)), raw, media_type)
    return digest, raw


def push_index(client: RegistryClient, ref: Reference, entries: list[tuple[str, bytes, dict | None]],
               *, docker: bool = False) -> tuple[str, bytes]:
    """Push an index over already pushed manifests: entries are (digest, raw manifest, platform)."""
    media_type = MEDIA_TYPE_DOCKER_LIST if docker else MEDIA_TYPE_OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": media_type, "manifests": []}
    for digest, raw, platform in entries:
        desc = {"mediaType": MEDIA_TYPE_DOCKER_MANIFEST if docker else MEDIA_TYPE_OCI_MANIFEST,
                "digest": digest, "size": len(raw)}
        if platform is not None:
            desc["platform"] = platform
        index["manifests"].append(desc)
    raw = json.dumps(index).encode()
    return client.push_manifest(ref, raw, media_type), raw


def random_blob(size: int) -> bytes:
    return os.urandom(size)
