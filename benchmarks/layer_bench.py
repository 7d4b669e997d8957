"""Layer data-path benchmark: sequential reads of one large file through `Layer`, no FUSE.

Builds an eStargz layer holding one file (half random, half text; 4 MiB chunks), pushes it to a
local docker-registry and prints, in MB/s of file bytes:
- cold: first sequential read, every chunk fetched from the registry (readahead off, then on);
- warm: the same read from the on-disk chunk cache, in a fresh cache object (memory LRU empty);
- local: reading the plain file from local disk, for scale.
Page cache is dropped before the warm and local passes when running as root (`--no-drop-caches`
to leave it alone). Figures are printed, never asserted.

Run: `.venv/bin/python -m benchmarks.layer_bench [--size-mib 200] [--read-kib 128]`.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def _make_file(path: Path, size: int) -> None:
    rnd = random.Random(42)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
    with open(path, "wb") as f:
        left = size // 2
        while left:
            n = min(left, 8 * MIB)
            f.write(rnd.randbytes(n))
            left -= n
        left = size - size // 2
        while left:
            line = b" ".join(rnd.choice(words) for _ in range(12)) + b"\n"
            piece = (line * 2000)[:left] if left < 2000 * len(line) else line * 2000
            f.write(piece)
            left -= len(piece)


def _make_tar(src: Path, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w") as tf:
        tf.add(src, arcname="big.bin")


def _drop_caches(enabled: bool) -> str:
    if not enabled:
        return "page cache kept"
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "page cache dropped"
    except OSError as e:
        return f"page cache not dropped ({e.strerror})"


def _sequential(layer, entry, read_size: int) -> float:
    start = time.perf_counter()
    total = 0
    for off in range(0, entry.size, read_size):
        total += len(layer.read(entry, off, read_size))
    elapsed = time.perf_counter() - start
    assert total == entry.size
    return total / elapsed / 1e6


def _local(path: Path, read_size: int) -> float:
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(read_size):
            total += len(chunk)
    return total / (time.perf_counter() - start) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--read-kib", type=int, default=128, help="size of each read (FUSE default max_read: 128)")
    parser.add_argument("--readahead-mib", type=int, default=8)
    parser.add_argument("--no-drop-caches", action="store_true")
    args = parser.parse_args(argv)
    drop = not args.no_drop_caches and os.geteuid() == 0

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from stargz_store.cache import ChunkCache
    from stargz_store.formats.estargz import build_estargz
    from stargz_store.layer import LayerConfig, LayerResolver
    from stargz_store.registry import RegistryClient, RegistryConfig, parse_reference
    from stargz_store.localenv.registry import LocalRegistry as Registry  # the same real registry the tests use

    read_size = args.read_kib * 1024
    with tempfile.TemporaryDirectory(prefix="layer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        plain = tmp / "big.bin"
        _make_file(plain, args.size_mib * MIB)
        _make_tar(plain, tmp / "layer.tar")
        t0 = time.perf_counter()
        with open(tmp / "layer.tar", "rb") as src, open(tmp / "layer.esgz", "wb") as dst:
            built = build_estargz(src, dst)
        print(f"layer: built a {built.size / MIB:.0f} MiB eStargz blob of a {args.size_mib} MiB file "
              f"in {time.perf_counter() - t0:.1f} s")
        (tmp / "layer.tar").unlink()
        descriptor = {"mediaType": built.media_type, "digest": built.digest, "size": built.size,
                      "annotations": dict(built.annotations)}
        registry = Registry(tmp / "registry")
        registry.start()
        try:
            ref = parse_reference(f"{registry.host}/bench/layer:latest")
            with RegistryClient(RegistryConfig()) as client:
                client.push_blob(ref, built.digest, tmp / "layer.esgz")
                # alternated and repeated: the figures of a shared machine drift
                for run, readahead in enumerate((0, args.readahead_mib * MIB) * 2):
                    cache_dir = tmp / f"cache-{run}"
                    config = LayerConfig(no_prefetch=True, no_background_fetch=True, readahead_size=readahead)
                    resolver = LayerResolver(client, ChunkCache(cache_dir), config)
                    with resolver.open_layer(ref, descriptor) as layer:
                        entry = layer.toc.lookup("big.bin")
                        mbps = _sequential(layer, entry, read_size)
                        stats = layer.stats()
                    print(f"layer: cold sequential read, {args.read_kib} KiB reads, readahead "
                          f"{readahead // MIB} MiB: {mbps:.0f} MB/s ({stats['requests']} requests, "
                          f"{stats['fetched_bytes'] / MIB:.0f} MiB fetched)")
                note = _drop_caches(drop)
                resolver = LayerResolver(client, ChunkCache(tmp / "cache-0"), LayerConfig(
                    no_prefetch=True, no_background_fetch=True))
                with resolver.open_layer(ref, descriptor) as layer:
                    entry = layer.toc.lookup("big.bin")
                    mbps = _sequential(layer, entry, read_size)
                    assert layer.fetched_bytes() == 0
                print(f"layer: warm sequential read from the disk cache ({note}): {mbps:.0f} MB/s")
                note = _drop_caches(drop)
                print(f"layer: local disk, same file, same read size ({note}): {_local(plain, read_size):.0f} MB/s")
        finally:
            registry.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
