"""`stargz-store optimize`: record what a workload reads first, then convert with it prioritized.

    1. convert SRC, unoptimized, into a private registry on 127.0.0.1 (eStargz: the store serves it lazily);
    2. start a private store (recording every image) and a private Podman using it as its
       additional layer store; pull, run the workload once (`workload.run_workload`);
    3. read the store's record (`daemon.record_cli.fetch_record`), add `--prefetch-list` paths and
       patterns (matched against the mounted layers), stop and remove everything of steps 1-2;
    4. convert SRC into DST with the recorded files first in each layer they were read from, in
       first-read order (`ConvertOptions.layer_prioritized`).

What must hold: nothing of the private environment outlives the command, whatever failed
(processes stopped, mounts gone, the work directory removed: `PrivateEnvironment.close`); the
machine's own Podman storage and config are never touched (`localenv.podman_env`); a workload
that fails or never ends still yields its record.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..convert.converter import ConvertOptions, ConvertResult
from ..convert.record import normalize_record_path
from ..daemon.control import SOCKET_NAME
from ..daemon.record_cli import fetch_record
from ..formats.layer_toc import FORMAT_ESTARGZ
from ..localenv import LocalRegistry, StoreProcess, podman_cleanup, podman_env, run_podman
from .workload import WorkloadRun, WorkloadSpec, run_workload

log = logging.getLogger(__name__)

RECORDING_CONFIG = """# stargz-store optimize: a private store that records every image's first reads
no_background_fetch = true

[record]
images = ["*"]
"""
STAGING_REPO = "optimize/unoptimized"
PULL_TIMEOUT = 600.0


@dataclass
class OptimizeRequest:
    src: str
    dst: str
    workload: WorkloadSpec
    format: str = FORMAT_ESTARGZ
    prefetch_patterns: list[str] = field(default_factory=list)
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    insecure: bool = False
    authfile: str | None = None
    workdir: Path | None = None  # where the private environment lives (default: a temp dir)
    keep_workdir: bool = False


@dataclass
class OptimizeResult:
    run: WorkloadRun
    record: list[dict[str, Any]]  # what the store recorded, plus the --prefetch-list additions
    files: int
    bytes: int
    converted: ConvertResult


class PrivateEnvironment:
    """A registry, a recording store and a Podman of our own under `workdir`; `close()` undoes all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.registry = LocalRegistry(workdir / "registry", access_log=False)
        self.store = StoreProcess(root=workdir / "store-root", mountpoint=workdir / "mnt",
                                  config_path=workdir / "store.toml", log_path=workdir / "store.log",
                                  log_level="info")
        self.podman: dict[str, str] | None = None

    def start_registry(self) -> str:
        self.registry.start()
        return self.registry.host

    def start_store(self) -> None:
        self.store.config_path.write_text(RECORDING_CONFIG)
        self.store.start(timeout=60.0)
        self.podman = podman_env(self.workdir / "pod", additional_layer_store=self.store.mountpoint)

    @property
    def control_socket(self) -> str:
        return str(self.store.root / SOCKET_NAME)

    def close(self) -> None:
        """Podman first (its removals reach the store while it is mounted), then the store, then the registry."""
        try:
            if self.podman is not None:
                podman_cleanup(self.podman)
        finally:
            try:
                if self.store.running:
                    self.store.stop(unmount_leftover=True)
            finally:
                self.registry.stop()


