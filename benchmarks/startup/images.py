"""The benchmark images: what is in them, what their workload does, and building them once into a cache.

Each image is built layer by layer in one growing root filesystem, the way a
Dockerfile build works: a layer holds what its step added or changed. Its
workload is the image's default command; `marker` is a string its first output
line must contain. A build is keyed by the resolved package versions and the
recipe, so a rerun with the same Debian lists reuses the cached image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import oci, rootfs
from .record import build_record, write_record

log = logging.getLogger(__name__)

BUILD_FORMAT = 3  # bump when the builder changes what it writes
TAG = "latest"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "env", "mkdir", "rm", "sleep")

HELLO_C = b'#include <stdio.h>\nint main(void) { printf("hello, world\\n"); return 0; }\n'
PYTHON_WORKLOAD = (
    "import json, sqlite3, decimal, email.parser, numpy, yaml, requests, jinja2; "
    "print('hello from python', numpy.__version__, flush=True)"
)
FILLER_FILES = 50
FILLER_FILE_SIZE = 10 * 1024 * 1024


def _skeleton(root: Path) -> None:
    """What base-files and busybox's postinst would provide: directories, users, a shell."""
    for d in ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr/bin", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")


def _blas_alternatives(root: Path) -> None:
    """The libblas.so.3/liblapack.so.3 links update-alternatives would make (numpy needs them)."""
    libdir = root / "usr/lib/x86_64-linux-gnu"
    for sub in ("blas", "lapack"):
        for lib in sorted((libdir / sub).glob("lib*.so.3")):
            link = libdir / lib.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(f"{sub}/{lib.name}")


def _compile_python(root: Path) -> None:
    """Byte-compile what py3compile would at install time, so the workload does not compile at start."""
    dirs = [d for d in ("usr/lib/python3.11", "usr/lib/python3/dist-packages") if (root / d).is_dir()]
    rootfs.chroot_run(root, ["python3", "-m", "compileall", "-q", "-j", "2", *(f"/{d}" for d in dirs)],
                      {"PATH": IMAGE_PATH}, check=False)


def _hello_source(root: Path) -> None:
    (root / "src").mkdir(exist_ok=True)
    (root / "src/hello.c").write_bytes(HELLO_C)


def _filler(root: Path) -> None:
    """500 MB of random (incompressible) data the workload never reads, then the one small file it does."""
    data = root / "data"
    (data / "filler").mkdir(parents=True, exist_ok=True)
    for i in range(FILLER_FILES):
        with open(data / "filler" / f"part-{i:03d}.bin", "wb") as f:
            for _ in range(FILLER_FILE_SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
    (data / "hello.txt").write_text("hello from bigdata\n")


HOOKS: dict[str, Callable[[Path], None]] = {
    "skeleton": _skeleton,
    "blas_alternatives": _blas_alternatives,
    "compile_python": _compile_python,
    "hello_source": _hello_source,
    "filler": _filler,
}


@dataclass(frozen=True)
class LayerStep:
    """One layer: packages whose closure (minus earlier layers') it adds, then hooks run on the tree."""

    packages: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageRecipe:
    name: str
    description: str
    steps: tuple[LayerStep, ...]
    cmd: tuple[str, ...]
    marker: str  # the first output line contains it
    env: tuple[str, ...] = (f"PATH={IMAGE_PATH}",)


BASE = LayerStep(("libc6", "busybox-static"), ("skeleton",))

RECIPES: dict[str, ImageRecipe] = {
    "python": ImageRecipe(
        name="python",
        description="python3.11 + stdlib + numpy, scipy, pandas, sympy, django, ... (imports a few modules)",
        steps=(
            BASE,
            LayerStep(("python3",), ("compile_python",)),
            LayerStep(("python3-numpy", "python3-scipy", "python3-pandas", "python3-sympy", "python3-yaml",
                       "python3-requests", "python3-jinja2", "python3-lxml", "python3-babel", "python3-django",
                       "python3-cryptography", "python3-sqlalchemy", "python3-setuptools"),
                      ("blas_alternatives", "compile_python")),
        ),
        cmd=("python3", "-c", PYTHON_WORKLOAD),
        marker="hello from python",
    ),
    "toolchain": ImageRecipe(
        name="toolchain",
        description="gcc 12 + binutils + libc headers (compiles and runs hello world)",
        steps=(BASE, LayerStep(("gcc", "libc6-dev"), ("hello_source",))),
        cmd=("/bin/sh", "-c", "gcc -O2 -o /tmp/hello /src/hello.c && /tmp/hello"),
        marker="hello, world",
    ),
    "bigdata": ImageRecipe(
        name="bigdata",
        description="busybox-static + 500 MB incompressible filler (reads one small file)",
        steps=(LayerStep(("busybox-static",), ("skeleton",)), LayerStep((), ("filler",))),
        cmd=("/bin/cat", "/data/hello.txt"),
        marker="hello from bigdata",
    ),
}


@dataclass
class BuiltImage:
    """A built image in the cache: its OCI layout (tag `latest`) and its workload's record file."""

    name: str
    layout: Path
    record: Path
    marker: str
    key: str
    manifest_digest: str
    layers: list[dict] = field(default_factory=list)  # LayerBlob fields
    record_paths: int = 0

    @property
    def uncompressed_bytes(self) -> int:
        return sum(layer["tar_size"] for layer in self.layers)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer["size"] for layer in self.layers)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layout"], d["record"] = str(self.layout), str(self.record)
        return d

    @classmethod
    def from_json(cls, d: dict) -> BuiltImage:
        d = dict(d)
        d["layout"], d["record"] = Path(d["layout"]), Path(d["record"])
        return cls(**d)


