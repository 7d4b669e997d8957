"""The stargz-store daemon as a child process, for demos, benchmarks and tests (not used by the daemon).

    store = StoreProcess(root=d / "root", mountpoint=d / "mnt", config_path=d / "config.toml",
                         log_path=d / "store.log")
    store.start()            # returns once the FUSE mount answers
    store.layer_dir(ref, digest) / "diff"
    store.stats()            # the daemon's counters (SIGUSR1 -> <root>/stats.json)
    store.stop()             # SIGTERM, waits for the exit and the unmount

Readiness is the mount in /proc/mounts *and* a listing that works: a dead mount left by a
crashed run answers ENOTCONN until the new daemon has replaced it.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import stargz_store

from .errors import LocalEnvError
from .procs import PreexecFn, is_mounted, lazy_unmount, log_tail, terminate

log = logging.getLogger(__name__)

# The directory holding the `stargz_store` package: the child imports this very code.
PACKAGE_PARENT = Path(stargz_store.__file__).resolve().parents[1]
STORE_MODULE = "stargz_store.cli"


class StoreError(LocalEnvError):
    """The daemon exited, did not mount in time, or did not answer a stats request."""


def ref_dir_name(ref: str) -> str:
    """The ALS directory name of an image reference (standard base64 with padding)."""
    return base64.b64encode(ref.encode()).decode()


@dataclass
class StoreProcess:
    """One stargz-store process on `root`, mounted at `mountpoint`; its stdout and stderr go to `log_path`."""

    root: Path
    mountpoint: Path
    config_path: Path
    log_path: Path
    log_level: str = "debug"
    extra_args: list[str] = field(default_factory=list)
    preexec_fn: PreexecFn | None = None
    proc: subprocess.Popen | None = None
    package_parent: Path = PACKAGE_PARENT  # the checkout whose `stargz_store` the child runs


    def command(self) -> list[str]:
        return [
            sys.executable, "-m", STORE_MODULE,
            "--root", str(self.root),
            "--config", str(self.config_path),
            "--log-level", self.log_level,
            *self.extra_args,
            str(self.mountpoint),
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon and return once the mount is live; kill it and raise with the log tail otherwise."""
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # a dead mount left by a crash (ENOTCONN): the daemon cleans it up
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # what the daemon makes it anyway
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.package_parent) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=logf, cwd=str(self.package_parent), env=env,
                                         preexec_fn=self.preexec_fn)
        self._spawned()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StoreError(f"stargz-store exited with {self.proc.returncode}:\n{self.log_tail()}")
            if is_mounted(self.mountpoint):
                try:
                    os.listdir(self.mountpoint)
                    log.debug("stargz-store mounted at %s (pid %d)", self.mountpoint, self.proc.pid)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise StoreError(f"stargz-store did not mount within {timeout} s:\n{self.log_tail()}")

    def _spawned(self) -> None:
        """Hook right after the process exists (before it mounts): a subclass may record its pid."""

    def stop(self, timeout: float = 20.0, unmount_leftover: bool = False, mount_stays: bool = False) -> int | None:
        """SIGTERM, wait for the exit and the unmount; returns the exit code (None if it was not running).

        With `unmount_leftover` a mount still there afterwards is lazily unmounted; tests leave it
        off so they can see what the daemon itself left behind. `mount_stays`: the daemon handed
        its mount to another one (`--takeover`): do not wait for an unmount.
        """
        if self.proc is None:
            return None
        rc = terminate(self.proc, timeout, signal.SIGTERM)
        deadline = time.monotonic() + (0 if mount_stays else 5)
        while is_mounted(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        if unmount_leftover and is_mounted(self.mountpoint):
            lazy_unmount(self.mountpoint)
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL the holder (a crash of the whole store: the mount stays behind, dead) and wait
        until its serving process, which dies with it, is gone too."""
        if self.proc is not None and self.proc.poll() is None:
            server = self.server_state(timeout=0).get("server_pid")
            self.proc.kill()
            self.proc.wait()
            if server:
                _wait_gone(int(server))

    def server_state(self, timeout: float = 30.0) -> dict:
        """`<root>/server.json` (holder and server pids, version, generation, restarts, crashes),
        waiting up to `timeout` for it to exist (it is written once the first server serves)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return json.loads((self.root / "server.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                if time.monotonic() >= deadline:
                    return {}
                time.sleep(0.02)

    def server_pid(self) -> int:
        pid = self.server_state().get("server_pid")
        if not pid:
            raise StoreError(f"no serving process recorded in {self.root / 'server.json'}:\n{self.log_tail()}")
        return int(pid)

    def kill_server(self) -> int:
        """SIGKILL the serving process (a crash; the holder keeps the mount and starts another);
        returns the killed pid."""
        pid = self.server_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_generation(self, above: int, timeout: float = 120.0) -> dict:
        """Wait until a server of a generation above `above` serves; returns `server_state()`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.server_state(timeout=0)
            if int(state.get("generation", 0)) > above:
                return state
            if self.proc is None or self.proc.poll() is not None:
                raise StoreError(f"stargz-store exited:\n{self.log_tail()}")
            time.sleep(0.02)
        raise StoreError(f"no new serving process within {timeout} s:\n{self.log_tail()}")

    def wait_standby(self, timeout: float = 120.0) -> dict:
        """Wait until the spare serving process is ready to take over at a crash."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.server_state(timeout=0)
            if state.get("standby"):
                return state
            time.sleep(0.02)
        raise StoreError(f"no spare serving process within {timeout} s:\n{self.log_tail()}")

    def restart(self, timeout: float = 120.0) -> dict:
        """A planned restart (SIGHUP to the holder, as `stargz-store restart` sends it); returns
        the new `server_state()` once the new process serves."""
        generation = int(self.server_state().get("generation", 0))
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_generation(generation, timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stats(self, timeout: float = 10.0) -> dict:
        """Ask the daemon for its counters (SIGUSR1 -> `<root>/stats.json`) and return them."""
        if self.proc is None or self.proc.poll() is not None:
            raise StoreError("stargz-store is not running")
        path = self.root / "stats.json"
        path.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.02)
        raise StoreError(f"no stats from stargz-store within {timeout} s:\n{self.log_tail()}")

    def ref_dir(self, ref: str) -> Path:
        return self.mountpoint / ref_dir_name(ref)

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.ref_dir(ref) / digest

    def log_tail(self, size: int = 4000) -> str:
        return log_tail(self.log_path, size)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
