"""The restart holder: the long-lived process that owns the mount, and the serving processes it runs.

Why: a FUSE mount lives as long as some process holds its `/dev/fuse` descriptor. If the process
that serves it also holds it alone, every restart, upgrade or crash of the store aborts the
connection and every running container that reads through it fails (ENOTCONN). So the daemon is
two processes:

- the holder (`stargz-store [flags] MOUNTPOINT`, this module): mounts, holds the descriptor and
  the root lock, and never serves a request. It imports little (no registry, layer or cache code)
  and does little, so it has little reason to fail or to be replaced;
- a server (`python -m stargz_store.daemon.server`, started by the holder with the descriptor
  and its end of a `handover.Channel` inherited): the whole store. It may be replaced by a newer
  installed version of the package: the holder starts whatever `sys.executable -m ...` imports now.

What the holder does:
- start: the first server answers the kernel's INIT and reports the negotiated
  `fuse.ConnectionState`; the holder then tells systemd READY=1;
- planned restart (SIGHUP, `stargz-store restart`, systemd `ExecReload`): start a new server and
  wait until it has built its store (`prepared`); tell the old one to `stop` (it stops reading
  requests, answers those it read and hands over its node table and use counts); then `go` to
  the new one with the state. Requests that arrive meanwhile wait in the kernel; none fails. An
  old server that does not finish within `drain_timeout` is killed and the hand-over continues
  as after a crash;
- crash (the server exits or is killed): the spare server (`standby`: one more process, started
  once a server serves, its store built and waiting) takes over at once, or a new one is started;
  it gets with `go` what the holder kept (the node keys and use counts the server reported as they changed, the runtime's
  credentials); it asks the kernel to resend the requests the dead one had read
  (FUSE_NOTIFY_RESEND, Linux 6.9+). Node lookup counts are unknown then: the rebuilt nodes are
  kept until the next real stop (a few entries per image, not a growing leak). A server that
  keeps failing before it serves (5 in a row) ends the store: unmount, exit 1;
- real stop (SIGTERM, SIGINT): `shutdown` the server, unmount (lazily when busy), abort the
  connection if the server does not end within `abort_after` seconds, exit 0;
- SIGUSR1 goes to the server (it writes `<root>/stats.json`);
- `<root>/server.json` (atomically rewritten): holder and server pids, the server's version,
  `generation` (one more for every server that took over), restarts and crashes so far.
  `stargz-store restart` waits for the generation to change.

If the holder itself is killed, its servers die with it (parent-death signal) and the mount is
dead, as before; the next start clears it.

Between holders (`succession`: a DaemonSet's rolling update, where the new holder runs in a new
pod): a holder that serves listens on `<root>/holder.sock`; a new holder started with `--takeover`
gets the mount's descriptor and root lock there, prepares its server, and the old holder stops its
own server as for a planned restart and sends the new one the state it would have given its next
server (`Successor`). Once the new holder's server serves, the old holder holds nothing and exits
0 on its stop signal without unmounting. A holder that got its mount that way (`Holder.taking_over`
until its server serves) never unmounts before then: if it fails, the old holder serves on.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..fuse.mount import MountError, abort_through, mount_device, open_abort_file, unmount
from .handover import PROTOCOL, Channel, ChannelClosed
from .succession import PROTOCOL as SUCCESSION_PROTOCOL
from .succession import SUCCESSION_STOP_WAIT, Listener, Predecessor, send_device

log = logging.getLogger("stargz_store.daemon.holder")

SERVER_MODULE = "stargz_store.daemon.server"
from .restart import STATE_FILE
CRASH_COUNT = 1 << 40  # lookup count of a node rebuilt after a crash: the real one is unknown
MAX_CREDENTIAL_DOCUMENTS = 1024
MAX_FAILED_STARTS = 5
EXIT_SERVER_FAILED = 1
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
LISTENER, SUCCESSOR, PREDECESSOR = "listener", "successor", "predecessor"  # selector keys besides servers


class Server:
    """One serving process, as the holder sees it. (No dataclasses in the holder's modules:
    `dataclasses` with `inspect` is a megabyte of the holder's small heap.)"""

    __slots__ = ("proc", "channel", "phase", "version", "stop_deadline", "started")

    def __init__(self, proc: subprocess.Popen, channel: Channel) -> None:
        self.proc = proc
        self.channel = channel
        self.phase = "preparing"  # preparing, prepared, serving, stopping, stopped, gone
        self.version = "?"
        self.stop_deadline = 0.0
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid


class Successor:
    """A new holder taking this one's mount over (`succession`), as this holder sees it."""

    __slots__ = ("channel", "phase", "pid", "ready", "nodes", "files")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.phase = "greeting"  # greeting, connected (has the descriptor), stopping, sent (the state), retired
        self.pid = 0
        self.ready = False  # its server is built: this holder may stop its own
        self.nodes: list[list[Any]] = []  # the node table sent with `state`
        self.files: dict[str, Any] | None = None  # the open passthrough files sent with `state`


class Holder:
    """Owns the mount `fd` at `mountpoint`; runs servers with `server_args` (their flags)."""

    def __init__(self, fd: int, mountpoint: Path, root: Path, server_args: list[str], *,
                 abort_after: float = 5.0, drain_timeout: float = 30.0, standby: bool = True,
                 server_command: list[str] | None = None, lock_fd: int = -1,
                 predecessor: Predecessor | None = None, ready_file: Path | None = None) -> None:
        self.fd = fd
        self.lock_fd = lock_fd  # the root lock's open file: handed to a successor with the descriptor
        self.mountpoint = mountpoint
        self.root = root
        self.server_args = server_args
        self.abort_after = abort_after
        self.drain_timeout = drain_timeout
        self.standby = standby
        self.server_command = server_command or [sys.executable, "-m", SERVER_MODULE]
        self.state: dict[str, Any] | None = None  # the negotiated ConnectionState, once INIT was answered
        self.nodes: dict[int, list[str]] = {}  # node id -> key, as servers reported them
        self.handed: list[list[Any]] | None = None  # exact [key, count] from a server that stopped
        self.handed_unanswered = False  # ... which could not answer every request it had read
        self.handed_files: dict[str, Any] | None = None  # its open files per inode and mode (passthrough)
        self.uses: list[list[Any]] = []
        self.credentials: list[Any] = []
        self.current: Server | None = None
        self.next: Server | None = None
        self.spare: Server | None = None  # prepared, waiting to take over at a crash
        self.spare_stale = False  # a restart is under way: the spare runs the code of before
        self.retired: list[Server] = []  # discarded spares not reaped yet
        self.generation = 0
        self.restarts = 0
        self.crashes = 0
        self.failed_starts = 0
        self.ready_sent = False
        self.exit_code: int | None = None
        self.stopping = False
        self.device: str | None = None  # major:minor of the mount (fusectl names connections by the minor)
        # between holders (`succession`)
        self.predecessor = predecessor  # the holder this one takes the mount over from
        self.taking_over = predecessor is not None  # ... until this holder's server serves
        self.takeovers = 0
        self.successor: Successor | None = None
        self.handed_over = False  # a successor serves the mount: this holder holds nothing
        self.listener: Listener | None = None
        self.ready_file = ready_file
        self.stop_pending: float | None = None  # a stop signal waiting for a successor under way (deadline)
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve the mount through servers until a real stop; returns the exit code."""
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.device = mount_device(str(self.mountpoint))
        if self.predecessor is not None:
            self._selector.register(self.predecessor.channel.sock, selectors.EVENT_READ, PREDECESSOR)
        self.current = self._spawn()
        while self.exit_code is None:
            timeout = self._next_timeout()
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._drain_wake_pipe()
                elif key.data == LISTENER:
                    self._accept()
                elif key.data == SUCCESSOR:
                    self._read_successor()
                elif key.data == PREDECESSOR:
                    self._read_predecessor()
                else:
                    self._read(key.data)
            self._handle_signals()
            if self.exit_code is not None:
                break
            self._check_children()
            self._check_deadlines()
        return self.exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                if self.handed_over:
                    log.info("%s received", signal.Signals(sig).name)
                    self._exit_handed_over()
                    return
                if self.successor is not None and self.successor.phase != "greeting":
                    if self.stop_pending is None:
                        log.info("%s received while a successor holder takes the mount over: waiting for it "
                                 "(at most %g s) before stopping", signal.Signals(sig).name, SUCCESSION_STOP_WAIT)
                        self.stop_pending = time.monotonic() + SUCCESSION_STOP_WAIT
                    continue
                if self.taking_over:
                    log.info("%s received during the take-over: leaving the mount to the previous holder",
                             signal.Signals(sig).name)
                    self._finish(0)
                    return
                log.info("%s received: unmounting %s", signal.Signals(sig).name, self.mountpoint)
                self._stop()
                return
            if sig == signal.SIGHUP and not self.handed_over:
                self.restart()
            elif sig == signal.SIGUSR1 and self.current is not None:
                _kill(self.current.pid, signal.SIGUSR1)

    def _next_timeout(self) -> float:
        deadlines = [s.stop_deadline for s in (self.current,) if s is not None and s.phase == "stopping"]
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - time.monotonic(), 1.0))

    # -- servers ------------------------------------------------------------------------------

    def _spawn(self) -> Server:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # the holder tells systemd
        command = [*self.server_command, *self.server_args,
                   "--fuse-fd", str(self.fd), "--channel-fd", str(theirs.fileno()), "--holder-pid", str(os.getpid())]
        try:
            proc = subprocess.Popen(command, pass_fds=(self.fd, theirs.fileno()), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.setblocking(False)
        server = Server(proc, Channel(ours))
        self._selector.register(ours, selectors.EVENT_READ, server)
        log.info("started server pid %d", proc.pid)
        return server

    def restart(self) -> None:
        """A planned restart: a new server takes over once it is ready (see the module docstring)."""
        if self.next is not None:
            log.info("a restart is already under way (server pid %d)", self.next.pid)
            return
        if self.successor is not None or self.taking_over:
            log.info("restart asked for during a hand-over between holders: ignored")
            return
        if self.current is None or self.current.phase != "serving":
            log.info("restart asked for while no server is serving yet: ignored")
            return
        log.info("restarting: starting a new server")
        self.spare_stale = True
        self.next = self._spawn()

    def _read(self, server: Server) -> None:
        messages = _receive(server.channel)
        for message in messages or ():
            self._message(server, message)
        if messages is None:
            self._gone(server)

    def _message(self, server: Server, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "node":
            self.nodes[int(message["id"])] = message["key"]
        elif op == "dropped":
            self.nodes.pop(int(message["id"]), None)
        elif op == "uses":
            self.uses = message["uses"]
        elif op == "credentials":
            self.credentials.append(message["document"])
            del self.credentials[:-MAX_CREDENTIAL_DOCUMENTS]
        elif op == "prepared":
            self._prepared(server, message)
        elif op == "init":
            self.state = message["state"]
            if not self.ready_sent:
                self.ready_sent = True
                notify_systemd("READY=1")
        elif op == "serving":
            self._serving(server, message)
        elif op == "stopped":
            self._stopped(server, message)
        elif op == "finished":
            server.phase = "finished"
        else:
            log.warning("server %d sent an unknown message %r", server.pid, op)

    def _prepared(self, server: Server, message: dict[str, Any]) -> None:
        server.phase = "prepared"
        server.version = str(message.get("version", "?"))
        if message.get("protocol") != PROTOCOL:
            log.error("server %d speaks hand-over protocol %r, this holder %d: not using it",
                      server.pid, message.get("protocol"), PROTOCOL)
            self._abandon(server)
            return
        current = self.current
        if server is self.spare:
            self._write_state()  # `standby` true from now on
            return  # waits for a crash (or to be replaced)
        if server is self.next and current is not None and current.phase == "serving":
            log.info("new server %d (version %s) is ready; stopping server %d", server.pid, server.version, current.pid)
            current.phase = "stopping"
            current.stop_deadline = time.monotonic() + self.drain_timeout
            current.channel.send("stop")
        elif server is self.current:
            if self.taking_over and self.state is None:
                log.info("server %d (version %s) is prepared: asking holder pid %d to hand the mount over",
                         server.pid, server.version, self.predecessor.pid if self.predecessor else -1)
                if self.predecessor is not None:
                    self.predecessor.channel.send("ready")
                return
            self._go(server)

    def _go(self, server: Server) -> None:
        resend = self.handed is None or self.handed_unanswered
        if self.handed is not None:
            nodes = self.handed
        else:  # after a crash: the keys the dead server reported, counts unknown
            nodes = [[key, CRASH_COUNT] for key in self.nodes.values()]
        files, self.handed, self.handed_files = self.handed_files, None, None
        server.channel.send("go", state=self.state, nodes=nodes, uses=self.uses, credentials=self.credentials,
                            resend=resend, files=files)

    def _serving(self, server: Server, message: dict[str, Any]) -> None:
        server.phase = "serving"
        self.failed_starts = 0
        self.generation += 1
        log.info("server %d (version %s) is serving (generation %d%s)", server.pid, server.version, self.generation,
                 ", resend accepted" if message.get("resend") else "")
        if self.listener is None:
            self._publish_listener()  # before a predecessor lets go of its own: a successor always finds one
        if self.taking_over:
            self._took_over()
        self._write_state()
        if self.ready_file is not None:
            self.ready_file.touch()
        if self.successor is not None and self.successor.ready and self.successor.phase == "connected":
            self._stop_for_successor()
        if self.spare is not None and self.spare_stale:
            self._discard(self.spare)
        self.spare_stale = False
        if self.standby and self.spare is None and self.next is None:
            self.spare = self._spawn()

    def _discard(self, server: Server) -> None:
        """A spare that will not be used (it runs the code of before a restart): it never served,
        so it is simply killed, and reaped later (`_check_children`) without holding up the loop."""
        if server is self.spare:
            self.spare = None
            self._write_state()
        try:
            self._selector.unregister(server.channel.sock)
        except (KeyError, ValueError):
            pass
        server.channel.close()
        server.phase = "gone"
        _kill(server.pid, signal.SIGKILL)
        self.retired.append(server)

    def _stopped(self, server: Server, message: dict[str, Any]) -> None:
        server.phase = "stopped"
        if not message.get("drained", True):
            log.warning("server %d stopped with requests unanswered: the kernel is asked to resend them", server.pid)
        self.handed = message.get("nodes")
        self.handed_files = message.get("files")
        self.handed_unanswered = not message.get("drained", True)
        self.uses = message.get("uses", self.uses)
        self._take_over(server)

    def _take_over(self, old: Server) -> None:
        """`old` no longer serves: the prepared next server (if any) goes; else one is started
        (or a successor holder gets the state, if one waits for it)."""
        if self.successor is not None and self.successor.phase == "stopping":
            self._hand_to_successor(old)
            return
        nxt, self.next = self.next, None
        if old is self.current:
            self.current = None
        if nxt is None and self.spare is not None and not self.spare_stale:
            nxt, self.spare = self.spare, None  # a crash: the spare is ready now
        if nxt is not None and nxt.phase in ("preparing", "prepared"):
            self.current = nxt
            self.restarts += 1 if old.phase == "stopped" else 0
            if nxt.phase == "prepared":
                self._go(nxt)
        else:
            self.current = self._spawn()

    def _gone(self, server: Server) -> None:
        """A server's channel closed: it exited (or is exiting). While stopping, that is expected."""
        try:
            self._selector.unregister(server.channel.sock)
        except (KeyError, ValueError):
            pass
        server.channel.close()
        try:
            code = server.proc.wait(timeout=self.abort_after)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            code = server.proc.wait()
        phase, server.phase = server.phase, "gone"
        if self.handed_over and phase == "stopped" and self.successor is not None:
            self.successor.channel.send("resend")  # reads it had taken go to the successor's server
        if self.handed_over:
            self._release_successor()
            return
        if self.stopping:
            return
        if server is self.spare:
            log.warning("the spare server %d exited (%s)", server.pid, _describe_exit(code))
            self.spare = None
            return
        if server is self.next:
            log.error("the new server %d exited (%s) before taking over; server %d serves on",
                      server.pid, _describe_exit(code), self.current.pid if self.current else -1)
            self.next = None
            self.spare_stale = False
            return
        if phase == "stopped" and self.successor is not None and self.successor.phase == "sent":
            self.successor.channel.send("resend")
        elif phase == "stopped" and self.current is not None and self.current.phase in ("prepared", "serving"):
            # it exited before answering every read it had taken: they go to the new server
            log.warning("server %d exited (%s) with reads unanswered: the kernel is asked to resend them",
                        server.pid, _describe_exit(code))
            self.current.channel.send("resend")
        if server is not self.current or phase in ("stopped", "finished"):
            return  # a stopped server's exit, or one abandoned before
        if phase != "serving":
            self.failed_starts += 1
        if self.state is None:  # it never answered INIT: nothing to hand over, the store failed to start
            log.error("the server exited (%s) before serving the mount", _describe_exit(code))
            self._finish(code if code and code > 0 else EXIT_SERVER_FAILED)
            return
        self.crashes += 1
        log.error("server %d exited (%s): starting another one on the same mount", server.pid, _describe_exit(code))
        if self.failed_starts >= MAX_FAILED_STARTS:
            log.error("%d servers in a row failed before serving: giving up", self.failed_starts)
            self._finish(EXIT_SERVER_FAILED)
            return
        if self.failed_starts:
            time.sleep(min(0.5 * 2 ** (self.failed_starts - 1), 5.0))
        self._take_over(server)

    def _abandon(self, server: Server) -> None:
        _kill(server.pid, signal.SIGKILL)

    def _check_children(self) -> None:
        """A server whose channel is still open but which exited (its descriptor inherited by a
        child of its own, say) counts as gone too."""
        for server in (self.current, self.next, self.spare):
            if server is not None and server.phase != "gone" and server.proc.poll() is not None:
                self._read_rest(server)
        self.retired = [s for s in self.retired if s.proc.poll() is None]

    def _read_rest(self, server: Server) -> None:
        """Read what an exited server still had to say (up to the end of its stream)."""
        server.channel.sock.settimeout(self.abort_after)  # a leaked copy of its end must not hang us
        try:
            while True:
                for message in server.channel.read_available():
                    self._message(server, message)
        except ChannelClosed:
            pass
        if server.phase != "gone":
            self._gone(server)

    def _check_deadlines(self) -> None:
        if self.stop_pending is not None and time.monotonic() > self.stop_pending:
            log.warning("the successor holder did not take the mount over in time: stopping")
            self.stop_pending = None
            if self.successor is not None and self.successor.phase in ("greeting", "connected"):
                self._successor_gone()  # not yet stopping our server: let it go, stop as usual
                self._signals.append(signal.SIGTERM)
            else:
                self._signals.append(signal.SIGTERM)  # handled once the successor serves or is gone
                self.stop_pending = time.monotonic() + SUCCESSION_STOP_WAIT
        server = self.current
        if server is not None and server.phase == "stopping" and time.monotonic() > server.stop_deadline:
            log.warning("server %d did not stop within %g s: killing it; the kernel resends what it had read",
                        server.pid, self.drain_timeout)
            server.phase = "serving"  # its death is handled as a crash: the next server goes with the kept state
            _kill(server.pid, signal.SIGKILL)
            self._read_rest(server)

    # -- between holders: handing the mount to a successor (`succession`) ---------------------

    def _publish_listener(self) -> None:
        try:
            self.listener = Listener.publish(self.root)
        except OSError as e:
            log.warning("cannot listen for a successor holder on %s: %s", self.root, e)
            return
        self._selector.register(self.listener.sock, selectors.EVENT_READ, LISTENER)

    def _accept(self) -> None:
        assert self.listener is not None
        conn = self.listener.accept()
        if conn is None:
            return
        channel = Channel(conn)
        busy = self._busy_reason()
        if busy:
            log.info("a successor holder asked for the mount: refused for now (%s)", busy)
            channel.send("refused", reason=busy, retry=True)
            channel.close()
            return
        self.successor = Successor(channel)
        self._selector.register(conn, selectors.EVENT_READ, SUCCESSOR)

    def _busy_reason(self) -> str | None:
        if self.successor is not None:
            return "another successor holder is taking the mount over"
        if self.handed_over or self.stopping or self.taking_over:
            return "this holder is stopping or handing over"
        if self.next is not None:
            return "a restart is under way"
        if self.lock_fd < 0:
            return "this holder has no root lock to hand over"
        return None

    def _read_successor(self) -> None:
        successor = self.successor
        assert successor is not None
        messages = _receive(successor.channel)
        for message in messages or ():
            op = message.get("op")
            if op == "succeed" and successor.phase == "greeting":
                self._greet(successor, message)
            elif op == "ready" and successor.phase == "connected":
                successor.ready = True
                if self.current is not None and self.current.phase == "serving" and self.next is None:
                    self._stop_for_successor()
            elif op == "serving" and successor.phase == "sent":
                self._retire()
        if messages is None and self.successor is successor:
            self._successor_gone()

    def _greet(self, successor: Successor, message: dict[str, Any]) -> None:
        successor.pid = int(message.get("pid", 0))
        problem = None
        if message.get("protocol") != SUCCESSION_PROTOCOL:
            problem = f"hand-over protocol {message.get('protocol')!r}, this holder speaks {SUCCESSION_PROTOCOL}"
        elif message.get("mountpoint") != str(self.mountpoint):
            problem = f"it mounts {message.get('mountpoint')!r}, this holder serves {self.mountpoint}"
        if problem:
            log.error("refused the mount to holder pid %d: %s", successor.pid, problem)
            successor.channel.send("refused", reason=problem, retry=False)
            self._successor_gone()
            return
        try:
            send_device(successor.channel, [self.fd, self.lock_fd], mountpoint=str(self.mountpoint),
                        pid=os.getpid())
        except OSError as e:
            log.warning("cannot pass the mount to holder pid %d: %s", successor.pid, e)
            self._successor_gone()
            return
        successor.phase = "connected"
        log.info("holder pid %d (version %s) takes the mount over: it has the descriptor and prepares its server",
                 successor.pid, message.get("version", "?"))

    def _stop_for_successor(self) -> None:
        """The successor's server is built: stop ours as for a planned restart (`_take_over` then
        sends the successor the state instead of starting our next server)."""
        successor, current = self.successor, self.current
        assert successor is not None and current is not None
        log.info("holder pid %d is ready: stopping server %d for it", successor.pid, current.pid)
        successor.phase = "stopping"
        current.phase = "stopping"
        current.stop_deadline = time.monotonic() + self.drain_timeout
        current.channel.send("stop")

    def _hand_to_successor(self, old: Server) -> None:
        successor = self.successor
        assert successor is not None
        if old is self.current:
            self.current = None
        if self.handed is not None:
            nodes, resend = self.handed, self.handed_unanswered
        else:  # our server died instead of stopping: the keys it reported, counts unknown
            nodes, resend = [[key, CRASH_COUNT] for key in self.nodes.values()], True
        files, self.handed, self.handed_files = self.handed_files, None, None  # passthrough ids: the connection's
        successor.nodes = nodes
        successor.files = files
        successor.phase = "sent"
        sent = successor.channel.send(
            "state", state=self.state, nodes=nodes, reported=[[i, k] for i, k in self.nodes.items()], uses=self.uses,
            credentials=self.credentials, resend=resend, generation=self.generation, restarts=self.restarts,
            crashes=self.crashes, takeovers=self.takeovers, files=files)
        log.info("sent the mount's state to holder pid %d (%d nodes, %d use counts)", successor.pid, len(nodes),
                 len(self.uses))
        if not sent:
            self._successor_gone()

    def _retire(self) -> None:
        """The successor serves: hold nothing more (descriptor, lock, spare, socket), wait for the stop signal."""
        successor = self.successor
        assert successor is not None
        successor.phase = "retired"
        self.handed_over = True
        log.info("holder pid %d serves the mount now; this holder lets it go and waits for its stop signal "
                 "(it will exit without unmounting)", successor.pid)
        for server in (self.spare, self.next):
            if server is not None:
                self._discard(server)
        self.next = None
        if self.listener is not None:
            self._selector_drop(self.listener)
            self.listener.close(unlink=False)  # the path is the successor's socket now
            self.listener = None
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # the successor holds the same lock
            self.lock_fd = -1
        if self.stop_pending is not None:
            self._exit_handed_over()
            return
        self._release_successor()

    def _draining(self) -> list[Server]:
        """Servers whose channel is still open: after a hand-over, the stopped one answering the
        reads it had taken."""
        return [key.data for key in self._selector.get_map().values() if isinstance(key.data, Server)]

    def _release_successor(self) -> None:
        """Once our stopped server is gone (it may still be answering reads), tell the successor."""
        if self.successor is None or self._draining():
            return
        self.successor.channel.send("released")
        self._selector_drop(self.successor.channel)
        self.successor = None

    def _exit_handed_over(self) -> None:
        """Exit without unmounting; a server of ours still answering reads gets `abort_after`
        seconds, then is killed and the successor asked to have its reads resent."""
        log.info("exiting; the mount stays (the successor holder serves it)")
        draining = self._draining()
        servers = [s for s in (*draining, *self.retired) if s is not None]
        if not _wait_all(servers, self.abort_after):
            for server in servers:
                _kill(server.pid, signal.SIGKILL)
            _wait_all(servers, self.abort_after)
            if draining and self.successor is not None:
                self.successor.channel.send("resend")
        self._finish(0)

    def _successor_gone(self) -> None:
        """The successor went away (or was refused) before it served: this holder serves on."""
        successor = self.successor
        assert successor is not None
        self.successor = None
        self._selector_drop(successor.channel)
        if successor.phase == "retired":
            return
        if successor.phase == "stopping":
            log.warning("holder pid %d went away during the hand-over: serving on here", successor.pid)
        elif successor.phase == "sent":
            log.warning("holder pid %d went away after it got the mount's state: serving on here", successor.pid)
            keys = {json.dumps(key): key for key, _ in successor.nodes}
            keys.update((json.dumps(key), key) for key in self.nodes.values())
            self.handed = [[key, CRASH_COUNT] for key in keys.values()]
            self.handed_files = successor.files  # what it opened since: in the open-files journal (shared root)
            self.handed_unanswered = True  # what its server read and did not answer is resent to ours
            nxt, self.spare = self.spare, None
            if nxt is None or nxt.phase not in ("preparing", "prepared"):
                nxt = self._spawn()
            self.current = nxt
            if nxt.phase == "prepared":
                self._go(nxt)
        elif successor.phase == "connected":
            log.warning("holder pid %d went away before it was ready: serving on here", successor.pid)
        if self.stop_pending is not None:
            self.stop_pending = None
            self._signals.append(signal.SIGTERM)  # the stop it waited for: a real one now

    def _selector_drop(self, channel: Channel | Listener) -> None:
        try:
            self._selector.unregister(channel.sock)
        except (KeyError, ValueError):
            pass
        if isinstance(channel, Channel):
            channel.close()

    # -- between holders: taking the mount over from a predecessor ------------------------------

    def _read_predecessor(self) -> None:
        predecessor = self.predecessor
        assert predecessor is not None
        messages = _receive(predecessor.channel)
        for message in messages or ():
            op = message.get("op")
            if op == "state":
                self._adopt_predecessor_state(message)
            elif op == "resend":
                if self.current is not None and self.current.phase == "serving":
                    self.current.channel.send("resend")
                else:
                    self.handed_unanswered = True
            elif op == "released":
                log.info("the previous holder pid %d let the mount go", predecessor.pid)
        if messages is None:
            self._selector_drop(predecessor.channel)
            self.predecessor = None
            if self.taking_over and self.state is None:
                log.error("the previous holder pid %d went away before handing the mount over: it keeps it; "
                          "exiting", predecessor.pid)
                self._finish(EXIT_SERVER_FAILED)

    def _adopt_predecessor_state(self, message: dict[str, Any]) -> None:
        self.state = message["state"]
        self.handed = message.get("nodes") or []
        self.handed_files = message.get("files")
        self.handed_unanswered = bool(message.get("resend"))
        self.nodes = {int(i): key for i, key in message.get("reported") or ()}
        self.uses = message.get("uses") or []
        self.credentials = list(message.get("credentials") or [])
        self.generation = int(message.get("generation", 0))
        self.restarts = int(message.get("restarts", 0))
        self.crashes = int(message.get("crashes", 0))
        self.takeovers = int(message.get("takeovers", 0))
        self.ready_sent = True
        log.info("got the mount's state from holder pid %d: %d nodes, %d use counts",
                 self.predecessor.pid if self.predecessor else -1, len(self.handed), len(self.uses))
        if self.current is not None and self.current.phase == "prepared":
            self._go(self.current)

    def _took_over(self) -> None:
        self.taking_over = False
        self.takeovers += 1
        notify_systemd("READY=1")
        if self.predecessor is not None:
            self.predecessor.channel.send("serving")
            log.info("serving the mount taken over from holder pid %d", self.predecessor.pid)

    # -- stopping -----------------------------------------------------------------------------

    def _stop(self) -> None:
        self.stopping = True
        notify_systemd("STOPPING=1")
        servers = [s for s in (self.current, self.next, self.spare) if s is not None and s.phase != "gone"]
        for server in servers:
            server.channel.send("shutdown")
        # Opened while the mount at our path is ours: after the unmount its number may be another
        # mount's (see `open_abort_file`; a stale abort ended other stores' mounts at their start).
        abort_fd = (open_abort_file(self.device)
                    if self.device and mount_device(str(self.mountpoint)) == self.device else None)
        try:
            unmount(str(self.mountpoint))
        except MountError as e:
            log.warning("%s; detaching it lazily", e)
            try:
                unmount(str(self.mountpoint), lazy=True)
            except MountError as e2:
                log.error("%s", e2)
        if not _wait_all(servers, self.abort_after):
            log.warning("FUSE connection %s still busy after %g s; aborting it", self.device, self.abort_after)
            if abort_fd is not None:
                abort_through(abort_fd, self.device or "?")
                abort_fd = None
            if not _wait_all(servers, self.abort_after):
                log.warning("servers still busy after the unmount; killing them")
                for server in servers:
                    _kill(server.pid, signal.SIGKILL)
                _wait_all(servers, self.abort_after)
        if abort_fd is not None:
            os.close(abort_fd)
        self._finish(0)

    def _finish(self, code: int) -> None:
        owner = not self.taking_over and not self.handed_over  # a holder may unmount only a mount it serves
        if code != 0 or not owner:
            for server in (self.current, self.next, self.spare):
                if server is not None and server.proc.poll() is None:
                    _kill(server.pid, signal.SIGKILL)
                    server.proc.wait()
        if self.successor is not None:
            self._selector_drop(self.successor.channel)
            self.successor = None
        if self.listener is not None:
            self.listener.close(unlink=owner)
            self.listener = None
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        if not owner:
            self.exit_code = code
            return
        if code != 0:
            if mount_device(str(self.mountpoint)) is not None:
                try:
                    unmount(str(self.mountpoint), lazy=True)
                except MountError as e:
                    log.error("%s", e)
        try:
            (self.root / STATE_FILE).unlink()
        except FileNotFoundError:
            pass
        self.exit_code = code

    def _write_state(self) -> None:
        if self.handed_over or self.taking_over:
            return  # the state file is the serving holder's
        doc = {
            "holder_pid": os.getpid(),
            "server_pid": self.current.pid if self.current else None,
            "version": self.current.version if self.current else None,
            "generation": self.generation,
            "restarts": self.restarts,
            "crashes": self.crashes,
            "takeovers": self.takeovers,
            "standby": self.spare is not None and self.spare.phase == "prepared" and not self.spare_stale,
        }
        path = self.root / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(doc) + "\n")
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)


def _receive(channel: Channel) -> list[dict[str, Any]] | None:
    """The messages that arrived on a readable channel; None once it closed (the messages before
    its end were returned by the call before)."""
    try:
        return channel.read_available()
    except ChannelClosed:
        return None


def _wait_all(servers: list[Server], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for server in servers:
        try:
            server.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return True


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def notify_systemd(state: str) -> None:
    """`sd_notify` for `Type=notify` units (the holder is the unit's main process)."""
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
