"""The store on the issue's generated image, beside local disk and the Go stargz-store 0.12.0.

    python -m benchmarks store [--workdir DIR] [--model] [--runs N] [--lookup-only] [--keep] [--record]

The image (one 200 MiB file half random, half text; 20,000 files of 1-8 KiB; 100,000 tiny
entries; see `benchmarks/store_image.py`) is built once and kept under `--workdir`, pushed to a
`docker-registry` started here on 127.0.0.1, and served by a stargz-store daemon mounted here
with prefetch and background fetch off. Each figure has the same operation on the tree
extracted to local disk beside it; the page cache (and dentries) are dropped before each pass.

Figures (1 MB = 10^6 bytes; wall clock; nothing is asserted):
- first lookup: stat of `<mnt>/<ref>/<layer>/diff` on a fresh daemon, which resolves the image
  (manifest, config, footer and the ~120,000-entry TOC fetched, verified and parsed); the
  daemon's CPU time for it is shown too, since wall time on a shared machine varies with load;
- daemon RSS after that lookup (and its peak, VmHWM);
- cold sequential read of the 200 MiB file (every chunk fetched from the registry);
- warm read of the same file, served from the store's disk cache;
- warm walk-and-read of the 20,000 small files (after one cold walk filled the cache).

`--record` runs the daemon with first-read recording on for every image (`[record] images =
["*"]`, issue 17): the read figures then include what recording costs; without it recording is
off, as by default.

`--model` measures the same operations one level down, through `LayerResolver`/`Layer` in
this process (no FUSE), which separates the data path from the mount.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procstat import status_bytes, tree_context_switches, tree_cpu_seconds, tree_status_bytes  # noqa: E402
from benchmarks.startup.store import store_package_parent  # noqa: E402
from benchmarks.store_image import BIG_PATH, SMALL_DIR, BuiltImage, ImageShape, build_image  # noqa: E402
from stargz_store.localenv.registry import LocalRegistry  # noqa: E402
from stargz_store.localenv.store import StoreProcess  # noqa: E402

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/var/tmp/stargz-store-bench")
MB = 1e6
READ_SIZE = 1 << 20

# Go stargz-store 0.12.0 on this image, measured the same way (issue 3), and the targets.
GO_REFERENCE = {
    "first_lookup_s": 0.41,
    "rss_mb": 191.0,
    "cold_read_mbps": 203.0,
    "warm_read_mbps": 1760.0,
    "warm_read_vs_local": 0.23,
    "walk_s": 1.98,
    "walk_vs_local": 4.9,
}
TARGETS = {
    "first_lookup_s": ("<=", 0.35),
    "rss_mb": ("<=", 120.0),
    "cold_read_mbps": (">=", 220.0),
    "warm_read_vs_local": (">=", 0.8),
    "walk_vs_local": ("<=", 2.0),
}

STORE_CONFIG = """\
noprefetch = true
no_background_fetch = true
[blob]
fetching_timeout_sec = 60
[store]
resolve_timeout_sec = 120
"""
RECORD_CONFIG = """\
[record]
images = ["*"]
"""


# --- page cache ---------------------------------------------------------------------------

class PageCache:
    """Drops the page cache, dentries and inodes (`echo 3 > drop_caches`), when we may."""

    def __init__(self) -> None:
        self.available = True

    def drop(self) -> None:
        if not self.available:
            return
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            log.warning("cannot drop the page cache (%s): warm/local figures include cached pages", e)
            self.available = False


# --- registry ---------------------------------------------------------------------------

def local_registry(workdir: Path) -> LocalRegistry:
    """The shared local registry, quiet: this benchmark counts nothing from its access log."""
    return LocalRegistry(workdir, log_level="warn", access_log=False)


def push_image(image: BuiltImage, registry: LocalRegistry, repo: str = "bench/store") -> tuple[str, dict]:
    """Push the layer, a config and an OCI manifest; returns (reference, manifest)."""
    from stargz_store.registry.client import RegistryClient
    from stargz_store.registry.reference import parse_reference

    result = image.result
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [result.diff_id]},
    }
    config_raw = json.dumps(config, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_raw)},
        "layers": [
            {"mediaType": result.media_type, "digest": result.digest, "size": result.size, "annotations": dict(result.annotations)}
        ],
    }
    ref_text = f"{registry.host}/{repo}:latest"
    ref = parse_reference(ref_text)
    with RegistryClient() as client:
        client.push_blob(ref, result.digest, image.blob_path)
        client.push_blob(ref, config_digest, config_raw)
        client.push_manifest(ref, json.dumps(manifest).encode(), manifest["mediaType"])
    return ref_text, manifest


# --- file operations, timed ----------------------------------------------------------------

def read_whole(path: Path) -> int:
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return total
            total += n


def _walk(top: Path, read_file: Callable[[str], int]) -> tuple[int, int]:
    """(files, bytes) of every file under `top`, each read whole by `read_file(path)`."""
    files = total = 0
    for dirpath, _, names in os.walk(top):
        for name in names:
            total += read_file(os.path.join(dirpath, name))
            files += 1
    return files, total


def _read_with_open(path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def _read_plain(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while chunk := os.read(fd, READ_SIZE):
            total += len(chunk)
        return total
    finally:
        os.close(fd)


def walk_and_read(top: Path) -> tuple[int, int]:
    """Every file under `top` opened and read whole with Python's `open()`, as the issue's
    figures were taken: that `open()` also asks each file `isatty()`, one more FUSE round trip
    (an IOCTL) per file of the store (see `walk_and_read_plain`)."""
    return _walk(top, _read_with_open)


def walk_and_read_plain(top: Path) -> tuple[int, int]:
    """The same walk with `os.open`/`os.read`/`os.close`, as `cat`, `tar` or an `exec` read a
    file: no `isatty()` (no IOCTL), so the store answers one OPEN and one RELEASE per file."""
    return _walk(top, _read_plain)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


@dataclass
class Figures:
    first_lookup_s: float | None = None
    first_lookup_cpu_s: float | None = None
    rss_mb: float | None = None
    peak_rss_mb: float | None = None
    cold_read_mbps: float | None = None
    warm_read_mbps: float | None = None
    cold_walk_s: float | None = None
    walk_s: float | None = None
    plain_walk_s: float | None = None  # `walk_and_read_plain`, warm, after the first walk
    notes: list[str] = field(default_factory=list)


def measure_local(tree: Path, cache: PageCache) -> Figures:
    """The same operations on the extracted tree."""
    fig = Figures()
    cache.drop()
    fig.first_lookup_s, _ = timed(lambda: os.stat(tree / BIG_PATH))
    cache.drop()
    seconds, size = timed(lambda: read_whole(tree / BIG_PATH))
    fig.cold_read_mbps = fig.warm_read_mbps = size / MB / seconds
    cache.drop()
    fig.walk_s, (files, _) = timed(lambda: walk_and_read(tree / SMALL_DIR))
    fig.cold_walk_s = fig.walk_s
    cache.drop()
    fig.plain_walk_s, _ = timed(lambda: walk_and_read_plain(tree / SMALL_DIR))
    fig.notes.append(f"local walk: {files} files")
    return fig


# --- the mounted daemon ----------------------------------------------------------------------

def _proc_status_mb(pid: int, key: str) -> float | None:
    """Summed over the store's processes (the holder and its serving processes)."""
    value = tree_status_bytes(pid, key)
    return None if value is None else value / MB


