"""Podman 5 for the tests' second lane: a Debian 13 (trixie) chroot, built once and cached (not used by the daemon).

Debian 12 ships podman 4.3.1, which looks layers up by blob digest; Podman 5.1 and later look
them up by TOC digest (additional-layer-store.md §3, §11). To test both on one Debian 12 host,
this module builds trixie's podman 5 into a chroot with debootstrap and runs it there:

    rootfs = ensure_rootfs()                 # built on first use (~1 min, ~420 MB), then reused
    with ChrootSession.open(rootfs) as chroot:
        pod_dir = chroot.make_dir("pod")     # a host path the chroot sees as /ci/pod-...
        env = podman_env(pod_dir, additional_layer_store=store_mountpoint, chroot=chroot.root)
        run_podman("pull", "--tls-verify=false", ref, env=env)   # runs `chroot ROOT podman ...`

The cache lives outside the clone (`/var/cache/stargz-store-ci/podman5`, or `$STARGZ_PODMAN5_CACHE`)
so every clone and CI run shares it. A lock file next to it serialises builds; a build that did
not finish (no `COMPLETE` marker, or a marker for another package list) is thrown away and redone.
Sessions hold the lock shared, so a rebuild never pulls a root from under a running session.

A session never mounts anything inside the cache itself: it bind-mounts the cached root at a
directory of its own under /tmp (so it is a mount point, made private: without that the chroot's
unpacker fails with "remount /, flags: 0x44000: invalid argument"), then mounts proc, /sys and
/dev (rbind, each made rslave so nothing propagates back to the host), and tmpfs on /run, /tmp,
/var/tmp and /var/lib/containers (podman 5 keeps its blob-info cache there: per session, never
shared). A host directory of the session is bind-mounted at `/ci`: podman's private storage and
configuration go there, and so must a store's FUSE mountpoint, because a mount made on the host
after the bind does not propagate into it (mount the store at `session.make_dir(...)`, i.e. at
a path inside the chroot tree). Two test runs therefore never share mounts or state, and closing
a session undoes its mounts deepest first.

The chroot shares the host's network namespace: registries on 127.0.0.1 are reachable as they
are (a TLS registry's CA goes to podman with `--cert-dir <a dir under /ci>`). Programs podman
runs that exist only on the host (the chroot has no Python: e.g. `stargz-store-helper`, named by
`additional-layer-store-auth-helper` in a private `CONTAINERS_REGISTRIES_CONF`) run through
`session.host_command(argv)`: `chroot /proc/<our pid>/root ARGV`, i.e. back in the host's root,
so the very program installed on the host runs, with the host's Python, unchanged; the cached
root stays as debootstrap made it.

Command line (as root): `python -m stargz_store.localenv.podman5 build` builds the cache if
missing, `... status` prints what is cached.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import LocalEnvError
from .procs import is_mounted, unmount_under

log = logging.getLogger(__name__)

SUITE = "trixie"
PACKAGES = ("podman", "crun", "runc", "conmon", "fuse-overlayfs", "ca-certificates", "iproute2", "netavark",
            "aardvark-dns", "passt", "catatonit", "uidmap")
# Directories the build adds so sessions can mount on them; bump LAYOUT when this changes.
MOUNT_DIRS = ("ci", "run", "tmp", "var/tmp", "var/lib/containers")
LAYOUT = 1
TMPFS_DIRS = ("run", "tmp", "var/tmp", "var/lib/containers")
INSIDE_WORKDIR = "/ci"

DEFAULT_CACHE = Path("/var/cache/stargz-store-ci/podman5")
CACHE_VAR = "STARGZ_PODMAN5_CACHE"
MIRROR_VAR = "STARGZ_PODMAN5_MIRROR"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT_S = 1800


class ChrootError(LocalEnvError):
    """The chroot could not be built or mounted; the message says which step and why."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VAR) or DEFAULT_CACHE)


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror: `$STARGZ_PODMAN5_MIRROR`, else the first non-security URI of apt's sources.

    Reads deb822 `sources.list.d/*.sources` first, then one-line `sources.list`/`*.list` entries;
    disabled files (any other suffix) are ignored, as apt ignores them.
    """
    if os.environ.get(MIRROR_VAR):
        return os.environ[MIRROR_VAR].rstrip("/")
    uris: list[str] = []
    sources_d = apt_dir / "sources.list.d"
    for path in sorted(sources_d.glob("*.sources")) if sources_d.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes").lower() != "no":
                uris.extend(fields.get("URIs", "").split())
    lists = [apt_dir / "sources.list", *(sorted(sources_d.glob("*.list")) if sources_d.is_dir() else [])]
    for path in lists:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
                if m:
                    uris.append(m.group(1))
    for uri in uris:
        if uri.startswith(("http://", "https://")) and "security" not in uri:
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def debootstrap_command(target: Path, mirror: str) -> list[str]:
    return ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(target), mirror]


def _wanted_marker() -> dict:
    return {"suite": SUITE, "packages": list(PACKAGES), "layout": LAYOUT}


def _read_marker(base: Path) -> dict | None:
    try:
        return json.loads((base / "COMPLETE").read_text())
    except (OSError, ValueError):
        return None


def _complete(base: Path) -> bool:
    marker = _read_marker(base)
    if marker is None or any(marker.get(k) != v for k, v in _wanted_marker().items()):
        return False
    return (base / "rootfs" / "usr" / "bin" / "podman").is_file()


def package_version(rootfs: Path, package: str) -> str:
    """The version dpkg recorded in the chroot (needs no /proc, so it works on a bare root)."""
    proc = subprocess.run(["chroot", str(rootfs), "dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ChrootError(f"{package} is not installed in {rootfs}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _build(base: Path) -> None:
    """debootstrap into `base/rootfs`, check podman 5 is there, then write the marker (last)."""
    rootfs = base / "rootfs"
    base.mkdir(parents=True, exist_ok=True)
    (base / "COMPLETE").unlink(missing_ok=True)
    if rootfs.exists():
        log.info("removing the incomplete chroot at %s", rootfs)
        unmount_under(rootfs)  # debootstrap mounts proc/sys inside its target; a killed build leaves them
        if any(is_mounted(rootfs / d) for d in ("proc", "sys", "dev", "dev/pts")):
            raise ChrootError(f"{rootfs} still has mounts inside; not deleting it")
        shutil.rmtree(rootfs)
    if shutil.which("debootstrap") is None:
        raise ChrootError("debootstrap is not installed: run `make deps`")
    mirror = debian_mirror()
    cmd = debootstrap_command(rootfs, mirror)
    log.info("building the Podman 5 chroot: %s", " ".join(cmd))
    start = time.monotonic()
    with open(base / "debootstrap.log", "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    unmount_under(rootfs)
    if proc.returncode != 0:
        tail = (base / "debootstrap.log").read_text(errors="replace")[-2000:]
        raise ChrootError(f"debootstrap failed ({proc.returncode}), log {base / 'debootstrap.log'}:\n{tail}")
    for d in MOUNT_DIRS:
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    versions = {p: package_version(rootfs, p) for p in ("podman", "runc", "conmon", "crun")}
    if not versions["podman"].startswith("5."):
        raise ChrootError(f"{SUITE} gave podman {versions['podman']}, not 5.x")
    marker = {**_wanted_marker(), "mirror": mirror, "versions": versions,
              "build_seconds": round(time.monotonic() - start, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime())}
    tmp = base / "COMPLETE.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    tmp.rename(base / "COMPLETE")
    log.info("Podman 5 chroot ready in %.0f s: %s", marker["build_seconds"], versions)


class RootfsLock:
    """`<cache>.lock`, flock'ed: exclusive while building, shared while a session uses the root."""

    def __init__(self, base: Path) -> None:
        base.parent.mkdir(parents=True, exist_ok=True)
        self.path = base.parent / f"{base.name}.lock"
        self._fd: int | None = None

    def acquire(self, exclusive: bool) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def ensure_rootfs(base: Path | None = None, lock: RootfsLock | None = None) -> Path:
    """The cached chroot's root directory, built first if missing or incomplete.

    With `lock`, returns holding it shared (the caller releases it when done with the root);
    without, the lock is released before returning.
    """
    base = base or cache_dir()
    own_lock = lock is None
    lock = lock or RootfsLock(base)
    try:
        lock.acquire(exclusive=False)
        if not _complete(base):
            lock.acquire(exclusive=True)  # flock converts; re-check: another run may have built it meanwhile
            if not _complete(base):
                _build(base)
            lock.acquire(exclusive=False)
    except BaseException:
        lock.release()
        raise
    if own_lock:
        lock.release()
    return base / "rootfs"


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ChrootError(f"mount {' '.join(args)} failed: {proc.stderr.strip()}")


