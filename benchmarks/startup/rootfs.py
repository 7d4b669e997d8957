"""Building a root filesystem from Debian packages, and running things inside it.

Packages are resolved by apt against an empty dpkg status (so the closure is
complete and independent of what this host has installed), fetched with
`apt-get download` into a cache and unpacked with `dpkg-deb -x`: no maintainer
scripts run, so the few things they would have done that the workloads need
(byte-compiling Python, alternatives symlinks) are done by the recipes.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NICE = ["nice", "-n", "19"]
_INST_RE = re.compile(r"^Inst (\S+) \((\S+) [^\[]*\[([^\]]+)\]\)")


class BuildError(RuntimeError):
    """An image could not be built (package resolution, download, unpacking or a build command failed)."""


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str
    arch: str

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


_lists_updated = False


def resolve(names: list[str]) -> list[Package]:
    """The full dependency closure of `names` (no recommends), as apt would install it on an empty system.

    A fresh machine may have no package lists yet: then `apt-get update` runs once and apt is asked again.
    """
    global _lists_updated
    if not names:
        return []
    cmd = ["apt-get", "-s", "-qq", "-o", "Dir::State::status=/dev/null", "-o", "APT::Install-Recommends=false",
           "install", *names]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode and not _lists_updated:
        _lists_updated = True
        log.warning("apt cannot resolve %s; running apt-get update once", " ".join(names))
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise BuildError(f"apt cannot resolve {' '.join(names)}: {result.stderr.strip()[-1500:]}"
                         " (run `apt-get update` if the package lists are missing)")
    packages = []
    for line in result.stdout.splitlines():
        m = _INST_RE.match(line)
        if m:
            packages.append(Package(m.group(1), m.group(2), m.group(3)))
    if not packages:
        raise BuildError(f"apt resolved nothing for {' '.join(names)}")
    return sorted(packages)


def download(packages: list[Package], deb_dir: Path) -> list[Path]:
    """The .deb files of `packages`, fetched into `deb_dir` unless already there."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (deb_dir / p.deb_name).exists()]
    if missing:
        log.info("downloading %d Debian packages", len(missing))
        result = subprocess.run(
            ["apt-get", "download", "-qq", *(f"{p.name}={p.version}" for p in missing)],
            cwd=deb_dir, capture_output=True, text=True,
        )
        still = [p for p in missing if not (deb_dir / p.deb_name).exists()]
        if result.returncode or still:
            raise BuildError(f"apt-get download failed for {', '.join(p.name for p in still) or '?'}: "
                             f"{result.stderr.strip()[-1500:]}")
    return [deb_dir / p.deb_name for p in packages]


def unpack(debs: list[Path], root: Path) -> None:
    for deb in debs:
        result = subprocess.run([*NICE, "dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if result.returncode:
            raise BuildError(f"dpkg-deb -x {deb.name}: {result.stderr.strip()}")


def chroot_command(root: Path, argv: list[str], strace_out: Path | None = None) -> list[str]:
    """A command that runs `argv` chrooted in `root` with /dev and /proc, in private mount and network
    namespaces.

    The namespaces die with the command, taking its mounts along, so nothing can be left mounted
    inside the build tree. The network namespace has only a loopback interface, as a container
    started with `--network=none`: a workload's server listens there, never on the host.
    With `strace_out`, every open/exec of the chrooted process tree is traced.
    """
    script = ('ip link set lo up && mount --rbind /dev "$1/dev" && mount -t proc proc "$1/proc" '
              '&& shift && exec "$@"')
    tracer: list[str] = []
    if strace_out is not None:
        tracer = ["strace", "-f", "-qq", "-y", "-s", "4096", "-e", "signal=none",
                  "-e", "trace=chroot,open,openat,openat2,execve,execveat", "-o", str(strace_out)]
    return ["unshare", "--mount", "--net", "--propagation", "private", "--fork", "sh", "-c", script, "sh", str(root),
            *tracer, "chroot", str(root), *argv]


def chroot_run(root: Path, argv: list[str], env: dict[str, str], *, strace_out: Path | None = None,
               nice: bool = True, timeout: float = 3600, check: bool = True) -> subprocess.CompletedProcess:
    for sub in ("dev", "proc", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    cmd = chroot_command(root, argv, strace_out)
    result = subprocess.run([*NICE, *cmd] if nice else cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise BuildError(f"{' '.join(argv)} in {root} failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path under `root` (relative, no leading slash) with what tells a changed entry apart."""
    state: dict[str, tuple[int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            state[os.path.relpath(full, root)] = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
    return state


def changed_paths(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Paths new or modified since `before`, with their parent directories, sorted (tar order)."""
    changed = {path for path, ident in after.items() if before.get(path) != ident}
    for path in list(changed):
        parent = os.path.dirname(path)
        while parent and parent not in changed:
            changed.add(parent)
            parent = os.path.dirname(parent)
    return sorted(changed)


def resolve_in_root(root: Path, path: str, max_links: int = 40) -> list[str]:
    """The image paths `path` leads to inside `root`: every symlink followed on the way, then the target.

    A prioritized symlink is no use without its target, and the target is what the
    workload really reads, so both go into the record. Paths are relative, no leading slash.
    """
    visited: list[str] = []
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = "/".join([*current, part])
        full = root / candidate
        if full.is_symlink():
            links += 1
            if links > max_links:
                break
            visited.append(candidate)
            target = os.readlink(full)
            new_parts = [p for p in target.split("/") if p not in ("", ".")]
            if target.startswith("/"):
                current = []
            parts = new_parts + parts
            continue
        current.append(part)
    final = "/".join(current)
    if final and (root / final).exists():
        visited.append(final)
    return visited


def elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of an ELF executable: the kernel opens it without a traced syscall."""
    import struct

    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
                return None
            phoff = struct.unpack_from("<Q", header, 32)[0]
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
                if p_type == 3:
                    f.seek(p_offset)
                    return f.read(p_filesz).rstrip(b"\0").decode()
    except OSError:
        return None
    return None