def optimize(request: OptimizeRequest) -> OptimizeResult:
    """Steps 1-4 of the module docstring; raises the converter's, the store's or Podman's errors."""
    from ..convert.cli import convert_locations

    workdir = request.workdir or Path(tempfile.mkdtemp(prefix="stargz-optimize-", dir=_default_parent()))
    workdir.mkdir(parents=True, exist_ok=True)
    env = PrivateEnvironment(workdir)
    try:
        host = env.start_registry()
        staged = f"{host}/{STAGING_REPO}:latest"
        staging_options = ConvertOptions(format=FORMAT_ESTARGZ, platform=request.convert.platform,
                                         jobs=request.convert.jobs, executor=request.convert.executor)
        log.info("converting %s into the private registry (unoptimized)", request.src)
        convert_locations(request.src, "docker://" + staged, staging_options, insecure=request.insecure,
                          authfile=request.authfile)
        env.start_store()
        assert env.podman is not None
        run_podman("pull", "--tls-verify=false", staged, env=env.podman, timeout=PULL_TIMEOUT)
        ran = run_workload(staged, request.workload, env.podman)
        record = fetch_record(env.control_socket, staged)
        record += _prefetch_list_entries(env.store, staged, request.prefetch_patterns, record)
    finally:
        try:
            env.close()
        finally:
            if not request.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    options = _final_options(request, record)
    log.info("converting %s into %s with %d prioritized files", request.src, request.dst, len(record))
    converted = convert_locations(request.src, request.dst, options, insecure=request.insecure,
                                  authfile=request.authfile)
    files = sum(1 for e in record if e.get("kind", "reg") == "reg")
    size = sum(int(e.get("size") or 0) for e in record)
    return OptimizeResult(ran, record, files, size, converted)


def _default_parent() -> str:
    """A directory on disk (not tmpfs): the private registry and Podman store hold whole images."""
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _final_options(request: OptimizeRequest, record: list[dict[str, Any]]) -> ConvertOptions:
    """Per-layer prioritized lists from the record's `layerIndex` (layers match the source's one for one)."""
    by_layer: dict[int, dict[str, None]] = {}
    for entry in record:
        by_layer.setdefault(int(entry["layerIndex"]), {})[entry["path"]] = None
    layers = tuple(tuple(by_layer.get(i, {})) for i in range(max(by_layer) + 1)) if by_layer else None
    base = request.convert
    return ConvertOptions(format=request.format, prioritized=(), layer_prioritized=layers,
                          chunk_size=base.chunk_size, compression_level=base.compression_level,
                          platform=base.platform, jobs=base.jobs, executor=base.executor)


def _prefetch_list_entries(store: StoreProcess, image: str, patterns: list[str],
                           recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Record lines for `--prefetch-list` entries: a path, or a glob pattern (`*`, `?`, `[...]`)
    matched against every layer's tree as the store shows it (metadata only: nothing is read).
    They come after the recorded files, topmost layer first for a path in several layers."""
    if not patterns:
        return []
    manifest = json.loads((store.ref_dir(image) / "manifest").read_bytes())
    digests = [layer["digest"] for layer in manifest["layers"]]
    taken = {e["path"] for e in recorded}
    added: list[dict[str, Any]] = []
    for raw in patterns:
        pattern = normalize_record_path(raw)
        for index in reversed(range(len(digests))):
            diff = store.layer_dir(image, digests[index]) / "diff"
            for path, size in _matches(diff, pattern):
                if path not in taken:
                    taken.add(path)
                    added.append({"path": path, "layerIndex": index, "layerDigest": digests[index],
                                  "kind": "reg", "size": size, "source": "prefetch-list"})
    if patterns and not added:
        log.warning("--prefetch-list matched nothing that was not recorded already")
    return added


def _matches(diff: Path, pattern: str) -> list[tuple[str, int]]:
    """Regular files under `diff` whose path matches `pattern` (a plain path matches itself)."""
    if not any(c in pattern for c in "*?["):
        target = diff / pattern
        try:
            st = target.lstat()
        except OSError:
            return []
        return [(pattern, st.st_size)] if target.is_file() and not target.is_symlink() else []
    found: list[tuple[str, int]] = []
    for dirpath, _dirs, names in os.walk(diff):
        rel_dir = os.path.relpath(dirpath, diff)
        for name in names:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if fnmatch.fnmatchcase(rel, pattern):
                full = Path(dirpath, name)
                if full.is_file() and not full.is_symlink():
                    found.append((rel, full.lstat().st_size))
    return found