@dataclass
class ChrootSession:
    """One run's mounted view of the cached root: `root` is where to chroot, `workdir` is `/ci` inside.

    Use `ChrootSession.open(rootfs)` (a context manager); `make_dir(prefix)` makes a fresh directory
    both the host and the chroot see (`podman.seen_path(path, session.root)` names it inside).
    """

    base: Path
    rootfs: Path
    lock: RootfsLock | None = None

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def workdir(self) -> Path:
        """The host side of the chroot's `/ci` (the session's own directory, on disk)."""
        return self.root / INSIDE_WORKDIR.lstrip("/")

    @classmethod
    @contextmanager
    def open(cls, rootfs: Path | None = None, lock: RootfsLock | None = None) -> Iterator["ChrootSession"]:
        """Build the cache if needed, mount a private view of it, yield it, undo the mounts."""
        if rootfs is None:
            lock = lock or RootfsLock(cache_dir())
            rootfs = ensure_rootfs(lock=lock)
        session = cls(base=Path(tempfile.mkdtemp(prefix="stargz-podman5-", dir="/tmp")), rootfs=rootfs, lock=lock)
        try:
            session._mount_all()
            yield session
        finally:
            session.close()

    def _mount_all(self) -> None:
        root = self.root
        root.mkdir()
        (self.base / "work").mkdir()
        steps: list[tuple[Path, list[list[str]]]] = [
            (root, [["--bind", str(self.rootfs), str(root)], ["--make-private", str(root)]]),
            (root / "proc", [["-t", "proc", "proc", str(root / "proc")]]),
            (root / "sys", [["--rbind", "/sys", str(root / "sys")], ["--make-rslave", str(root / "sys")]]),
            (root / "dev", [["--rbind", "/dev", str(root / "dev")], ["--make-rslave", str(root / "dev")]]),
            *((root / d, [["-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root / d)]]) for d in TMPFS_DIRS),
            (self.workdir, [["--bind", str(self.base / "work"), str(self.workdir)],
                            ["--make-private", str(self.workdir)]]),
        ]
        for target, commands in steps:
            if not target.is_dir():
                raise ChrootError(f"{target} is missing in the cached root; rebuild it (delete {self.rootfs.parent})")
            for args in commands:
                _mount(*args)
        os.chmod(root / "tmp", 0o1777)
        os.chmod(root / "var/tmp", 0o1777)
        log.debug("Podman 5 chroot mounted at %s", root)

    def host_command(self, argv: list[str]) -> list[str]:
        """A command line that, run inside the chroot (as root, as podman runs its helpers), runs
        `argv` in the host's root: `/proc/<pid>/root` of this process is the host's `/`. Valid as
        long as this process lives (the session's lifetime)."""
        return ["chroot", f"/proc/{os.getpid()}/root", *argv]

    def make_dir(self, prefix: str) -> Path:
        """A new directory under `/ci` (host path returned), short enough for podman's socket paths."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.workdir))

    def close(self) -> None:
        """Undo every mount of this session, deepest first; delete its files, never the cached root."""
        unmount_under(self.base)
        if is_mounted(self.root):
            log.warning("%s is still mounted; leaving %s in place", self.root, self.base)
        else:
            shutil.rmtree(self.base / "work", ignore_errors=True)
            try:
                self.root.rmdir()  # empty once unmounted; rmdir never follows into the cached root
                self.base.rmdir()
            except OSError as exc:
                log.warning("could not remove %s: %s", self.base, exc)
        if self.lock is not None:
            self.lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stargz_store.localenv.podman5", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("build", "status"),
                        help="build: make the cached chroot if missing or incomplete; status: print its marker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = cache_dir()
    if args.command == "build":
        start = time.monotonic()
        try:
            rootfs = ensure_rootfs(base)
        except ChrootError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{rootfs} ready ({time.monotonic() - start:.1f} s)")
    marker = _read_marker(base)
    print(json.dumps(marker, indent=1) if marker else f"no complete chroot at {base}")
    return 0 if marker else 1


if __name__ == "__main__":
    sys.exit(main())
