"""Our stargz-store daemon as the benchmark runs it: fresh root per run, CPU time and peak RSS read from /proc."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import leftovers

REPO_ROOT = Path(__file__).resolve().parents[2]
STORE_MODULE = "stargz_store.cli"


class StoreError(RuntimeError):
    """The daemon did not come up or died."""


@dataclass(frozen=True)
class ProcessUsage:
    cpu_seconds: float
    peak_rss_bytes: int


def process_usage(pid: int) -> ProcessUsage:
    """User+system CPU of the process (all its threads) and its peak resident set (VmHWM)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return ProcessUsage(cpu, hwm)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts", "rb") as f:
        return any(len(fields) > 1 and fields[1].decode("unicode_escape", "replace") == target
                   for fields in (line.split() for line in f))


def store_config(registry_host: str, noprefetch: bool) -> str:
    """config.toml: plain HTTP to the benchmark registry; prefetch off for the unoptimized mode (as the Go benchmark)."""
    return (f"noprefetch = {'true' if noprefetch else 'false'}\n"
            f'[resolver.host."{registry_host}"]\ninsecure = true\n')


class Store:
    """One daemon at a time on `base`/mnt with root `base`/root; `restart()` gives a cold store."""

    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.mountpoint = base / "mnt"
        self.config_path = base / "config.toml"
        self.log_path = base / "store.log"
        self.proc: subprocess.Popen | None = None

    def start(self, config_text: str, timeout: float = 60.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.config_path.write_text(config_text)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", STORE_MODULE, "--root", str(self.root), "--config", str(self.config_path),
                 "--log-level", "info", str(self.mountpoint)],
                stdout=log, stderr=log, cwd=REPO_ROOT, env=env, preexec_fn=leftovers.die_with_parent())
        leftovers.record_pid(self.proc.pid, str(self.mountpoint))  # our mountpoint: never a test's daemon
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StoreError(f"stargz-store exited with {self.proc.returncode}: {self.log_tail()}")
            if is_mounted(self.mountpoint):
                try:
                    os.stat(self.mountpoint)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise StoreError(f"stargz-store did not mount within {timeout} s: {self.log_tail()}")

    def usage(self) -> ProcessUsage:
        if self.proc is None or self.proc.poll() is not None:
            raise StoreError(f"stargz-store is not running: {self.log_tail()}")
        return process_usage(self.proc.pid)

    def stats(self, timeout: float = 5.0) -> dict | None:
        """The daemon's own counters (SIGUSR1 -> root/stats.json), or None if it does not answer."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        path = self.root / "stats.json"
        path.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 5
        while is_mounted(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)

    def wipe(self) -> None:
        """Stop and forget everything the store cached: the next start is cold."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return "(no log)"
