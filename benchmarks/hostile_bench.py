"""The daemon's memory on hostile images: refused TOCs looked up again and again, and images at the caps.

    python -m benchmarks hostile [--workdir DIR] [--lookups 20] [--only refused|caps] [--keep]

Everything runs against a `docker-registry` started here and a store daemon mounted here, with
the default caps (`max_toc_size_mb` 150, `max_toc_entries` 1,000,000, `max_path_depth` 2048).

Refused layers (one daemon, `negative_cache_ttl_sec = 1`): each is looked up `--lookups` times,
every lookup after the negative cache has expired, so each one fetches and refuses the TOC again.
The daemon's RSS is sampled 4.5 s after each lookup (its malloc trimmer runs every 2 s after
work: freed heap is handed back by then), and its peak (VmHWM, reset before each kind) is shown:
- a TOC over the byte cap: 230 MB of JSON compressed to ~120 MB (under the compressed cap, so it
  is fetched whole), refused at its tar header;
- a gzip bomb: a TOC member declaring 1 GiB (1 MB compressed);
- a zstd:chunked bomb: a manifest inflating to 1 GiB whose position claims 100 bytes;
- 2,000,000 tiny entries under the byte cap (56 MB of JSON);
- a chain of directories 10,000 levels deep (100 MB of JSON, 0.1 MB compressed).

Images at the caps (a fresh daemon each; the image is served, and its lookup's peak RSS shown):
- 1,000,000 entries (1,000 directories, 999,000 one-byte files with their own digests),
  ~115 MB of JSON;
- directories listed 2048 levels deep with 65-byte components (~140 MB of JSON);
- one file 2048 levels deep under directories it only implies (~136 MB of implied names).

Images are built once and kept under `--workdir` (a few minutes the first time).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procstat import status_bytes  # noqa: E402
from stargz_store.localenv.registry import LocalRegistry  # noqa: E402
from stargz_store.localenv.store import StoreProcess  # noqa: E402
from tests.fixtures.hostile_layers import (  # noqa: E402
    TOC_NAME,
    CraftedLayer,
    estargz_layer,
    flat_entries,
    repeated,
    streamed_member,
    tar_header,
    write_image,
    zstd_bomb,
    zstd_layer,
)
from tests.fixtures.images import push_oci_layout  # noqa: E402

DEFAULT_WORKDIR = Path("/var/tmp/stargz-store-bench/hostile")
LAYOUT_VERSION = 1
MB = 1e6
SETTLE_S = 4.5  # after a lookup: the daemon's malloc trimmer (every 2 s after work) has run twice
SMALL = {"f.txt": b"payload\n"}
CONFIG = """\
noprefetch = true
no_background_fetch = true
[store]
negative_cache_ttl_sec = 1
resolve_timeout_sec = 300
"""


# --- the layers ---------------------------------------------------------------------------------


def over_cap_toc() -> CraftedLayer:
    """230 MB of JSON entries with random names (~2x compressible), declared in a plain header."""
    rng = random.Random(11)
    entry = len(b'{"name":"x/' + b"0" * 64 + b'","type":"reg"},')
    count = 230_000_000 // entry

    def pieces() -> Iterator[bytes]:
        yield b'{"version":1,"entries":['
        for start in range(0, count, 10_000):
            names = [rng.randbytes(32).hex() for _ in range(min(10_000, count - start))]
            yield b"".join(b'{"name":"x/%s","type":"reg"},' % n.encode() for n in names)
        yield b'{"name":"x","type":"dir"}]}'

    size = 24 + count * entry + len(b'{"name":"x","type":"dir"}]}')
    return estargz_layer("over-cap", SMALL, member=streamed_member(tar_header(TOC_NAME, size), pieces(), level=1))


def gzip_bomb() -> CraftedLayer:
    size = 1 << 30
    return estargz_layer("gzip-bomb", SMALL, member=streamed_member(tar_header(TOC_NAME, size), repeated(b" ", size)))


def zstd_bomb_layer() -> CraftedLayer:
    return zstd_layer("zstd-bomb", zstd_bomb(1 << 30), declared_size=100, refusal=None)


def tiny_entries(count: int) -> CraftedLayer:
    return estargz_layer(f"{count}-entries", SMALL, toc_edit=lambda e, _: e.extend(flat_entries(count)))


def deep_listed(depth: int, component: str = "a") -> CraftedLayer:
    def add(entries: list[dict], _: int) -> None:
        entries.extend({"name": "/".join([component] * level) + "/", "type": "dir"} for level in range(1, depth + 1))

    return estargz_layer(f"{depth}-deep-listed", SMALL, toc_edit=add)


def deep_implied(depth: int, component: str) -> CraftedLayer:
    name = "/".join([component] * depth)
    return estargz_layer(f"{depth}-deep-implied", SMALL, toc_edit=lambda e, _: e.append({"name": name, "type": "fifo"}))


def entries_at_cap(total: int = 1_000_000, dirs: int = 1000) -> CraftedLayer:
    """`dirs` directories and `total - dirs - 1` one-byte files (the layer's own file is the
    first entry), each file with its own digest (their data is never read here)."""
    files = total - dirs - 1

    def edit(entries: list[dict], toc_offset: int) -> None:
        entries.extend({"name": f"d{i:04d}/", "type": "dir"} for i in range(dirs))
        entries.extend(
            {"name": f"d{i % dirs:04d}/f{i:07d}", "type": "reg", "size": 1, "offset": i % toc_offset,
             "digest": "sha256:%064x" % i}
            for i in range(files)
        )

    return estargz_layer("1M-entries", SMALL, toc_edit=edit)


# --- measuring ------------------------------------------------------------------------------------


def build_images(workdir: Path, registry: LocalRegistry, kinds: list[str]) -> dict[str, tuple[str, dict]]:
    """Each kind's layer in an image of its own, pushed; returns kind -> (reference, descriptor)."""
    makers = {
        "over-cap TOC (230 MB JSON)": over_cap_toc,
        "gzip bomb (1 GiB)": gzip_bomb,
        "zstd bomb (1 GiB)": zstd_bomb_layer,
        "2,000,000 tiny entries": lambda: tiny_entries(2_000_000),
        "10,000 levels deep": lambda: deep_listed(10_000),
        "1,000,000 entries (cap)": entries_at_cap,
        "2048 levels listed, 65-byte names (cap)": lambda: deep_listed(2048, "c" * 65),
        "2048 levels implied, 65-byte names (cap)": lambda: deep_implied(2048, "c" * 65),
    }
    out = {}
    for kind in kinds:
        key = "".join(ch if ch.isalnum() else "-" for ch in kind).strip("-").lower()
        layout = workdir / f"v{LAYOUT_VERSION}-{key}"
        if not (layout / "index.json").exists():
            start = time.monotonic()
            layer = makers[kind]()
            write_image(layout, [layer], "v1")
            print(f"built {kind}: {len(layer.blob) / MB:.1f} MB blob in {time.monotonic() - start:.0f} s", flush=True)
            del layer
        index = json.loads((layout / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
        ref = f"{registry.host}/hostile/{key}:v1"
        push_oci_layout(layout, "v1", ref, timeout=600)
        out[kind] = (ref, manifest["layers"][0])
    return out


def _mb(pid: int, key: str) -> float:
    return (status_bytes(pid, key) or 0) / MB


def _reset_peak(pid: int) -> None:
    """Start VmHWM afresh (Linux >= 4.0, our own child)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def _lookup(store: StoreProcess, ref: str, digest: str) -> tuple[str, float]:
    start = time.monotonic()
    try:
        os.stat(store.layer_dir(ref, digest) / "diff")
        result = "ok"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
    return result, time.monotonic() - start


def start_store(base: Path) -> StoreProcess:
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text(CONFIG)
    store = StoreProcess(root=base / "root", mountpoint=base / "mnt", config_path=config,
                         log_path=base / "store.log", log_level="info")
    store.start(timeout=60)
    return store


def measure_refused(images: dict[str, tuple[str, dict]], base: Path, lookups: int) -> list[str]:
    store = start_store(base / "refused")
    assert store.proc is not None
    pid = store.server_pid()  # the serving process parses the TOCs; the holder never does
    rows = [f"daemon RSS at start: {_mb(pid, 'VmRSS'):.0f} MB"]
    try:
        for kind, (ref, desc) in images.items():
            _reset_peak(pid)
            samples, results, times = [], set(), []
            failures_before = store.stats()["pool"]["layer_open_failures"]
            for _ in range(lookups):
                result, seconds = _lookup(store, ref, desc["digest"])
                results.add(result)
                times.append(seconds)
                time.sleep(SETTLE_S)  # > negative_cache_ttl_sec: the next lookup refuses anew
                samples.append(_mb(pid, "VmRSS"))
            opens = store.stats()["pool"]["layer_open_failures"] - failures_before
            rows.append(
                f"{kind:42s} {'/'.join(sorted(results)):4s} refusals {opens:2d}  RSS after lookup 1: {samples[0]:4.0f} MB, "
                f"after {lookups}: {samples[-1]:4.0f} MB (min {min(samples):.0f}, max {max(samples):.0f})  "
                f"peak {_mb(pid, 'VmHWM'):4.0f} MB  lookup {min(times):.2f}-{max(times):.2f} s"
            )
            print(rows[-1], flush=True)
    finally:
        store.stop(timeout=60, unmount_leftover=True)
    return rows


def measure_caps(images: dict[str, tuple[str, dict]], base: Path) -> list[str]:
    rows = []
    for n, (kind, (ref, desc)) in enumerate(images.items()):
        store = start_store(base / f"caps{n}")
        assert store.proc is not None
        pid = store.server_pid()
        try:
            before = _mb(pid, "VmRSS")
            result, seconds = _lookup(store, ref, desc["digest"])
            rows.append(
                f"{kind:42s} {result:4s} lookup {seconds:5.1f} s  RSS before {before:.0f} MB, after {_mb(pid, 'VmRSS'):4.0f} MB,"
                f" peak {_mb(pid, 'VmHWM'):4.0f} MB"
            )
            print(rows[-1], flush=True)
        finally:
            store.stop(timeout=60, unmount_leftover=True)
    return rows


REFUSED = ["over-cap TOC (230 MB JSON)", "gzip bomb (1 GiB)", "zstd bomb (1 GiB)", "2,000,000 tiny entries",
           "10,000 levels deep"]
AT_CAPS = ["1,000,000 entries (cap)", "2048 levels listed, 65-byte names (cap)", "2048 levels implied, 65-byte names (cap)"]


def _chosen(kinds: list[str], wanted: list[str]) -> list[str]:
    return [k for k in kinds if not wanted or any(w in k for w in wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostile_bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the images are built and kept")
    parser.add_argument("--lookups", type=int, default=20, help="lookups of each refused layer")
    parser.add_argument("--only", choices=["refused", "caps"], help="only one half")
    parser.add_argument("--keep", action="store_true", help="keep the registry data and store roots afterwards")
    parser.add_argument("--case", action="append", default=[],
                        help="only the cases whose name contains this text (repeatable)")
    args = parser.parse_args(argv or [])
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        print("docker-registry and skopeo are needed: run `make deps`")
        return 1
    if os.geteuid() != 0:
        print("the hostile benchmark needs root (FUSE mount)")
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="hostile-bench-", dir=args.workdir))
    registry = LocalRegistry(run_dir / "registry", log_level="warn", access_log=False)
    lines: list[str] = []
    try:
        registry.start()
        if args.only in (None, "refused"):
            images = build_images(args.workdir, registry, _chosen(REFUSED, args.case))
            print(f"\nrefused layers, {args.lookups} lookups each (load {os.getloadavg()[0]:.1f}):", flush=True)
            lines += ["refused layers:", *measure_refused(images, run_dir, args.lookups)]
        if args.only in (None, "caps"):
            images = build_images(args.workdir, registry, _chosen(AT_CAPS, args.case))
            print(f"\nimages at the caps, a fresh daemon each (load {os.getloadavg()[0]:.1f}):", flush=True)
            lines += ["images at the caps:", *measure_caps(images, run_dir)]
    finally:
        registry.stop()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    print()
    for line in lines:
        print(line)
    print(f"load after run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
