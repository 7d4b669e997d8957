"""The store benchmark's generated image: one layer, built once and kept between runs.

The tree (issue 3, "Benchmarks"):
- `big/data.bin`: 200 MiB, the first half random bytes, the second half text;
- `small/dNN/fNNNNN.txt`: 20,000 text files of 1-8 KiB in 100 directories;
- `tiny/dNNN/...`: 100,000 tiny entries (empty files and symlinks) in 500 directories, so the
  TOC has about 120,000 entries (the big file's extra chunks included).

Everything is derived from a fixed seed, so two runs measure the same bytes. The tar, the eStargz
blob and the extracted tree are cached under a work directory keyed by the layout version.
"""
from __future__ import annotations

import io
import json
import logging
import random
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from stargz_store.formats.estargz import build_estargz
from stargz_store.formats.layer_toc import BuildResult

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MIB = 1 << 20
BIG_PATH = "big/data.bin"
SMALL_DIR = "small"
TINY_DIR = "tiny"


@dataclass(frozen=True)
class ImageShape:
    big_size: int = 200 * MIB
    small_files: int = 20_000
    small_dirs: int = 100
    tiny_entries: int = 100_000
    tiny_dirs: int = 500
    seed: int = 3

    def key(self) -> str:
        return (
            f"v{LAYOUT_VERSION}-big{self.big_size}-s{self.small_files}x{self.small_dirs}"
            f"-t{self.tiny_entries}x{self.tiny_dirs}-seed{self.seed}"
        )


@dataclass(frozen=True)
class BuiltImage:
    """Paths of the generated artefacts and the eStargz writer's result (the tar is removed once
    the blob and the extracted tree exist)."""

    workdir: Path
    tar_path: Path
    blob_path: Path
    tree_path: Path
    result: BuildResult


def _text_block(rng: random.Random, size: int) -> bytes:
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(4000)
    ]
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rng.choices(words, k=rng.randint(4, 14)))
        out += line + b"\n"
    return bytes(out[:size])


def _big_payload(rng: random.Random, size: int) -> bytes:
    half = size // 2
    text_pool = _text_block(rng, 8 * MIB)
    parts = [rng.randbytes(half)]
    have = half
    while have < size:
        n = min(size - have, 2 * MIB)
        start = rng.randrange(0, len(text_pool) - n + 1)
        parts.append(text_pool[start : start + n])
        have += n
    return b"".join(parts)


def write_tar(path: Path, shape: ImageShape) -> None:
    """The layer as a PAX tar (directories first, as a build tool writes them)."""
    rng = random.Random(shape.seed)
    mtime = 1_700_000_000

    def info(name: str, kind: bytes, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = size
        ti.mode = mode
        ti.mtime = mtime
        ti.uname = ti.gname = "root"
        return ti

    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info("big", tarfile.DIRTYPE, mode=0o755))
        big = _big_payload(rng, shape.big_size)
        tar.addfile(info(BIG_PATH, tarfile.REGTYPE, len(big)), io.BytesIO(big))
        del big
        text_pool = _text_block(rng, 4 * MIB)
        tar.addfile(info(SMALL_DIR, tarfile.DIRTYPE, mode=0o755))
        for d in range(shape.small_dirs):
            tar.addfile(info(f"{SMALL_DIR}/d{d:02d}", tarfile.DIRTYPE, mode=0o755))
        for i in range(shape.small_files):
            n = rng.randint(1024, 8192)
            start = rng.randrange(0, len(text_pool) - n)
            name = f"{SMALL_DIR}/d{i % shape.small_dirs:02d}/f{i:05d}.txt"
            tar.addfile(info(name, tarfile.REGTYPE, n), io.BytesIO(text_pool[start : start + n]))
        tar.addfile(info(TINY_DIR, tarfile.DIRTYPE, mode=0o755))
        for d in range(shape.tiny_dirs):
            tar.addfile(info(f"{TINY_DIR}/d{d:03d}", tarfile.DIRTYPE, mode=0o755))
        for i in range(shape.tiny_entries):
            parent = f"{TINY_DIR}/d{i % shape.tiny_dirs:03d}"
            if i % 5 == 4:
                link = info(f"{parent}/l{i:06d}", tarfile.SYMTYPE, mode=0o777)
                link.linkname = f"e{i - 1:06d}"
                tar.addfile(link)
            else:
                tar.addfile(info(f"{parent}/e{i:06d}", tarfile.REGTYPE, 0), io.BytesIO(b""))


def build_image(base: Path, shape: ImageShape = ImageShape(), *, workers: int = 2) -> BuiltImage:
    """Generate (or reuse) the tar, its eStargz blob and its extraction under `base/<shape key>`."""
    workdir = base / shape.key()
    workdir.mkdir(parents=True, exist_ok=True)
    tar_path, blob_path, tree_path = workdir / "layer.tar", workdir / "layer.esgz", workdir / "tree"
    meta_path = workdir / "result.json"
    if meta_path.exists() and blob_path.exists() and tree_path.is_dir():
        return BuiltImage(workdir, tar_path, blob_path, tree_path, BuildResult(**json.loads(meta_path.read_text())))
    log.info("generating the benchmark image in %s", workdir)
    write_tar(tar_path, shape)
    with open(tar_path, "rb") as src, open(blob_path, "wb") as dst:
        result = build_estargz(src, dst, workers=workers)
    if tree_path.exists():
        shutil.rmtree(tree_path)
    tree_path.mkdir()
    subprocess.run(["tar", "-xf", str(tar_path), "-C", str(tree_path)], check=True)
    tar_path.unlink()  # 400 MB that nothing reads again: the blob and the tree are what is measured
    meta_path.write_text(json.dumps(asdict(result)))
    return BuiltImage(workdir, tar_path, blob_path, tree_path, result)

