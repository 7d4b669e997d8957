"""The images the end-to-end tests pull: what they contain and how they reach the registry.

Built from scratch with tests/fixtures/images.py (standard library only), converted to eStargz by
our converter's command line exactly as a user would run it, and pushed to a local registry.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.fixtures.images import LayerBuilder, random_bytes, write_oci_image, push_oci_layout
# Re-exported: the e2e tests import them from here.
from tests.fixtures.registry_images import PushedImage, fetch_blob, fetch_image  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_LINE = "hello from a lazily pulled container"
APP_MESSAGE = "the app read /app/message.txt through the store"
FILLER_FILES = 3
FILLER_SIZE = 20 << 20  # incompressible, never read by the app: what lazy pulling saves


def app_layer() -> LayerBuilder:
    """busybox, a small app that prints two known lines, and 60 MiB the app never reads."""
    layer = LayerBuilder().add_busybox()
    layer.add_file("app/run.sh", f'#!/bin/sh\necho "{APP_LINE}"\ncat /app/message.txt\n'.encode(), mode=0o755)
    layer.add_file("app/message.txt", (APP_MESSAGE + "\n").encode())
    for i in range(FILLER_FILES):
        layer.add_file(f"filler/blob-{i}.bin", random_bytes(FILLER_SIZE, seed=100 + i))
    return layer


APP_CMD = {"Cmd": ["/bin/sh", "/app/run.sh"]}

# A lower layer with a file to delete and a directory to make opaque, and an upper layer that does both.
MERGED_SCRIPT = "ls -A /data; echo --; ls -A /opq; echo --; cat /data/kept.txt /opq/new.txt"
MERGED_EXPECTED = "kept.txt\n--\nnew.txt\n--\nkept\nnew\n"


def multilayer_layers() -> list[bytes]:
    lower = LayerBuilder().add_busybox()
    lower.add_dir("data").add_file("data/gone.txt", b"gone\n").add_file("data/kept.txt", b"kept\n")
    lower.add_dir("opq").add_file("opq/old-1", b"1\n").add_file("opq/old-2", b"2\n")
    lower.add_file("filler/lower.bin", random_bytes(4 << 20, seed=7))
    upper = LayerBuilder().add_dir("data").add_whiteout("data/gone.txt")
    upper.add_dir("opq").add_opaque("opq").add_file("opq/new.txt", b"new\n", parents=False)
    upper.add_file("filler/upper.bin", random_bytes(4 << 20, seed=8))
    return [lower.gzip(), upper.gzip()]


def convert_and_push(src_layout: Path, tag: str, dest: str, *options: str) -> None:
    """`stargz-store convert [OPTIONS] oci:LAYOUT:TAG docker://DEST`, the command a user runs."""
    cmd = [sys.executable, "-m", "stargz_store.cli", "convert", *options, f"oci:{src_layout}:{tag}", f"docker://{dest}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REGISTRY_AUTH_FILE": os.devnull}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def build_source(layout: Path, layers: list[bytes], config_extra: dict, tag: str = "src") -> Path:
    write_oci_image(layout, layers, tag=tag, config_extra=config_extra)
    return layout


def push_plain(layout: Path, tag: str, registry_host: str, repo: str) -> PushedImage:
    push_oci_layout(layout, tag, f"{registry_host}/{repo}:{tag}")
    return fetch_image(registry_host, repo, tag)


def estargz_chunk_region(blob: bytes) -> tuple[int, int]:
    """[first chunk offset, TOC offset) of an eStargz blob: the bytes background fetch must bring in.

    Read here with gzip/tarfile/json only (not our reader), from the 51-byte footer and the TOC.
    """
    footer = blob[-51:]
    toc_offset = int(footer[16:32].decode("ascii"), 16)
    if footer[32:38] != b"STARGZ":
        raise AssertionError("not an eStargz blob (footer magic missing)")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[toc_offset:])), mode="r:") as tf:
        member = tf.extractfile("stargz.index.json")
        assert member is not None
        toc = json.load(member)
    offsets = [e["offset"] for e in toc["entries"] if e.get("offset") and e.get("type") in ("reg", "chunk")]
    return (min(offsets) if offsets else toc_offset, toc_offset)
