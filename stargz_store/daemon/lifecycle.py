"""A serving process's life on a mount the holder owns: take over, serve, hand over, stop.

The holder (`daemon.holder`) mounts and keeps the `/dev/fuse` descriptor; this process serves it
(`fuse.Session`, worker threads) from the holder's `go` until one of:
- `stop` (a planned restart): stop reading requests (idle workers wake at once), answer those
  read (at most `drain_timeout` seconds), send the holder the node table (`NodeTable.held_keys`)
  and the use counts, exit 0. The next process resumes the connection with them;
- `shutdown` (a real stop: the holder unmounts): close the pool (waiting lookups and reads get
  EIO at once) and exit once the kernel has ended the connection;
- the holder's death: this process is killed with it (parent-death signal, `server.main`).

Taking over (`go` with a state): adopt the runtime's credentials, the use counts and the node
table, start serving with the handed `ConnectionState` and ask the kernel to resend what a
predecessor had read but not answered (FUSE_NOTIFY_RESEND, Linux 6.9+; without it such a reader
waits forever, see README "Restarts and upgrades").

While serving, every change the next process would need after a crash of this one goes to the
holder before the request that caused it is answered: store nodes entering or leaving the table,
use counts, accepted credentials (`handover` lists the messages).

Signals: SIGTERM/SIGINT/SIGHUP/SIGUSR1 are blocked in every thread (`block_signals`, before any
thread starts) and taken by one thread with `sigwait`: SIGUSR1 writes `<root>/stats.json`; SIGTERM
to this process alone is a `stop` without a successor (the holder then starts another one);
SIGINT and SIGHUP are the holder's (a terminal's Ctrl-C reaches both) and ignored here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fuse, metrics
from ..fs.fuse_adapter import KernelNotifier, MountOptions, StoreOperations, session_options, set_read_ahead
from .handover import Channel
from .stats import write_stats

if TYPE_CHECKING:
    from ..fs.model import StoreModel
    from .control import ControlServer
    from .pool import ImagePool

log = logging.getLogger("stargz_store.daemon")

SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}
OPEN_FILES_JOURNAL = "open-files.journal"  # under <root>: `fuse.journal`
DRAIN_TIMEOUT = 20.0  # below the holder's: the old process reports what it could not finish
# Requests whose answer changes nothing the next process needs: the old process may still answer
# them after the next one serves (reads of a slow fetch need not hold up the hand-over).
STATELESS_OPS = frozenset({fuse.abi.READ, fuse.abi.GETATTR, fuse.abi.READLINK, fuse.abi.GETXATTR,
                           fuse.abi.LISTXATTR, fuse.abi.STATFS})


def block_signals() -> None:
    """Call before any thread starts, so every thread inherits the mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


class Serving:
    """One serving process (see the module docstring). `start_control` starts the control socket
    at `go`, before the first request is read (not before `go`: the previous process holds it until
    it stops)."""

    def __init__(self, fd: int, channel: Channel, pool: ImagePool, model: StoreModel, root: Path, mountpoint: Path,
                 options: MountOptions, *, start_control: Any = None, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.fd = fd
        self.channel = channel
        self.pool = pool
        self.model = model
        self.root = root
        self.mountpoint = mountpoint
        self.options = options
        self.start_control = start_control
        self.drain_timeout = drain_timeout
        self.control: ControlServer | None = None
        self.session: fuse.Session | None = None
        self.operations: StoreOperations | None = None
        self.ended = threading.Event()  # main may exit
        self.exit_code = 0
        self._stopping = threading.Lock()
        self._handing_over = False  # `stop` ends the process itself, once the state is sent

    # -- taking over --------------------------------------------------------------------------

    def take_over(self, go: dict[str, Any], add_credentials: Any) -> None:
        """Adopt what `go` hands over, then serve (returns once workers run)."""
        for document in go.get("credentials") or ():
            try:
                add_credentials({"credentials": document})
            except Exception as e:  # noqa: BLE001 - a stale document must not stop the take-over
                log.warning("credentials handed over were refused: %s", type(e).__name__)
        uses = [(str(r), str(k), int(n)) for r, k, n in go.get("uses") or ()]
        self.pool.handles.adopt_uses(uses)
        nodes = [(tuple(key), int(count)) for key, count in go.get("nodes") or ()]
        adopted = self.model.adopt_nodes(nodes) if go.get("state") else 0
        self.pool.handles.on_uses = lambda counts: self.channel.send("uses", uses=counts)
        self.model.nodes.on_added = lambda nodeid, key: self.channel.send("node", id=nodeid, key=list(key))
        self.model.nodes.on_dropped = lambda nodeid: self.channel.send("dropped", id=nodeid)
        state = fuse.ConnectionState(**go["state"]) if go.get("state") else None
        self.operations = operations = StoreOperations(self.model, self.options)
        if state is not None:
            operations.negotiated(state)
        session = fuse.Session(self.fd, operations, session_options(self.options), state=state)
        # Backing ids belong to the connection: answer as the predecessor did (same ids, same modes),
        # from its hand-over, or after a crash from its journal; a fresh mount starts empty.
        journal = fuse.OpenFilesJournal(self.root / OPEN_FILES_JOURNAL)
        files = go.get("files")
        if files is None and go.get("state"):
            files = journal.replay()
        session.adopt_open_files(files if go.get("state") else None, journal)
        session.on_init = self._on_init
        self.model.on_released = KernelNotifier(session).forget_entry
        self.session = session
        if self.start_control is not None:  # before the first request: the predecessor closed its socket
            self.control = self.start_control()
        asked = state is not None and go.get("resend", True)
        # After a crash, and after a predecessor that could not answer all it had read; not while
        # it still answers its reads (they would be answered twice). Before our workers read:
        # the kernel sends again every request read and not answered, ours too, and a copy of an
        # OPEN or RELEASE we are answering must not be counted twice (`Session._counted_before`).
        resend = session.notify_resend() if asked else False
        threading.Thread(target=self._serve, name="fuse-session", daemon=True).start()
        threading.Thread(target=self._listen, name="handover", daemon=True).start()
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()
        if state is not None:
            log.info("took over the mount at %s: %d nodes, %d use counts adopted; resend %s", self.mountpoint,
                     adopted, len(uses), ("accepted" if resend else "not supported") if asked else "not needed")
            self._serving(resend)

    def _on_init(self, state: fuse.ConnectionState) -> None:
        """The kernel's INIT is answered (a fresh mount): the mount serves from now on."""
        if self.operations is not None:
            self.operations.negotiated(state)
        if self.options.read_ahead_kb is not None:  # 0 = no readahead; None = the kernel's default
            set_read_ahead(str(self.mountpoint), self.options.read_ahead_kb)
        self.channel.send("init", state=dataclasses.asdict(state))
        log.info("stargz-store is serving at %s", self.mountpoint)
        self._serving(False)

    def _serving(self, resend: bool) -> None:
        self.channel.send("serving", resend=resend)

    def _serve(self) -> None:
        assert self.session is not None
        try:
            self.session.serve()
        except Exception:
            log.exception("the FUSE session failed")
        finally:
            if not self._handing_over:
                self.ended.set()

    # -- the holder's orders ------------------------------------------------------------------

    def _listen(self) -> None:
        while True:
            message = self.channel.receive()
            if message is None:
                if self._handing_over or self._stopping.locked():
                    return  # the holder let go of us after a stop or a shutdown: nothing to report
                log.error("the holder is gone; exiting")
                self.exit_code = 1
                self.ended.set()
                return
            op = message.get("op")
            if op == "stop":
                self.stop()
            elif op == "shutdown":
                self.shutdown()
                return
            elif op == "resend" and self.session is not None:
                log.info("the previous server ended with requests unanswered: asking the kernel to resend them")
                self.session.notify_resend()

    def stop(self) -> None:
        """Hand over: stop reading; once every request that changes what is handed over (lookups,
        forgets, notifications) is answered, report the state (`stopped`): the next process
        serves from then on, while this one still answers the reads it had taken (`finished`
        once they are done). Whatever is not answered within `drain_timeout` the kernel resends
        to the next process."""
        if not self._stopping.acquire(blocking=False):
            return
        session = self.session
        assert session is not None
        self._handing_over = True
        log.info("handing over the mount: answering the requests read, then exiting")
        session.stop()
        drained = session.wait_answered(self.drain_timeout, but=STATELESS_OPS)
        self._close_control()
        reads = sum(session.answering(op) for op in STATELESS_OPS)
        self.channel.send("stopped", nodes=[[list(k), n] for k, n in self.model.nodes.held_keys()],
                          uses=self.pool.handles.use_counts(), drained=drained, reads=reads,
                          files=session.hand_over_open_files())
        finished = session.wait_stopped(self.drain_timeout)
        if not (drained and finished):
            log.warning("requests still unanswered after %g s: the next server gets them again", self.drain_timeout)
        else:
            self.channel.send("finished")
        self.ended.set()

    def shutdown(self) -> None:
        """The holder unmounts: fail waiting requests now; the session ends with the connection."""
        if not self._stopping.acquire(blocking=False):
            return
        log.info("the store is stopping")
        self._close_control()
        self.pool.close()

    def _close_control(self) -> None:
        if self.control is not None:
            self.control.close()

    # -- signals ------------------------------------------------------------------------------

    def _signal_loop(self) -> None:
        while True:
            sig = signal.sigwait(SIGNALS)
            if sig == signal.SIGUSR1:
                self.write_stats()
            elif sig == signal.SIGTERM:
                threading.Thread(target=self.stop, name="stop", daemon=True).start()

    def write_stats(self) -> None:
        try:
            document = self.pool.stats()
            document["fs"] = self.model.stats()
            if self.session is not None:
                document["fs"].update(self.session.passthrough_stats())
            document["fs"]["requests"] = metrics.fuse_operations.counts()
            backing = getattr(getattr(self.pool, "resolver", None), "backing", None)
            if backing is not None:
                document["backing_files"] = backing.stats()
            document["server"] = {"pid": os.getpid()}
            write_stats(document, self.root)
        except Exception:
            log.exception("writing stats failed")