def store_process(base: Path, record: bool = False, store_keys: tuple[str, ...] = ()) -> StoreProcess:
    """A daemon under `base` with a fresh (empty) root and the benchmark's config (plus
    `store_keys`, lines of its `[store]` table), not started yet."""
    root = base / "root"
    if root.exists():
        shutil.rmtree(root)
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text(STORE_CONFIG + "".join(f"{line}\n" for line in store_keys) + (RECORD_CONFIG if record else ""))
    return StoreProcess(root=root, mountpoint=base / "mnt", config_path=config, log_path=base / "store.log",
                        log_level="warn", package_parent=store_package_parent())


def settle_backing_files(store: StoreProcess, fig: Figures, what: str, timeout: float = 300.0) -> None:
    """Wait until the store has made the backing files the pass before offered (passthrough), so
    the warm pass finds them: first for every RELEASE to be answered (a file is offered at its
    release), then for the queue; the wait is noted (it is work the store does once per file)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        stats = store.stats()
        fs = stats.get("fs", {})
        if fs.get("cached_inodes") or fs.get("passthrough_inodes"):
            time.sleep(0.05)  # a RELEASE not answered yet (the kernel sends them after close): it offers the file
            continue
        backing = stats.get("backing_files")
        if backing is None or not backing.get("queued"):
            break
        time.sleep(0.2)
    else:
        backing = store.stats().get("backing_files")
    if backing is not None:
        fig.notes.append(f"backing files after the {what}: {backing.get('files')} made "
                         f"(waited {time.perf_counter() - start:.1f} s for them)")


def measure_daemon(ref: str, manifest: dict, base: Path, cache: PageCache, runs: int, lookup_only: bool = False,
                   record: bool = False, store_keys: tuple[str, ...] = ()) -> Figures:
    fig = Figures()
    layer = manifest["layers"][0]["digest"]
    store = store_process(base, record, store_keys)
    lookups = []
    cpus = []
    try:
        for _ in range(max(1, runs)):  # a fresh daemon (and root) per first lookup
            store.stop(timeout=30, unmount_leftover=True)
            store = store_process(base, record, store_keys)
            store.start(timeout=60)
            diff = store.layer_dir(ref, layer) / "diff"
            cache.drop()
            assert store.proc is not None
            cpu = tree_cpu_seconds(store.proc.pid)
            seconds, _ = timed(lambda: os.stat(diff))
            cpus.append(tree_cpu_seconds(store.proc.pid) - cpu)
            lookups.append(seconds)
        fig.first_lookup_s = statistics.median(lookups)
        fig.first_lookup_cpu_s = statistics.median(cpus)
        fig.notes.append(
            "first lookups: " + ", ".join(f"{s:.3f}" for s in lookups) + " s wall; daemon CPU "
            + ", ".join(f"{c:.2f}" for c in cpus) + " s (CPU ticks are 10 ms)"
        )
        server = store.server_pid()  # the serving process (the holder only keeps the mount)
        fig.rss_mb = _proc_status_mb(server, "VmRSS")
        fig.peak_rss_mb = _proc_status_mb(server, "VmHWM")
        if lookup_only:
            return fig
        big = diff / BIG_PATH
        cache.drop()
        seconds, size = timed(lambda: read_whole(big))
        fig.cold_read_mbps = size / MB / seconds
        pid = store.proc.pid  # the holder and its serving process (tree sums)
        settle_backing_files(store, fig, "cold read")
        cache.drop()
        cpu = tree_cpu_seconds(pid)
        seconds, size = timed(lambda: read_whole(big))
        warm_read_cpu = tree_cpu_seconds(pid) - cpu
        fig.warm_read_mbps = size / MB / seconds
        cache.drop()
        fig.cold_walk_s, _ = timed(lambda: walk_and_read(diff / SMALL_DIR))
        settle_backing_files(store, fig, "cold walk")
        cache.drop()
        requests = store.stats().get("fs", {}).get("requests", {})
        cpu, switches = tree_cpu_seconds(pid), tree_context_switches(pid)
        fig.walk_s, (files, _) = timed(lambda: walk_and_read(diff / SMALL_DIR))
        walk_cpu = tree_cpu_seconds(pid) - cpu
        switches = tree_context_switches(pid) - switches
        fig.notes.append("warm walk, FUSE requests per file (and the store's µs per file answering them): "
                         + per_file_requests(requests, store.stats().get("fs", {}).get("requests", {}), files))
        cache.drop()
        fig.plain_walk_s, _ = timed(lambda: walk_and_read_plain(diff / SMALL_DIR))
        fig.notes.append(f"store walk: {files} files; RSS after the reads {_proc_status_mb(pid, 'VmRSS') or 0:.0f} MB; "
                         f"the store's threads were switched to {switches / max(1, files):.1f} times per file")
        if record:
            from stargz_store.daemon.record_cli import fetch_record

            fig.notes.append(f"recorded {len(fetch_record(str(store.root / 'store.sock'), ref))} first reads")
        fig.notes.append(f"daemon CPU (less sensitive to load than wall time): warm read {warm_read_cpu:.2f} s, "
                         f"warm walk {walk_cpu:.2f} s")
        fs = store.stats().get("fs", {})
        fig.notes.append(f"FUSE: {fs.get('read_requests', '?')} READs answered by the store, "
                         f"{fs.get('passthrough_opens', '?')} opens by passthrough")
    finally:
        store.stop(timeout=30, unmount_leftover=True)
    return fig


def per_file_requests(before: dict, after: dict, files: int) -> str:
    """The FUSE requests a walk cost per file, by operation, from two `fs.requests` snapshots
    of stats.json ({operation: [count, seconds]})."""
    parts = []
    for name in sorted(after):
        count = after[name][0] - before.get(name, [0, 0.0])[0]
        seconds = after[name][1] - before.get(name, [0, 0.0])[1]
        if count and files:
            parts.append(f"{name} {count / files:.2f} ({seconds / files * 1e6:.0f} µs)")
    return ", ".join(parts) or "none"


# --- one level down: LayerResolver in this process -------------------------------------------

def _rss_mb() -> float:
    return (status_bytes(os.getpid(), "VmRSS") or 0) / MB


def measure_model(ref_text: str, manifest: dict, base: Path, cache: PageCache) -> Figures:
    from stargz_store.cache.chunk_cache import ChunkCache
    from stargz_store.formats.toc import REG
    from stargz_store.layer.config import LayerConfig
    from stargz_store.layer.resolver import LayerResolver
    from stargz_store.registry.client import RegistryClient
    from stargz_store.registry.reference import parse_reference

    fig = Figures()
    root = base / "model-cache"
    if root.exists():
        shutil.rmtree(root)
    config = LayerConfig(no_prefetch=True, no_background_fetch=True)
    ref = parse_reference(ref_text)
    rss_before = _rss_mb()
    with RegistryClient() as client:
        resolver = LayerResolver(client, ChunkCache(root), config)

        def resolve():
            got = client.get_manifest(ref)
            client.get_config(ref, got)
            return resolver.open_layer(ref, manifest["layers"][0])

        cpu = time.process_time()
        fig.first_lookup_s, layer = timed(resolve)
        fig.first_lookup_cpu_s = time.process_time() - cpu
        fig.rss_mb = _rss_mb()
        fig.notes.append(f"model: RSS {rss_before:.0f} MB before resolving, {fig.rss_mb:.0f} MB after (this process)")
        toc = layer.toc
        big = toc.lookup(BIG_PATH)

        def read_big() -> int:
            total = 0
            for offset in range(0, big.size, READ_SIZE):
                total += len(layer.read(big, offset, READ_SIZE))
            return total

        cache.drop()
        seconds, size = timed(read_big)
        fig.cold_read_mbps = size / MB / seconds
        cache.drop()
        seconds, size = timed(read_big)
        fig.warm_read_mbps = size / MB / seconds
        small = [e for path, e in toc.entries() if path.startswith(SMALL_DIR + "/") and e.type == REG]

        def walk() -> int:
            return sum(len(layer.read(e, 0, e.size)) for e in small)

        cache.drop()
        fig.cold_walk_s, _ = timed(walk)
        cache.drop()
        fig.walk_s, _ = timed(walk)
        fig.notes.append(f"model walk: {len(small)} files")
        layer.close()
    return fig


# --- report ------------------------------------------------------------------------------------

def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.2f}x"


def _verdict(key: str, value: float | None) -> str:
    if key not in TARGETS or value is None:
        return ""
    op, limit = TARGETS[key]
    ok = value <= limit if op == "<=" else value >= limit
    return f"{'meets' if ok else 'MISSES'} {op} {limit:g}"


def report(ours: Figures, local: Figures, label: str) -> list[str]:
    warm_ratio = ours.warm_read_mbps / local.warm_read_mbps if ours.warm_read_mbps and local.warm_read_mbps else None
    walk_ratio = ours.walk_s / local.walk_s if ours.walk_s and local.walk_s else None
    g = GO_REFERENCE
    rows = [
        ("first lookup (resolve, ~120k-entry TOC)", _fmt(ours.first_lookup_s, "s"), _fmt(local.first_lookup_s, "s"),
         _fmt(g["first_lookup_s"], "s"), _verdict("first_lookup_s", ours.first_lookup_s)),
        ("  CPU time of that lookup", _fmt(ours.first_lookup_cpu_s, "s"), "-", "-", ""),
        ("RSS after resolving", _fmt(ours.rss_mb, "MB") + (f" (peak {ours.peak_rss_mb:.0f})" if ours.peak_rss_mb else ""),
         "-", _fmt(g["rss_mb"], "MB"), _verdict("rss_mb", ours.rss_mb)),
        ("cold sequential read, 200 MiB file", _fmt(ours.cold_read_mbps, "MB/s"), _fmt(local.cold_read_mbps, "MB/s"),
         _fmt(g["cold_read_mbps"], "MB/s"), _verdict("cold_read_mbps", ours.cold_read_mbps)),
        ("warm read (store cache, page cache dropped)", _fmt(ours.warm_read_mbps, "MB/s"), _fmt(local.warm_read_mbps, "MB/s"),
         _fmt(g["warm_read_mbps"], "MB/s"), ""),
        ("  warm read vs local disk", _fmt(warm_ratio, "x"), "1.00x", _fmt(g["warm_read_vs_local"], "x"),
         _verdict("warm_read_vs_local", warm_ratio)),
        ("cold walk-and-read, 20,000 files", _fmt(ours.cold_walk_s, "s"), _fmt(local.cold_walk_s, "s"), "-", ""),
        ("warm walk-and-read, 20,000 files", _fmt(ours.walk_s, "s"), _fmt(local.walk_s, "s"), _fmt(g["walk_s"], "s"), ""),
        ("  warm walk vs local disk", _fmt(walk_ratio, "x"), "1.00x", _fmt(g["walk_vs_local"], "x"),
         _verdict("walk_vs_local", walk_ratio)),
    ]
    if ours.plain_walk_s and local.plain_walk_s:  # (not measured by --model)
        rows += [
            ("warm walk, os.open/os.read (no isatty)", _fmt(ours.plain_walk_s, "s"), _fmt(local.plain_walk_s, "s"), "-", ""),
            ("  that walk vs local disk", _fmt(ours.plain_walk_s / local.plain_walk_s, "x"), "1.00x", "-", ""),
        ]
    header = ("operation", label, "local disk", "Go 0.12.0", "target")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="store_bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the image is built and kept")
    parser.add_argument("--model", action="store_true", help="measure LayerResolver/Layer in-process instead of the mount")
    parser.add_argument("--runs", type=int, default=1, help="first lookups to take the median of (a fresh daemon each)")
    parser.add_argument("--keep", action="store_true", help="keep the registry data and store root afterwards")
    parser.add_argument("--lookup-only", action="store_true", help="only the first lookup and RSS (skips the reads)")
    parser.add_argument("--record", action="store_true", help="first-read recording on for every image (issue 17)")
    parser.add_argument("--set", action="append", default=[], metavar="'KEY = VALUE'",
                        help="a line for the daemon's [store] table, e.g. 'passthrough = false' (repeatable)")
    args = parser.parse_args(argv or [])
    for tool in ("docker-registry",):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run `make deps`")
            return 1
    if not args.model and os.geteuid() != 0:
        print("the mounted-store benchmark needs root (FUSE mount, drop_caches); use --model otherwise")
        return 1
    cache = PageCache()
    start = time.perf_counter()
    image = build_image(args.workdir, ImageShape())
    print(f"image: {image.result.size / MB:.1f} MB blob, layer {image.result.digest[:19]}..., "
          f"ready in {time.perf_counter() - start:.1f} s (kept in {image.workdir})", flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.workdir))
    registry = local_registry(run_dir / "registry")
    try:
        registry.start()
        seconds, (ref, manifest) = timed(lambda: push_image(image, registry))
        print(f"pushed {ref} in {seconds:.1f} s; cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}", flush=True)
        local = measure_local(image.tree_path, cache)
        if args.model:
            ours, label = measure_model(ref, manifest, run_dir, cache), "model (no FUSE)"
        else:
            ours = measure_daemon(ref, manifest, run_dir, cache, args.runs, args.lookup_only, args.record,
                                  tuple(args.set))
            label = "stargz-store (Python)" + (", recording" if args.record else "") + "".join(f", {k}" for k in args.set)
    finally:
        registry.stop()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    print()
    for row in report(ours, local, label):
        print(row)
    for note in ours.notes + local.notes:
        print("note:", note)
    if not cache.available:
        print("note: the page cache could not be dropped; local and warm figures are from memory")
    print(f"load after run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus (a shared machine slows every figure)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
