"""Converter throughput on a generated mixed layer, beside `gzip -6` on the same tar.

    python -m benchmarks convert [--size-mib 200] [--workers 2] [--chunk-size BYTES]

Figures are MB/s of uncompressed input (1 MB = 10^6 bytes), wall clock. The issue's target is at
least half of gzip's speed with both cores in use; the machine's other load is printed too,
since a shared box changes both numbers.

The layer mixes what image layers hold: many small text files (real text from this machine when
available), binaries (ELF files), incompressible assets, and a few files of several chunks.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stargz_store.formats.estargz import build_estargz  # noqa: E402

_TEXT_SOURCES = ("/usr/lib/python3", "/usr/share/doc", "/usr/share/perl", "/usr/lib/python3.11", "/etc")
_BINARY_SOURCES = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu")
_MIB = 1 << 20


def _corpus(dirs: tuple[str, ...], limit: int, suffixes: tuple[str, ...] | None, rng: random.Random) -> bytes:
    """Up to `limit` bytes of real files from `dirs`, so compressibility is realistic."""
    parts: list[bytes] = []
    total = 0
    for top in dirs:
        for dirpath, _, files in os.walk(top):
            for name in files:
                if suffixes and not name.endswith(suffixes):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    with open(path, "rb") as f:
                        data = f.read(2 * _MIB)
                except OSError:
                    continue
                parts.append(data)
                total += len(data)
                if total >= limit:
                    return b"".join(parts)
    if total < limit // 4:  # a bare machine: fall back to generated words
        words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
        parts.append(b" ".join(rng.choice(words) for _ in range(limit // 6)))
    return b"".join(parts)


def build_mixed_tar(path: Path, size: int, seed: int = 42) -> int:
    """Write a PAX tar of about `size` payload bytes to `path`; returns its size."""
    rng = random.Random(seed)
    text = _corpus(_TEXT_SOURCES, 24 * _MIB, (".py", ".txt", ".pl", ".pm", ".conf", ".md", ".html", ".sh", ""), rng)
    binary = _corpus(_BINARY_SOURCES, 24 * _MIB, None, rng)
    noise = rng.randbytes(8 * _MIB)

    def slice_of(pool: bytes, n: int) -> bytes:
        if n >= len(pool):
            return (pool * (n // len(pool) + 1))[:n]
        start = rng.randrange(0, len(pool) - n)
        return pool[start : start + n]

    written = 0
    index = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))

        for d in range(40):
            info = tarfile.TarInfo(f"usr/share/pkg{d:02}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        while written < size:
            index += 1
            kind = rng.random()
            d = f"usr/share/pkg{index % 40:02}"
            if kind < 0.55:  # small text: config, scripts, sources
                data = slice_of(text, int(rng.lognormvariate(8.5, 1.2)) % (256 << 10) + 1)
                add(f"{d}/file{index}.txt", data)
            elif kind < 0.85:  # binaries and libraries
                data = slice_of(binary, int(rng.lognormvariate(11.5, 1.3)) % (8 * _MIB) + 1)
                add(f"{d}/lib{index}.so", data, 0o755)
            elif kind < 0.97:  # compressed assets
                data = slice_of(noise, int(rng.lognormvariate(10.5, 1.5)) % (4 * _MIB) + 1)
                add(f"{d}/asset{index}.gz", data)
            else:  # a big file spanning several chunks
                n = rng.randint(6 * _MIB, 20 * _MIB)
                data = slice_of(binary, n // 2) + slice_of(text, n - n // 2)
                add(f"{d}/big{index}.bin", data, 0o755)
            written += len(data)
    return path.stat().st_size


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gzip_time(tar_path: Path, out_path: Path) -> float:
    def run() -> None:
        with open(tar_path, "rb") as src, open(out_path, "wb") as dst:
            subprocess.run(["gzip", "-6", "-c"], stdin=src, stdout=dst, check=True)

    return _timed(run)


def _convert_time(tar_path: Path, out_path: Path, **kw: object) -> tuple[float, int]:
    result = None

    def run() -> None:
        nonlocal result
        with open(tar_path, "rb") as src, open(out_path, "wb") as dst:
            result = build_estargz(src, dst, **kw)  # type: ignore[arg-type]

    seconds = _timed(run)
    assert result is not None
    return seconds, result.size


def _zstd_time(tar_path: Path, out_path: Path) -> tuple[float, int] | None:
    try:
        from stargz_store.formats.zstd_chunked_writer import build_zstd_chunked
    except ImportError:
        return None
    result = None

    def run() -> None:
        nonlocal result
        with open(tar_path, "rb") as src, open(out_path, "wb") as dst:
            result = build_zstd_chunked(src, dst)

    seconds = _timed(run)
    assert result is not None
    return seconds, result.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200, help="payload of the generated layer")
    parser.add_argument("--workers", type=int, default=2, help="compression threads of the converter")
    parser.add_argument("--chunk-size", type=int, default=4 << 20)
    parser.add_argument("--no-zstd", action="store_true", help="skip the zstd:chunked writer")
    args = parser.parse_args(argv or [])
    if shutil.which("gzip") is None:
        print("gzip not found: cannot measure the yardstick")
        return 1
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        tmpdir = Path(tmp)
        tar_path = tmpdir / "layer.tar"
        t = _timed(lambda: build_mixed_tar(tar_path, args.size_mib * _MIB))
        tar_size = tar_path.stat().st_size
        mb = tar_size / 1e6
        print(f"layer: {mb:.1f} MB uncompressed tar, generated in {t:.1f} s; cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
        # Warm the page cache so neither side pays the first read.
        with open(tar_path, "rb") as f:
            while f.read(8 * _MIB):
                pass

        gz = _gzip_time(tar_path, tmpdir / "layer.tar.gz")
        gz_size = (tmpdir / "layer.tar.gz").stat().st_size
        print(f"gzip -6                 : {gz:6.2f} s  {mb / gz:7.1f} MB/s  -> {gz_size / 1e6:.1f} MB")

        rows = [(1, "eStargz (1 worker)      "), (args.workers, f"eStargz ({args.workers} workers)     ")]
        best = 0.0
        for workers, label in rows if args.workers != 1 else rows[:1]:
            seconds, size = _convert_time(tar_path, tmpdir / "layer.esgz", workers=workers, chunk_size=args.chunk_size)
            best = max(best, mb / seconds)
            print(f"{label}: {seconds:6.2f} s  {mb / seconds:7.1f} MB/s  -> {size / 1e6:.1f} MB  ({gz / seconds:.2f}x gzip)")
        if not args.no_zstd:
            z = _zstd_time(tar_path, tmpdir / "layer.zst")
            if z is not None:
                seconds, size = z
                print(f"zstd:chunked            : {seconds:6.2f} s  {mb / seconds:7.1f} MB/s  -> {size / 1e6:.1f} MB  ({gz / seconds:.2f}x gzip)")
        verdict = "meets" if best >= 0.5 * mb / gz else "MISSES"
        print(f"target (>= 0.5x gzip -6 = {0.5 * mb / gz:.1f} MB/s): {verdict} ({best:.1f} MB/s)")
        print(f"load after run: {os.getloadavg()[0]:.2f} (other processes on a shared machine lower both numbers)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
