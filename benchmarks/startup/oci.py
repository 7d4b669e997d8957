"""Writing a gzip-layered OCI image layout, the input of both `skopeo copy` (legacy) and our converter."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .rootfs import NICE, BuildError

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class LayerBlob:
    digest: str  # of the gzip blob
    size: int  # compressed bytes
    diff_id: str  # of the uncompressed tar
    tar_size: int


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def write_layer(root: Path, paths: list[str], layout: Path, work: Path) -> LayerBlob:
    """Tar `paths` of `root` (owned by root, in the given order), gzip -6 it and store it as a blob of `layout`."""
    work.mkdir(parents=True, exist_ok=True)
    tar_path = work / "layer.tar"
    with open(tar_path, "wb") as raw:
        writer = _HashingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            for rel in paths:
                full = root / rel
                info = tar.gettarinfo(str(full), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isreg():
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    diff_id, tar_size = "sha256:" + writer.sha.hexdigest(), writer.size
    gz_path = work / "layer.tar.gz"
    with open(gz_path, "wb") as out:
        result = subprocess.run([*NICE, "gzip", "-6", "-n", "-c", str(tar_path)], stdout=out, stderr=subprocess.PIPE)
    if result.returncode:
        raise BuildError(f"gzip failed: {result.stderr.decode(errors='replace')}")
    tar_path.unlink()
    digest = _sha256_file(gz_path)
    size = gz_path.stat().st_size
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    os.replace(gz_path, blob_dir / digest.split(":", 1)[1])
    return LayerBlob(digest, size, diff_id, tar_size)


def _put_json(layout: Path, doc: dict) -> tuple[str, int]:
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, len(data)


def finish_layout(layout: Path, tag: str, layers: list[LayerBlob], cmd: list[str], env: list[str],
                  working_dir: str = "/") -> str:
    """Write config, manifest, index.json and oci-layout; returns the manifest digest."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "Cmd": cmd, "WorkingDir": working_dir},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": "benchmarks/startup image builder"} for _ in layers],
    }
    config_digest, config_size = _put_json(layout, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    manifest_digest, manifest_size = _put_json(layout, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (layout / "index.json").write_text(json.dumps(index, indent=1))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest
