"""A mounted daemon's life: mount, serve, readiness, signals, unmount.

- `mount_and_serve` mounts a new FUSE connection (`stargz_store.fuse.mount`: mount(2) as root,
  fusermount3 as a user) and serves it with our own session (`fuse.Session`, worker threads). Once
  the kernel's INIT is answered, the mount's readahead is raised (after INIT: INIT would lower it
  again) and systemd is told `READY=1`.
- Signals: SIGINT/SIGTERM/SIGHUP/SIGUSR1 are blocked in every thread (`block_signals`, before any
  thread starts) and taken by one thread with `sigwait`. SIGUSR1 writes `<root>/stats.json`. A
  stop closes the pool (waiting lookups and reads get EIO at once), unmounts (the kernel then ends
  the connection and the session), and if the mount is busy, detaches it and aborts the FUSE
  connection after `abort_after` seconds, so the process always exits.
- `serve` returns when the connection has ended: after a stop, an unmount from outside, or an
  abort. Worker threads still inside a registry request are not waited for.

Issue 14 (hand-over to a new process) starts here: the connection is the descriptor `mount`
returns and the `ConnectionState` the session negotiated.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .. import fuse
from ..fs.fuse_adapter import KernelNotifier, MountOptions, StoreOperations, mount_spec, session_options, set_read_ahead
from ..fuse.mount import mount_device
from .stats import write_stats

if TYPE_CHECKING:
    from ..fs.model import StoreModel
    from .pool import ImagePool

log = logging.getLogger("stargz_store.daemon")

SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}


def block_signals() -> None:
    """Call before any thread starts, so every thread inherits the mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


class Lifecycle:
    """Signals, readiness and shutdown of one mounted daemon (see the module docstring)."""

    def __init__(self, pool: ImagePool, root: Path, mountpoint: Path, read_ahead_kb: int | None = None,
                 abort_after: float = 5.0, model: StoreModel | None = None) -> None:
        self.pool = pool
        self.model = model
        self.root = root
        self.mountpoint = mountpoint
        self.read_ahead_kb = read_ahead_kb
        self.abort_after = abort_after
        self.device: str | None = None  # major:minor of our mount, known once it is live
        self.stopping = threading.Event()
        self.ended = threading.Event()  # the connection ended: main may exit

    def start(self) -> None:
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()

    def on_init(self, state: fuse.ConnectionState) -> None:
        """The kernel's INIT is answered: the mount serves from now on."""
        self.device = mount_device(str(self.mountpoint))
        if self.read_ahead_kb is not None:  # 0 = no readahead; None = the kernel's default
            set_read_ahead(str(self.mountpoint), self.read_ahead_kb)
        log.info("stargz-store is serving at %s", self.mountpoint)
        notify_systemd("READY=1")

    def serve(self, session: fuse.Session) -> None:
        """Serve `session` until its connection ends (returns then)."""
        threading.Thread(target=self._serve, args=(session,), name="fuse-session", daemon=True).start()
        self.ended.wait()

    def _serve(self, session: fuse.Session) -> None:
        try:
            session.serve()
        except Exception:
            log.exception("the FUSE session failed")
        finally:
            self.ended.set()

    def _signal_loop(self) -> None:
        while True:
            sig = signal.sigwait(SIGNALS)
            if sig == signal.SIGUSR1:
                try:
                    document = self.pool.stats()
                    if self.model is not None:
                        document["fs"] = self.model.stats()
                    write_stats(document, self.root)
                except Exception:
                    log.exception("writing stats failed")
                continue
            if self.stopping.is_set():
                continue
            log.info("%s received: unmounting %s", signal.Signals(sig).name, self.mountpoint)
            self.stopping.set()
            notify_systemd("STOPPING=1")
            self.pool.close()
            self._unmount()

    def _unmount(self) -> None:
        try:
            fuse.unmount(str(self.mountpoint))
        except fuse.MountError as e:
            log.warning("%s; detaching it lazily", e)
            try:
                fuse.unmount(str(self.mountpoint), lazy=True)
            except fuse.MountError as e2:
                log.error("%s", e2)
        if not self.ended.wait(self.abort_after) and self.device:
            self._abort_connection()
        if not self.ended.wait(self.abort_after):
            log.warning("FUSE workers still busy after the unmount; exiting without them")
            self.ended.set()

    def _abort_connection(self) -> None:
        """Last resort for a mount that stays busy: abort it through fusectl (mounted if needed)."""
        control = Path("/sys/fs/fuse/connections")
        minor = self.device.split(":")[1] if self.device else ""
        log.warning("FUSE connection %s still busy after %g s; aborting it", self.device, self.abort_after)
        if not (control / minor).exists() and not os.path.ismount(control):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], capture_output=True)
        try:
            (control / minor / "abort").write_text("1")
        except OSError as e:
            log.error("cannot abort FUSE connection %s: %s", self.device, e)


def mount_and_serve(model: StoreModel, lifecycle: Lifecycle, options: MountOptions) -> None:
    """Mount at `lifecycle.mountpoint` and serve `model` until the connection ends. Raises
    `fuse.MountError` when the mount cannot be made."""
    fd = fuse.mount(mount_spec(str(lifecycle.mountpoint), options))
    try:
        session = fuse.Session(fd, StoreOperations(model, options), session_options(options))
    except BaseException:
        os.close(fd)
        raise
    session.on_init = lifecycle.on_init
    notifier = KernelNotifier(session)
    model.on_released = notifier.forget_entry
    lifecycle.serve(session)
    # The descriptor stays open: workers still answering may write to it until the process exits.


def notify_systemd(state: str) -> None:
    """`sd_notify` for `Type=notify` units (as the Go store sends READY=1 once mounted)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", state, e)
