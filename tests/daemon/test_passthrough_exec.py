"""Programs executed from the mount by passthrough keep running, and keep being started, while the
store's serving process is replaced (planned restart, kill -9, take-over by a new store): the
Podman-free form of the e2e restart test's `/bin/sh: sleep: Input/output error` (issue 13.5).

The kernel (fs/fuse/iomode.c, Linux 6.9+) puts an inode in passthrough mode with one backing file
while any file of it is open by passthrough: every further open must name that same backing file
(another is EBUSY, a page-cache open EIO; both reach the caller as EIO). Long-running processes
executing a file (`busybox sleep`) keep it open across every replacement, while other processes
execute it and open it again and again (an OPEN and a RELEASE each, many under way when the
server goes). The store must keep its count of those opens exact across hand-overs and crashes:
one too low and it lets go of the backing id while the kernel still uses it, and every later
open of the file fails.
"""
from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest

from stargz_store.fuse import passthrough_permitted
from tests.e2e.app_images import convert_and_push
from tests.fixtures.images import BUSYBOX_PATH, LayerBuilder, write_oci_image
from tests.fixtures.registry_images import fetch_image
from tests.fixtures.restart_load import RESTART_CONFIG
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONFIG = RESTART_CONFIG.replace("[store]\n", "[store]\npassthrough = true\n")
REPLACEMENTS = 6
HOLDERS = 2
EXEC_THREADS = 3
OPEN_THREADS = 3


@pytest.fixture(scope="module")
def exec_image(registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("passthrough-exec-image")
    write_oci_image(work / "src", [LayerBuilder().add_busybox().gzip()], tag="src")
    convert_and_push(work / "src", "src", f"{registry.host}/passthrough/exec:esgz")
    return fetch_image(registry.host, "passthrough/exec", "esgz")


def _settled(store) -> bool:
    fs = store.stats()["fs"]
    return fs["passthrough_inodes"] == 0 and fs["cached_inodes"] == 0


def _processes_holding(path: Path) -> list[str]:
    """Processes that still have `path` open or mapped (by /proc), to tell a count the store
    keeps too high from a file something still holds."""
    found = []
    target = str(path)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            maps = (proc / "maps").read_text()
            exe = os.readlink(proc / "exe") if (proc / "exe").exists() else ""
        except OSError:
            continue
        if target in fds or target in maps or exe == target:
            found.append(f"{proc.name} {(proc / 'cmdline').read_bytes().replace(bytes(1), b' ')[:80]!r}")
    return found


def _unsettled_report(store, busybox: Path) -> str:
    return (f"fs {store.stats()['fs']}; still holding {busybox}: {_processes_holding(busybox)}\n"
            f"{store.log_tail(12000)}")


class Churn:
    """Threads that execute `busybox true` and open+read+close busybox from the mount, over and
    over; every failure is kept with its errno."""

    def __init__(self, busybox: Path, expected_head: bytes) -> None:
        self.busybox = busybox
        self.head = expected_head
        self.failures: list[str] = []
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._exec, daemon=True) for _ in range(EXEC_THREADS)]
        self._threads += [threading.Thread(target=self._open, daemon=True) for _ in range(OPEN_THREADS)]

    def __enter__(self) -> Churn:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _count(self, failure: str | None) -> None:
        with self._lock:
            self.done += 1
            if failure is not None:
                self.failures.append(failure)

    def _exec(self) -> None:
        while not self._stop.is_set():
            try:
                run = subprocess.run([str(self.busybox), "true"], capture_output=True, timeout=300)
                self._count(None if run.returncode == 0 else f"exec: exit {run.returncode} {run.stderr[-200:]!r}")
            except OSError as e:
                self._count(f"exec: {errno.errorcode.get(e.errno, e.errno)}")

    def _open(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.busybox, os.O_RDONLY)
                try:
                    data = os.pread(fd, len(self.head), 0)
                finally:
                    os.close(fd)
                self._count(None if data == self.head else "open: wrong bytes")
            except OSError as e:
                self._count(f"open: {errno.errorcode.get(e.errno, e.errno)}")

    def progressed(self, more: int) -> bool:
        target = self.done + more
        return wait_for(lambda: self.done >= target or bool(self.failures), timeout=300, interval=0.01)


def _replace(store, how: str, factory):
    """Replace the serving process of `store` `how`; returns the store that serves afterwards."""
    if how == "restart":
        old = store.server_state()["server_pid"]
        assert store.restart()["server_pid"] != old
        return store
    if how == "crash":
        generation = store.wait_standby()["generation"]
        killed = store.kill_server()
        assert store.wait_generation(generation)["server_pid"] != killed
        return store
    new = factory(CONFIG, root=store.root, mountpoint=store.mountpoint, extra_args=["--takeover"], start=False)
    new.start()
    assert wait_for(lambda: new.server_state(timeout=0).get("holder_pid") == new.proc.pid or not new.running,
                    timeout=300, interval=0.02), new.log_tail()
    assert new.running, new.log_tail()
    assert store.stop(mount_stays=True) == 0
    return new


@pytest.mark.parametrize("how", ["restart", "crash", "takeover"])
def test_programs_executed_by_passthrough_run_and_start_across_server_replacements(
        store_daemon_factory, registry, exec_image, how):
    if not passthrough_permitted():
        pytest.skip("FUSE passthrough needs CAP_SYS_ADMIN in the initial user namespace")
    store = store_daemon_factory(CONFIG)
    diff = store.layer_dir(f"{registry.host}/passthrough/exec:esgz", exec_image.layers[0]["digest"]) / "diff"
    busybox = diff / "bin" / "busybox"
    expected = BUSYBOX_PATH.read_bytes()
    assert busybox.read_bytes() == expected  # every chunk cached: its next open is by passthrough
    assert wait_for(lambda: store.stats().get("backing_files", {}).get("made", 0) >= 1, timeout=120)
    assert wait_for(lambda: _settled(store), timeout=60)
    holders = [subprocess.Popen([str(busybox), "sleep", "100000"]) for _ in range(HOLDERS)]
    try:
        assert wait_for(lambda: store.stats()["fs"]["passthrough_inodes"] == 1, timeout=60)
        with Churn(busybox, expected[:4096]) as churn:
            assert churn.progressed(20), churn.failures
            for _ in range(REPLACEMENTS):
                store = _replace(store, how, store_daemon_factory)
                assert churn.progressed(20), churn.failures
        assert churn.failures == [], f"after {churn.done} runs and opens: {churn.failures[:5]}"
        # The holders still run: the file is still open by passthrough, with the first id.
        assert all(p.poll() is None for p in holders)
        subprocess.run([str(busybox), "true"], check=True, timeout=300)
        assert busybox.read_bytes() == expected
    finally:
        for p in holders:
            p.kill()
            p.wait()
    # Every open of the churn and of the holders was released: the store let go of the id, and
    # the next open registers a new one.
    assert wait_for(lambda: _settled(store), timeout=60), _unsettled_report(store, busybox)
    before = store.stats()["fs"]["passthrough_opens"]
    subprocess.run([str(busybox), "true"], check=True, timeout=300)
    assert store.stats()["fs"]["passthrough_opens"] == before + 1
