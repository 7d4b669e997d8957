"""Process, port and mount helpers shared by the local environment (demos, benchmarks and tests).

Kept apart from the daemon's own code: these poll /proc/mounts and HTTP endpoints from outside,
the way a caller of the daemon sees it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

PreexecFn = Callable[[], None]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after; races are unlikely locally)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mount_points() -> list[str]:
    """Mount points of /proc/mounts with their octal escapes (`\\040` for a space) decoded."""
    with open("/proc/mounts", "rb") as f:
        return [fields[1].decode("unicode_escape", errors="replace")
                for fields in (line.split() for line in f) if len(fields) > 1]


def is_mounted(path: Path | str) -> bool:
    """True when `path` is a mount point listed in /proc/mounts."""
    return os.path.realpath(path) in _mount_points()


def lazy_unmount(path: Path | str) -> None:
    """`umount -l`: detaches even a dead FUSE mount (ENOTCONN) so the directory can be reused or removed."""
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def unmount_under(*roots: Path | str) -> None:
    """Lazily unmount everything below the given directories, deepest first."""
    prefixes = [os.path.realpath(root).rstrip("/") + "/" for root in roots]
    for mnt in sorted((m for m in _mount_points() if any(m.startswith(p) for p in prefixes)), reverse=True):
        lazy_unmount(mnt)


def terminate(proc: subprocess.Popen | None, timeout: float = 10.0, signum: int | None = None) -> int | None:
    """Ask a child to exit (SIGTERM unless `signum`), SIGKILL it after `timeout`; returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        if signum is None:
            proc.terminate()
        else:
            proc.send_signal(signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, poll: float = 0.05) -> bool:
    """Poll `url` until it answers at all (any HTTP status counts); False on timeout.

    Raises nothing itself: returns False early when `proc` has exited, so the caller can report
    the process's log rather than a connection error.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=min(2.0, timeout)).close()
            return True
        except urllib.error.HTTPError:
            return True  # it answers (e.g. 401 when auth is on): it is up
        except OSError:
            if proc.poll() is not None:
                return False
            time.sleep(poll)
    return False


def log_tail(path: Path, size: int = 3000) -> str:
    """The end of a log file, or a placeholder when the process never wrote one."""
    try:
        return path.read_text(errors="replace")[-size:]
    except FileNotFoundError:
        return "(no log)"
