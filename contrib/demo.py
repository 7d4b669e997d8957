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
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


@dataclass
class Registry:
    workdir: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "access.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True)
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.workdir / 'data'}\n"
            f"http:\n  addr: {self.host}\n")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None:
                    raise DemoError(f"docker-registry exited:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.1)
        raise DemoError("docker-registry did not answer within 15 s")

    def log_offset(self) -> int:
        return self.log.stat().st_size

    def blob_bytes_since(self, offset: int) -> int:
        """Bytes of layer and config blobs the registry sent since `offset` in its access log."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return sum(int(m.group(2)) for m in _BLOB_GET.finditer(text) if m.group(1) in ("200", "206"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Podman:
    """A podman with its own configuration and storage under `workdir` (never the machine's)."""

    def __init__(self, workdir: Path, additional_layer_store: Path | None = None) -> None:
        workdir.mkdir(parents=True)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = 1048576 if hard == resource.RLIM_INFINITY else hard
        (workdir / "containers.conf").write_text(
            f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=1000:1000"]\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        storage = f'[storage]\ndriver = "overlay"\ngraphroot = "{workdir / "graph"}"\nrunroot = "{workdir / "run"}"\n'
        if additional_layer_store is not None:
            storage += f'[storage.options]\nadditionallayerstores = ["{additional_layer_store}:ref"]\n'
        (workdir / "storage.conf").write_text(storage)
        (workdir / "auth.json").write_text('{"auths": {}}\n')
        (workdir / "tmp").mkdir()
        self.workdir = workdir
        self.env = {**os.environ, "CONTAINERS_CONF": str(workdir / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
                    "REGISTRY_AUTH_FILE": str(workdir / "auth.json"), "TMPDIR": str(workdir / "tmp")}

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
        for args in (("rm", "-af"), ("rmi", "-af")):
            subprocess.run(["podman", *args], env=self.env, capture_output=True, timeout=120)
        prefix = str(self.workdir) + "/"
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for mnt in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


class Store:
    """The stargz-store daemon, mounted at `mountpoint` for the duration of the demo."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mountpoint = workdir / "mnt"
        self.proc: subprocess.Popen | None = None

    def start(self, config: str) -> None:
        self.workdir.mkdir(parents=True)
        (self.workdir / "config.toml").write_text(config)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.workdir / "store.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stargz_store.cli", "--root", str(self.workdir / "root"),
                 "--config", str(self.workdir / "config.toml"), "--log-level", "info", str(self.mountpoint)],
                stdout=log, stderr=log, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"stargz-store exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.mountpoint.exists() and is_mounted(self.mountpoint):
                return
            time.sleep(0.1)
        raise DemoError(f"stargz-store did not mount within 30 s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.workdir / "store.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


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
    registry = Registry(tmp / "registry", free_port())
    store = Store(tmp / "store")
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

        step(f"mounting stargz-store at {store.mountpoint}")
        store.start("" if args.background_fetch else "no_background_fetch = true\n")

        step("lazy: podman run of the eStargz image through the store")
        lazy = Podman(tmp / "podman-lazy", additional_layer_store=store.mountpoint)
        mark = registry.log_offset()
        lazy_time, lazy_line = lazy.time_to_first_line(esgz_ref)
        lazy_bytes = registry.blob_bytes_since(mark)
        links = [p for p in (lazy.workdir / "graph" / "overlay").glob("*/diff") if p.is_symlink()]
        print(f"    container said: {lazy_line}")
        if not links:
            raise DemoError(f"podman did not take the layer from the store (it pulled normally):\n{store.log_tail()}")

        step("full: podman run of the gzip image, no store")
        full = Podman(tmp / "podman-full")
        mark = registry.log_offset()
        full_time, full_line = full.time_to_first_line(gzip_ref)
        full_bytes = registry.blob_bytes_since(mark)
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
    except DemoError as e:
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
        store.stop()
        registry.stop()
        if args.keep:
            print(f"    kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_mounted(store.mountpoint):
            print(f"warning: {store.mountpoint} is still mounted", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
