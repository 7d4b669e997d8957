#!/usr/bin/env python3
"""`make demo`: a lazy `podman run` through stargz-store next to a normal full pull of the same image.

What it does, all on 127.0.0.1 and under one temporary directory:

1. starts a local `docker-registry` (plain HTTP) with its access log on;
2. builds a demo image with `podman import` (busybox, a small app, 3 x 20 MiB of random data the app
   never reads) and pushes it as an ordinary gzip image;
3. converts it with `stargz-store convert` into an eStargz image in the same registry;
4. mounts `stargz-store` and runs the eStargz image with a podman whose storage.conf names the store
   in `additionallayerstores`; then runs the gzip image with a podman that has no store;
5. prints, for both, the time from `podman run` to the app's first line and the bytes podman and the
   store fetched from the registry until then (from the registry's access log);
6. cleans up everything (containers, images, mount, registry, files), also on failure or Ctrl-C.

Needs root (FUSE mount, rootful podman). Podman's own storage is private to the demo: nothing of
the machine's images or configuration is touched.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: the local environment comes from here
    sys.path.insert(0, str(REPO_ROOT))

from stargz_store.localenv import LocalEnvError, LocalRegistry, StoreProcess, podman_cleanup, podman_env  # noqa: E402
from stargz_store.localenv.procs import is_mounted  # noqa: E402

APP_LINE = "hello from the demo app: started before its image was downloaded"
FILLER_FILES = 3
FILLER_SIZE = 20 << 20
_BLOB_GET = re.compile(r'"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" (\d{3}) (\d+)')


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600, input_: bytes | None = None) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, input=input_)
    if proc.returncode != 0:
        raise DemoError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc.stdout.decode(errors="replace")


def blob_bytes_since(registry: LocalRegistry, mark: int) -> int:
    """Bytes of layer and config blobs the registry sent since `mark` in its access log."""
    return sum(int(m.group(2)) for m in _BLOB_GET.finditer(registry.log_since(mark)) if m.group(1) in ("200", "206"))


class Podman:
    """A podman with its own configuration and storage under `workdir` (never the machine's)."""

    def __init__(self, workdir: Path, additional_layer_store: Path | None = None) -> None:
        self.workdir = workdir
        self.env = podman_env(workdir, additional_layer_store)

    def __call__(self, *args: str, input_: bytes | None = None) -> str:
        return run(["podman", *args], env=self.env, input_=input_)

    def time_to_first_line(self, ref: str) -> tuple[float, str]:
        """`podman run` of an image not pulled yet: seconds until the first line of output, and that line."""
        start = time.monotonic()
        proc = subprocess.Popen(["podman", "run", "--rm", "--net=none", "--tls-verify=false", ref],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        first = proc.stdout.readline().decode(errors="replace").rstrip("\n")
        elapsed = time.monotonic() - start
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise DemoError(f"podman run {ref} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
        return elapsed, first

    def cleanup(self) -> None:
        podman_cleanup(self.env, timeout=120)


def demo_store(workdir: Path, config: str) -> StoreProcess:
    """The stargz-store daemon for the demo, its config written, not started yet."""
    workdir.mkdir(parents=True)
    (workdir / "config.toml").write_text(config)
    return StoreProcess(root=workdir / "root", mountpoint=workdir / "mnt", config_path=workdir / "config.toml",
                        log_path=workdir / "store.log", log_level="info")


def demo_rootfs_tar() -> bytes:
    """busybox, the app, and filler the app never reads (random, so compression cannot hide it)."""
    buf = io.BytesIO()
    now = int(time.time())

    def add(name: str, data: bytes | None = None, mode: int = 0o644, kind: bytes = tarfile.REGTYPE,
            link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, now, link
        info.size = len(data) if data is not None else 0
        tf.addfile(info, io.BytesIO(data) if data is not None else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "app", "data", "etc", "tmp"):
            add(d, kind=tarfile.DIRTYPE, mode=0o755)
        add("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
        for applet in ("sh", "echo", "cat", "ls"):
            add(f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
        add("app/run.sh", f'#!/bin/sh\necho "{APP_LINE}"\nls /data\n'.encode(), mode=0o755)
        for i in range(FILLER_FILES):
            add(f"data/filler-{i}.bin", os.urandom(FILLER_SIZE))
    return buf.getvalue()


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) after the demo")
    parser.add_argument("--background-fetch", action="store_true",
                        help="let the store fetch the rest of each layer in the background (off in the demo, "
                             "so the bytes shown are those the container needed)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo needs root (FUSE mount and rootful podman)", file=sys.stderr)
        return 2
    for tool in ("podman", "runc", "docker-registry", "busybox"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run `make deps` first", file=sys.stderr)
            return 2

    # SIGTERM/SIGHUP take the same way out as Ctrl-C, so `finally` cleans up.
    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    tmp = Path(tempfile.mkdtemp(prefix="stargz-demo."))
    registry = LocalRegistry(tmp / "registry", log_level="warn")
    store: StoreProcess | None = None
    builder = lazy = full = None
    try:
        step(f"starting a local registry at {registry.host}")
        registry.start()

        step(f"building the demo image: busybox, an app, {FILLER_FILES} x {mib(FILLER_SIZE)} it never reads")
        builder = Podman(tmp / "podman-build")
        builder("import", "-q", "--change", 'CMD ["/bin/sh", "/app/run.sh"]', "-", "localhost/stargz-demo:src",
                input_=demo_rootfs_tar())
        gzip_ref = f"{registry.host}/stargz-demo:gzip"
        esgz_ref = f"{registry.host}/stargz-demo:esgz"
        builder("push", "-q", "--tls-verify=false", "localhost/stargz-demo:src", f"docker://{gzip_ref}")

        step(f"converting it to eStargz: stargz-store convert docker://{gzip_ref} docker://{esgz_ref}")
        t0 = time.monotonic()
        run([sys.executable, "-m", "stargz_store.cli", "convert", f"docker://{gzip_ref}", f"docker://{esgz_ref}"],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        step(f"converted in {time.monotonic() - t0:.1f} s")

        store = demo_store(tmp / "store", "" if args.background_fetch else "no_background_fetch = true\n")
        step(f"mounting stargz-store at {store.mountpoint}")
        store.start()

        step("lazy: podman run of the eStargz image through the store")
        lazy = Podman(tmp / "podman-lazy", additional_layer_store=store.mountpoint)
        mark = registry.log_mark()
        lazy_time, lazy_line = lazy.time_to_first_line(esgz_ref)
        lazy_bytes = blob_bytes_since(registry, mark)
        links = [p for p in (lazy.workdir / "graph" / "overlay").glob("*/diff") if p.is_symlink()]
        print(f"    container said: {lazy_line}")
        if not links:
            raise DemoError(f"podman did not take the layer from the store (it pulled normally):\n{store.log_tail()}")

        step("full: podman run of the gzip image, no store")
        full = Podman(tmp / "podman-full")
        mark = registry.log_mark()
        full_time, full_line = full.time_to_first_line(gzip_ref)
        full_bytes = blob_bytes_since(registry, mark)
        print(f"    container said: {full_line}")

        image_size = full_bytes
        print()
        print(f"{'':28}{'time to first output':>22}{'fetched from registry':>24}")
        print(f"{'lazy (eStargz + store)':28}{lazy_time:>20.2f} s{mib(lazy_bytes):>24}"
              f"  ({100 * lazy_bytes / max(image_size, 1):.0f}% of the image)")
        print(f"{'full pull (gzip, no store)':28}{full_time:>20.2f} s{mib(full_bytes):>24}")
        print()
        print("The lazy container started after fetching only what it read; the rest stays in the registry"
              + (" until the store's background fetch brings it in." if args.background_fetch else "."))
        print("The registry here is on this machine, so even the full download is quick; over a real network the")
        print("full pull's time grows with the image while the lazy start depends only on what the app reads.")
        return 0
    except (DemoError, LocalEnvError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    finally:
        step("cleaning up")
        for p in (lazy, full, builder):
            if p is not None:
                p.cleanup()  # the lazy podman's rmi reaches the store while it is still mounted
        if store is not None:
            store.stop(unmount_leftover=True)
        registry.stop()
        if args.keep:
            print(f"    kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if store is not None and is_mounted(store.mountpoint):
            print(f"warning: {store.mountpoint} is still mounted", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
