"""Hand-over of a live mount from one holder to another that shares nothing with it but the data root.

Why: a Kubernetes DaemonSet's rolling update starts a NEW pod (a new holder process, in its own
PID namespace, possibly a newer image) and deletes the old one. A restart inside one holder
(`holder`, `handover`) cannot help there: the old holder dies with its pod, and with it the last
`/dev/fuse` descriptor of the mount. So the holders hand the mount over between themselves, over
a unix socket in the data root (the hostPath both pods mount):

- every holder that serves listens on `<root>/holder.sock` (published by an atomic rename, so a
  successor's socket replaces its predecessor's without a moment with none); the root is 0700,
  the socket 0600, and both ends check the other's uid (`SO_PEERCRED`: the same as their own,
  root for a system store);
- a holder started with `--takeover` whose root lock is held connects (`request_mount`), sends
  `succeed` and receives the mount's `/dev/fuse` descriptor and the root lock's open file
  (`SCM_RIGHTS`: the same lock, held by both until the old one lets go). It starts its serving
  process and, once that is built, sends `ready`;
- the old holder then does what a planned restart does (`stop` to its server: answer what was
  read, report node table and use counts) and sends the new one `state`: the negotiated
  connection state, the node table, use counts, the runtime's credentials, its counters;
- the new holder's server takes over with it (`go`), serves, and the new holder sends `serving`:
  from then on the old holder holds nothing (it closes descriptor and lock, stops its spare) and
  waits for its stop signal, on which it exits 0 WITHOUT unmounting. It does not exit on its own:
  a pod whose main process exits is restarted by the kubelet, and would take the mount back.

If the new holder goes away before `serving` (it crashed, was killed, its server could not start),
the old one serves on: before `state` nothing had changed; after it, the old holder starts a
server of its own with what it handed over (lookup counts then unknown: kept until a real stop,
as after a crash) and asks the kernel to resend what was read meanwhile (FUSE_NOTIFY_RESEND).
The new holder never unmounts before it serves. A stop signal the old holder gets while a
successor is under way waits for the outcome (bounded: `SUCCESSION_STOP_WAIT`): the successor
serving (exit without unmounting) or gone (a real stop: unmount).

Messages (JSON lines, `handover.Channel`), new -> old: `succeed` {protocol, pid, version,
mountpoint}, `ready`, `serving`; old -> new: `device` {mountpoint, pid} (with the descriptors),
`refused` {reason, retry}, `state` {state, nodes, reported, uses, credentials, resend, generation,
restarts, crashes}, `resend` (a read the old server had taken was not answered), `released`.

Standard library only: the holder imports it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

from .handover import Channel

log = logging.getLogger("stargz_store.daemon.succession")

SOCKET_NAME = "holder.sock"
PROTOCOL = 1
TAKEOVER_WAIT = 120.0  # seconds a new holder waits for a busy or starting predecessor to answer
SUCCESSION_STOP_WAIT = 90.0  # seconds a stop signal waits for a successor under way
IO_TIMEOUT = 30.0
T = TypeVar("T")


class SuccessionError(Exception):
    """The hand-over between holders cannot be made; the message says why, for an operator."""


class PredecessorBusy(SuccessionError):
    """The running holder cannot hand over now (starting, restarting, another successor): retry."""


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (`SO_PEERCRED`)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Listener(NamedTuple):
    """The socket on which a holder that serves waits for its successor."""

    sock: socket.socket
    path: Path
    inode: int

    @classmethod
    def publish(cls, root: Path) -> Listener:
        """Bind beside the final name, then rename over it: a client never finds no socket, and
        a predecessor's socket (still open in the predecessor) is simply no longer reachable."""
        path = root / SOCKET_NAME
        tmp = root / f".{SOCKET_NAME}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(4)
            inode = os.stat(tmp).st_ino
            os.replace(tmp, path)
        except OSError:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        sock.setblocking(False)
        return cls(sock, path, inode)

    def accept(self) -> socket.socket | None:
        """The next connection from a process of our own uid (others are closed, logged)."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.settimeout(IO_TIMEOUT)
        uid = peer_uid(conn)
        if uid != os.geteuid():
            log.warning("refused a holder hand-over to a process of uid %d on %s", uid, self.path)
            conn.close()
            return None
        return conn

    def close(self, unlink: bool) -> None:
        """Stop listening; with `unlink`, remove the socket file if it is still ours (not a successor's)."""
        self.sock.close()
        if not unlink:
            return
        try:
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def send_device(channel: Channel, fds: list[int], **fields: Any) -> None:
    """The `device` message with the mount's descriptor and the root lock's, in one `sendmsg`."""
    data = json.dumps({"op": "device", **fields}, separators=(",", ":")).encode() + b"\n"
    socket.send_fds(channel.sock, [data], fds)


class Predecessor(NamedTuple):
    """What a new holder got from the running one: the channel, the mount's descriptor and the
    root lock (the same open file: the lock is held as long as either holds it)."""

    channel: Channel
    fuse_fd: int
    lock_fd: int
    pid: int


def request_mount(root: Path, mountpoint: Path, version: str) -> Predecessor:
    """Connect to the holder of `root` and ask for its mount (`PredecessorBusy`: retry later)."""
    path = root / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise PredecessorBusy(f"no holder answers on {path} ({e.strerror})") from None
    except OSError as e:
        sock.close()
        raise SuccessionError(f"cannot connect to {path}: {e.strerror}") from None
    try:
        uid = peer_uid(sock)
        if uid != os.geteuid():
            raise SuccessionError(f"{path} is served by uid {uid}, not by this store's uid {os.geteuid()}: not trusted")
        channel = Channel(sock)
        channel.send("succeed", protocol=PROTOCOL, pid=os.getpid(), version=version, mountpoint=str(mountpoint))
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 2)
    except OSError as e:
        sock.close()
        raise PredecessorBusy(f"the holder on {path} did not answer: {e}") from None
    except SuccessionError:
        sock.close()
        raise
    line, _, rest = data.partition(b"\n")
    try:
        message = json.loads(line) if line else {}
    except ValueError:
        message = {}
    if message.get("op") != "device" or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        sock.close()
        if message.get("op") == "refused" and message.get("retry"):
            raise PredecessorBusy(str(message.get("reason")))
        raise SuccessionError(f"the holder on {path} refused the hand-over: {message.get('reason', 'no answer')}")
    for fd in fds:
        os.set_inheritable(fd, False)
    channel._append(rest)  # noqa: SLF001 - anything sent right after `device`
    return Predecessor(channel, fds[0], fds[1], int(message.get("pid", 0)))


def wait_for_mount(root: Path, mountpoint: Path, version: str, try_lock: Callable[[], T | None],
                   timeout: float = TAKEOVER_WAIT) -> T | Predecessor:
    """`request_mount`, retried while the running holder is busy, or what `try_lock` returns once
    it gets the root lock (no holder runs any more: start as usual). Raises `SuccessionError`
    when the mount cannot be had."""
    deadline = time.monotonic() + timeout
    reason = ""
    while time.monotonic() < deadline:
        lock = try_lock()
        if lock is not None:
            return lock
        try:
            return request_mount(root, mountpoint, version)
        except PredecessorBusy as e:
            if str(e) != reason:
                log.info("waiting for the running holder to hand over: %s", e)
                reason = str(e)
        time.sleep(0.2)
    raise SuccessionError(f"the running holder did not hand its mount over within {timeout:g} s ({reason})")
