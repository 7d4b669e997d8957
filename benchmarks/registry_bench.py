"""Registry client benchmark: ranged-read throughput and per-request overhead over loopback.

Prints (1) the throughput of 8 threads reading random 1 MiB ranges of a 200 MiB blob from a local
docker-registry through one shared RegistryClient (target >= 400 MB/s), and (2) the mean added
latency of one ranged read versus `curl` fetching the same range (curl's own `time_total`, so its
process start-up is not counted; target <= 1 ms).

Run: `.venv/bin/python -m benchmarks.registry_bench [--size-mib 200] [--reads 400]`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stargz_store.registry import RegistryClient, RegistryConfig, parse_reference

MIB = 1 << 20


def _make_blob(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return "sha256:" + digest.hexdigest()


def _throughput(client: RegistryClient, ref, digest: str, size: int, reads: int, threads: int) -> float:
    rng = random.Random(42)
    offsets = [rng.randrange(0, size // MIB) * MIB for _ in range(reads)]

    def read(offset: int) -> int:
        return len(client.read_blob_range(ref, digest, offset, MIB))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, offsets[:threads]))  # warm the pool's connections
        start = time.perf_counter()
        total = sum(pool.map(read, offsets))
        elapsed = time.perf_counter() - start
    return total / elapsed / 1e6


def _latency(client: RegistryClient, ref, digest: str, url: str, length: int, rounds: int) -> tuple[float, float]:
    ours, curls = [], []
    curl = shutil.which("curl")
    for i in range(rounds):
        offset = (i * 7919 * 4096) % (100 * MIB)
        start = time.perf_counter()
        client.read_blob_range(ref, digest, offset, length)
        ours.append(time.perf_counter() - start)
        if curl:
            out = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{time_total}",
                                  "-H", f"Range: bytes={offset}-{offset + length - 1}", url],
                                 capture_output=True, text=True, check=True).stdout
            curls.append(float(out))
    return statistics.mean(ours) * 1e3, (statistics.mean(curls) * 1e3 if curls else float("nan"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--reads", type=int, default=400, help="1 MiB reads in the throughput run")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=50, help="latency samples per range size")
    args = parser.parse_args(argv)

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from stargz_store.localenv.registry import LocalRegistry as Registry  # the same real registry the tests use

    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        registry = Registry(Path(tmp) / "registry")
        registry.start()
        try:
            size = args.size_mib * MIB
            blob = Path(tmp) / "blob"
            digest = _make_blob(blob, size)
            ref = parse_reference(f"{registry.host}/bench/blob:latest")
            with RegistryClient(RegistryConfig(pool_size=max(32, args.threads))) as client:
                client.push_blob(ref, digest, blob)
                blob.unlink()
                mbps = _throughput(client, ref, digest, size, args.reads, args.threads)
                print(f"registry: {args.threads} threads x 1 MiB ranges of a {args.size_mib} MiB blob: "
                      f"{mbps:.0f} MB/s (target >= 400)")
                url = f"{registry.url}/v2/{ref.repository}/blobs/{digest}"
                for length in (4096, MIB):
                    ours, curl = _latency(client, ref, digest, url, length, args.rounds)
                    print(f"registry: one {length // 1024} KiB ranged read: client {ours:.2f} ms, curl {curl:.2f} ms, "
                          f"added {ours - curl:+.2f} ms (target <= 1)")
        finally:
            registry.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
