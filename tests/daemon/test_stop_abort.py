"""A stopping store whose server stays busy after the unmount aborts its own FUSE connection, and
never another mount's.

fusectl names a connection by the minor of its mount's device; the kernel frees that number when
the mount goes and gives it to the next FUSE mount of the machine (the lowest free one). The
holder used to look the connection up by number only after its unmount and the wait for its
servers, and so aborted whatever mount had the number by then: on a machine where stores start
and stop all the time (a fleet benchmark's nodes, other test runs), a store starting at that
moment lost its mount before it served ("FUSE connection ended" at startup).
"""
from __future__ import annotations

import os
import select
import signal
from pathlib import Path

import pytest

from stargz_store.fuse.mount import MountSpec, mount, mount_device, unmount
from tests.fixtures.store import is_mounted, lazy_unmount, private_tmpdir, remove_tmpdir
from tests.fixtures.waiting import wait_for

MAX_PROBES = 3  # mounts made to get the freed number (another process may take one meanwhile)


def _aborted(fd: int) -> bool:
    """The connection of `fd` was aborted (what the store's FUSE session sees as its end)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE as root")
def test_a_stop_that_aborts_its_busy_connection_spares_the_next_mount_of_its_number(store_daemon_factory):
    store = store_daemon_factory("")
    device = mount_device(str(store.mountpoint))
    assert device is not None
    server = store.server_pid()
    base = private_tmpdir("stargz-store-abort-")
    probes: list[tuple[Path, int]] = []
    os.kill(server, signal.SIGSTOP)  # busy: it will not exit after the unmount
    try:
        store.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: not is_mounted(store.mountpoint), timeout=60), store.log_tail()
        reused = None
        for i in range(MAX_PROBES):  # the holder now waits for its server before it aborts
            path = base / f"probe{i}"
            path.mkdir()
            fd = mount(MountSpec(str(path), fsname="abort-probe", subtype="abort-probe"))
            probes.append((path, fd))
            if mount_device(str(path)) == device:
                reused = fd
                break
        assert store.proc.wait(120) == 0
        assert "still busy" in store.log_tail(), "the stop did take its abort path"
        if reused is None:
            pytest.skip(f"connection number {device} was taken by another mount of the machine meanwhile")
        assert not _aborted(reused), "the stopping store aborted the mount that got its connection number"
    finally:
        try:
            os.kill(server, signal.SIGCONT)
        except ProcessLookupError:
            pass
        for path, fd in probes:
            try:
                unmount(str(path), lazy=True)
            except Exception:  # noqa: BLE001 - best effort; the lazy unmount below covers it
                lazy_unmount(path)
            os.close(fd)
        remove_tmpdir(base)
