"""Building the benchmark images once into a cache: the recipe types and the builder.

Each image is built layer by layer in one growing root filesystem, the way a
Dockerfile build works: a layer holds what its step added or changed. Its
workload is the image's default command; `marker` is a string its first output
line must contain. A build is keyed by the resolved package versions, the recipe,
the code of its hooks and the workload files it copies in, so a rerun with the
same Debian lists reuses the cached image. What the images are: corpus.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import oci, rootfs
from .record import build_record, write_record

log = logging.getLogger(__name__)

BUILD_FORMAT = 4  # bump when the builder changes what it writes
TAG = "latest"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WORKLOADS_DIR = Path(__file__).resolve().parent / "workloads"
GROUPS = ("tuning", "held-out")  # what the fetch heuristics were designed on, and what they were not

Hook = Callable[[Path], None]  # runs on the build tree after a step's packages and files are in


@dataclass(frozen=True)
class LayerStep:
    """One layer: packages whose closure (minus earlier layers') it adds, workload files copied in
    (a directory under workloads/ and where it goes in the image), then hooks run on the tree."""

    packages: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageRecipe:
    name: str
    description: str
    steps: tuple[LayerStep, ...]
    cmd: tuple[str, ...]
    marker: str  # the first output line contains it
    group: str = "held-out"  # "tuning": the fetch heuristics were designed and measured on it
    env: tuple[str, ...] = (f"PATH={IMAGE_PATH}",)


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
    group: str = "held-out"

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


def _code_fingerprint(code: types.CodeType, namespace: Mapping[str, object]) -> list[str]:
    """What decides a hook's effect: its bytecode, its constants (nested functions too) and the plain
    module-level values it names (a workload string, a file size), so editing any of them rebuilds."""
    parts = [code.co_code.hex()]
    for const in code.co_consts:
        parts += _code_fingerprint(const, namespace) if isinstance(const, types.CodeType) else [repr(const)]
    for name in code.co_names:
        value = namespace.get(name)
        if isinstance(value, (str, bytes, int, float, tuple, frozenset)):
            parts.append(f"{name}={value!r}")
    return parts


def hook_fingerprint(hook: Hook) -> str:
    parts = _code_fingerprint(hook.__code__, hook.__globals__)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def files_fingerprint(source: str) -> str:
    """Every file under workloads/`source`, by relative path and content."""
    h = hashlib.sha256()
    base = WORKLOADS_DIR / source
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(base)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _key(recipe: ImageRecipe, per_step: list[list[rootfs.Package]], hooks: Mapping[str, Hook]) -> str:
    content = {k: v for k, v in asdict(recipe).items() if k != "group"}  # the group is a label, not content
    doc = {"format": BUILD_FORMAT, "recipe": content, "packages": [[asdict(p) for p in s] for s in per_step],
           "hooks": {name: hook_fingerprint(hooks[name]) for step in recipe.steps for name in step.hooks},
           "files": {source: files_fingerprint(source) for step in recipe.steps for source, _ in step.files}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _copy_files(root: Path, files: tuple[tuple[str, str], ...]) -> None:
    for source, destination in files:
        shutil.copytree(WORKLOADS_DIR / source, root / destination.lstrip("/"), dirs_exist_ok=True)


def build(recipe: ImageRecipe, cache_dir: Path, hooks: Mapping[str, Hook]) -> BuiltImage:
    """The image of `recipe`, from the cache when its key matches, else built (minutes; network for .debs).

    `hooks` maps the hook names the recipe's steps use to the functions (corpus.HOOKS)."""
    per_step = _step_packages(recipe)
    key = _key(recipe, per_step, hooks)
    out = cache_dir / "images" / recipe.name
    stamp = out / "built.json"
    if stamp.exists():
        try:
            built = BuiltImage.from_json(json.loads(stamp.read_text()))
            if built.key == key and (built.layout / "index.json").exists():
                built.group = recipe.group
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
            _copy_files(root, step.files)
            for hook in step.hooks:
                hooks[hook](root)
            paths = rootfs.changed_paths(before, rootfs.snapshot(root))
            image_paths.update(paths)
            layers.append(oci.write_layer(root, paths, layout, work))
        manifest_digest = oci.finish_layout(layout, TAG, layers, list(recipe.cmd), list(recipe.env))
        record_paths = _record(recipe, root, image_paths, out / "record.jsonl", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    built = BuiltImage(recipe.name, layout, out / "record.jsonl", recipe.marker, key, manifest_digest,
                       [asdict(layer) for layer in layers], record_paths, recipe.group)
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
