"""The fleet benchmark's two eStargz images and the files their workload reads, built once and cached.

- `app`: about 20 MB in 2 layers: a base of small text files and a few binaries, and an
  application layer with more text and some MB-sized data files. The workload reads ~1.4 MB of
  compressed data spread over both layers (a start-up: configuration, modules, one data file).
- `big`: about 100 MB in 1 layer: 1.5 MB random files (incompressible, like models or archives)
  and text. The workload reads ~7 MB: five random files and a few hundred small ones.

Everything comes from a fixed seed (same bytes every run); the layers are made by our converter
(`build_estargz`, no prioritized files: no prefetch), as the issue's measurements were.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.store_image import _text_block
from stargz_store.formats.detect import read_layer_toc
from stargz_store.formats.estargz import build_estargz
from stargz_store.formats.layer_toc import BuildResult

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
KB, MB = 1 << 10, 1 << 20
MTIME = 1_700_000_000


@dataclass(frozen=True)
class FileSet:
    """How many files of which kind a layer holds, and how many of them the workload reads."""

    prefix: str
    text_files: int
    text_size: tuple[int, int]
    data_files: int
    data_size: tuple[int, int]
    read_text: int
    read_data: int


RECIPES: dict[str, list[FileSet]] = {
    "app": [
        FileSet("usr/lib/base", text_files=1300, text_size=(1 * KB, 16 * KB), data_files=60,
                data_size=(20 * KB, 100 * KB), read_text=80, read_data=6),
        FileSet("srv/app", text_files=700, text_size=(1 * KB, 24 * KB), data_files=6,
                data_size=(512 * KB, 1280 * KB), read_text=70, read_data=0),
    ],
    "big": [
        FileSet("opt/big", text_files=1700, text_size=(1 * KB, 24 * KB), data_files=60,
                data_size=(1536 * KB, 1536 * KB), read_text=130, read_data=4),
    ],
}


@dataclass(frozen=True)
class LayerBuild:
    path: str  # the blob file
    result: dict  # BuildResult as a dict
    read: list[str]  # files the workload reads, in order
    needed: int  # compressed bytes of those files' chunks


@dataclass(frozen=True)
class FleetImage:
    name: str
    layers: list[LayerBuild]
    config: bytes
    manifest: bytes

    @property
    def size(self) -> int:
        return sum(layer.result["size"] for layer in self.layers)

    @property
    def needed(self) -> int:
        return sum(layer.needed for layer in self.layers)

    def descriptors(self) -> list[dict]:
        return json.loads(self.manifest)["layers"]


def _layer_tar(spec: FileSet, rng: random.Random) -> tuple[bytes, list[str]]:
    """The layer's tar and the workload's files in it (text files then data files, spread out)."""
    pool = _text_block(rng, 8 * MB)
    out = io.BytesIO()
    names: list[tuple[str, str]] = []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({f"{spec.prefix}/d{i % 40:02d}" for i in range(spec.text_files)} | {f"{spec.prefix}/data"})
        for d in [spec.prefix, *dirs]:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        kinds = ["text"] * spec.text_files + ["data"] * spec.data_files
        rng.shuffle(kinds)  # data files spread over the blob
        for i, kind in enumerate(kinds):
            if kind == "text":
                n = rng.randint(*spec.text_size)
                start = rng.randrange(0, len(pool) - n)
                data, name = pool[start:start + n], f"{spec.prefix}/d{i % 40:02d}/f{i:05d}.py"
            else:
                data, name = rng.randbytes(rng.randint(*spec.data_size)), f"{spec.prefix}/data/blob{i:05d}.bin"
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
            names.append((name, kind))
    texts = [n for n, k in names if k == "text"]
    datas = [n for n, k in names if k == "data"]
    read = sorted(rng.sample(texts, spec.read_text)) + sorted(rng.sample(datas, spec.read_data))
    return out.getvalue(), read


def _needed_bytes(blob: bytes, result: BuildResult, files: list[str]) -> int:
    descriptor = {"digest": result.digest, "size": result.size, "annotations": dict(result.annotations)}
    parsed = read_layer_toc(lambda off, n: blob[off:off + n], len(blob), descriptor)
    total = 0
    for name in files:
        entry = parsed.toc.lookup(name)
        if entry is None or not entry.chunks:
            raise RuntimeError(f"workload file {name} not in the layer's TOC")
        total += entry.chunks[-1].blob_end - entry.chunks[0].blob_offset
    return total


def build(name: str, cache_dir: Path) -> FleetImage:
    """The image `name` (see RECIPES), from `cache_dir` when built before."""
    workdir = cache_dir / f"{name}-v{LAYOUT_VERSION}"
    meta = workdir / "image.json"
    if meta.exists():
        doc = json.loads(meta.read_text())
        return FleetImage(name, [LayerBuild(**layer) for layer in doc["layers"]],
                          bytes.fromhex(doc["config"]), bytes.fromhex(doc["manifest"]))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"fleet-{name}-{LAYOUT_VERSION}")
    layers: list[LayerBuild] = []
    for i, spec in enumerate(RECIPES[name]):
        log.info("building %s layer %d", name, i)
        tar, read = _layer_tar(spec, rng)
        out = io.BytesIO()
        result = build_estargz(io.BytesIO(tar), out, workers=2)
        blob = out.getvalue()
        path = workdir / f"layer{i}.esgz"
        path.write_bytes(blob)
        layers.append(LayerBuild(str(path), asdict(result), read, _needed_bytes(blob, result, read)))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [lb.result["diff_id"] for lb in layers]}},
                        separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": lb.result["media_type"], "digest": lb.result["digest"], "size": lb.result["size"],
                    "annotations": dict(lb.result["annotations"])} for lb in layers],
    }).encode()
    image = FleetImage(name, layers, config, manifest)
    meta.write_text(json.dumps({"layers": [asdict(lb) for lb in layers], "config": config.hex(),
                                "manifest": manifest.hex()}))
    return image


def push(image: FleetImage, registry_host: str, repo: str) -> str:
    """Push the image to `registry_host` (plain HTTP) unless its manifest is there; returns the reference."""
    from stargz_store.registry import RegistryClient, RegistryConfig, parse_reference

    ref_text = f"{registry_host}/{repo}:v1"
    ref = parse_reference(ref_text)
    with RegistryClient(RegistryConfig(insecure_hosts=(registry_host,))) as client:
        try:
            if client.head_manifest(ref)[0] == "sha256:" + hashlib.sha256(image.manifest).hexdigest():
                return ref_text
        except Exception:  # not there yet
            pass
        for layer in image.layers:
            client.push_blob(ref, layer.result["digest"], Path(layer.path))
        client.push_blob(ref, "sha256:" + hashlib.sha256(image.config).hexdigest(), image.config)
        client.push_manifest(ref, image.manifest, "application/vnd.oci.image.manifest.v1+json")
    return ref_text
