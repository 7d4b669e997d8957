"""Processes, mounts and namespaces a benchmark run owns, so a crashed run can be swept by the next one.

Every long-lived process the benchmark starts is written to a pid file together
with a token from its command line; a sweep kills a recorded pid only if its
command line still holds that token (pids are reused). Mounts are recognised by
their path under the benchmark's run directory, never by name alone.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/stargz-bench")
PID_FILE = STATE_DIR / "pids"


def record_pid(pid: int, token: str) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(PID_FILE, "a") as f:
        f.write(f"{pid} {token}\n")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_recorded(pid: int, token: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, a pid only while its command line still contains `token`."""
    if token not in _cmdline(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if token not in _cmdline(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def sweep_processes() -> None:
    if not PID_FILE.exists():
        return
    for line in PID_FILE.read_text().splitlines():
        pid_text, _, token = line.partition(" ")
        if pid_text.isdigit() and token:
            kill_recorded(int(pid_text), token)
    PID_FILE.unlink(missing_ok=True)


def mounts_under(root: Path) -> list[Path]:
    """Mount points below `root`, deepest first (so they can be unmounted in order)."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point.startswith(prefix) or mount_point == prefix.rstrip("/"):
            found.append(Path(mount_point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all_under(root: Path) -> None:
    for mount_point in mounts_under(root):
        result = subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, text=True)
        if result.returncode:
            log.warning("could not unmount %s: %s", mount_point, result.stderr.strip())


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: preexec_fn must not dlopen
PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM):
    """A `preexec_fn` making the child get `signum` when the benchmark dies, even by SIGKILL."""

    def set_death_signal() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signum)

    return set_death_signal


class BenchmarkBusy(RuntimeError):
    """Another startup benchmark (or a link test) holds the namespace, the pid file and the run directory."""


LOCK_FILE = STATE_DIR / "lock"


class exclusive:
    """Hold the benchmark lock: one user of the namespace and pid file at a time, or the sweep of
    one would tear down the other's link and processes. Released when the holder exits, even by SIGKILL."""

    def __enter__(self) -> "exclusive":
        import fcntl

        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BenchmarkBusy(f"another startup benchmark is running (lock {LOCK_FILE} is held)") from None
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