def _step_packages(recipe: ImageRecipe) -> list[list[rootfs.Package]]:
    """Per step, the packages it adds: closure of everything so far minus what earlier steps installed."""
    seen: set[rootfs.Package] = set()
    wanted: list[str] = []
    per_step = []
    for step in recipe.steps:
        wanted.extend(step.packages)
        closure = set(rootfs.resolve(wanted)) if step.packages else set()
        per_step.append(sorted(closure - seen))
        seen |= closure
    return per_step


def _key(recipe: ImageRecipe, per_step: list[list[rootfs.Package]]) -> str:
    doc = {"format": BUILD_FORMAT, "recipe": asdict(recipe), "packages": [[asdict(p) for p in s] for s in per_step],
           "hooks": {name: HOOKS[name].__code__.co_code.hex() for step in recipe.steps for name in step.hooks}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def build(recipe: ImageRecipe, cache_dir: Path) -> BuiltImage:
    """The image of `recipe`, from the cache when its key matches, else built (minutes; network for .debs)."""
    per_step = _step_packages(recipe)
    key = _key(recipe, per_step)
    out = cache_dir / "images" / recipe.name
    stamp = out / "built.json"
    if stamp.exists():
        try:
            built = BuiltImage.from_json(json.loads(stamp.read_text()))
            if built.key == key and (built.layout / "index.json").exists():
                return built
        except (ValueError, TypeError, KeyError):
            pass
    log.warning("building image %s (cached under %s once done)", recipe.name, out)
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    root = work / "rootfs"
    layout = out / "oci"
    root.mkdir(parents=True)
    layers: list[oci.LayerBlob] = []
    image_paths: set[str] = set()
    try:
        for step, packages in zip(recipe.steps, per_step):
            before = rootfs.snapshot(root)
            rootfs.unpack(rootfs.download(packages, cache_dir / "debs"), root)
            for hook in step.hooks:
                HOOKS[hook](root)
            paths = rootfs.changed_paths(before, rootfs.snapshot(root))
            image_paths.update(paths)
            layers.append(oci.write_layer(root, paths, layout, work))
        manifest_digest = oci.finish_layout(layout, TAG, layers, list(recipe.cmd), list(recipe.env))
        record_paths = _record(recipe, root, image_paths, out / "record.jsonl", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    built = BuiltImage(recipe.name, layout, out / "record.jsonl", recipe.marker, key, manifest_digest,
                       [asdict(layer) for layer in layers], record_paths)
    stamp.write_text(json.dumps(built.to_json(), indent=1))
    return built


def _record(recipe: ImageRecipe, root: Path, image_paths: set[str], out: Path, work: Path) -> int:
    """Run the workload once under strace in the image's tree; write the record file; return its length."""
    trace = work / "strace.txt"
    env = dict(e.split("=", 1) for e in recipe.env)
    result = rootfs.chroot_run(root, list(recipe.cmd), env, strace_out=trace)
    if recipe.marker not in result.stdout:
        raise rootfs.BuildError(f"{recipe.name} workload printed {result.stdout[:200]!r}, "
                                f"expected {recipe.marker!r}: {result.stderr[-1000:]}")
    paths = build_record(trace.read_text(errors="replace"), root, image_paths)
    write_record(paths, out)
    return len(paths)
