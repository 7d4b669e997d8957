"""The daemon's control socket: one small local request/response mechanism for commands.

Used by `stargz-store auth-helper` (credentials from Podman/CRI-O) now; meant for `status`,
`record` and restart hand-over later, each a named operation the daemon registers.

Protocol, one request per connection, UTF-8 JSON:

    client -> daemon   {"op": "<name>", ...}\\n          (one line, at most `max_request` bytes)
    daemon -> client   {"ok": true, ...}\\n              or {"ok": false, "error": "<one line>"}\\n

then the daemon closes the connection. A request must arrive complete within `io_timeout` seconds
of the connection (a client that dawdles is dropped: it never holds a worker for longer).

What must hold:
- only root or the daemon's own user talk to it: the socket file is 0600, owned by the daemon,
  inside its 0700 data root, and each connection's peer (SO_PEERCRED) must be uid 0 or the
  daemon's uid, else it gets "permission denied" and nothing runs;
- requests carry secrets (registry passwords): nothing of a request or reply body is ever logged,
  and a failing handler is logged by operation name and exception type only;
- bounded: request size, time per connection, and connections served at once (`max_connections`;
  one more is answered "busy").

This module imports only the standard library: the auth helper, which containers/image runs on
every `docker://` pull, imports it and must start fast.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

SOCKET_NAME = "store.sock"  # the Go store's default address is /var/lib/stargz-store/store.sock
# The daemon's default --root (daemon.cli.DEFAULT_ROOT; not imported from there: that module takes
# 0.4 s to import and the helper runs on every pull).
DEFAULT_ROOT = "/var/lib/stargz-store"
DEFAULT_SOCKET = f"{DEFAULT_ROOT}/{SOCKET_NAME}"
MAX_REQUEST = 64 * 1024
MAX_REPLY = 1024 * 1024
IO_TIMEOUT = 5.0
MAX_CONNECTIONS = 8
CLIENT_TIMEOUT = 5.0
SOCKET_MODE = 0o600
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Operation = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class ControlRequestError(Exception):
    """A handler refuses a request; the message (one line, no secret) goes to the client."""


class ControlError(Exception):
    """Client side: the daemon answered with an error, or answered nonsense."""


class ControlUnavailable(ControlError):
    """Client side: no daemon listens at the address (absent, stopped, or it did not answer in time)."""


def socket_path(address: str | os.PathLike[str]) -> str:
    """A unix socket path from `PATH` or `unix://PATH` (the Go store's form); other schemes are refused."""
    text = os.fspath(address)
    if text.startswith("unix://"):
        text = text[len("unix://"):]
    elif "://" in text:
        raise ValueError(f"unsupported control address {text!r}: expected a unix socket path or unix://PATH")
    if not text:
        raise ValueError("empty control socket address")
    return text


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix stream socket, from the kernel."""
    return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class ControlServer:
    """Serves `operations` (name -> handler) on a unix socket at `path`, on a thread of its own.

    A handler gets the request object (with "op") and returns the fields of the ok reply; it
    raises ControlRequestError to refuse with a message. `allowed_uids` defaults to {0, our uid}.
    """

    def __init__(self, path: str | os.PathLike[str], operations: Mapping[str, Operation], *,
                 allowed_uids: set[int] | None = None, max_request: int = MAX_REQUEST,
                 io_timeout: float = IO_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = Path(socket_path(path))
        self.operations = dict(operations)
        self.allowed_uids = set(allowed_uids) if allowed_uids is not None else {0, os.getuid()}
        self.max_request = max_request
        self.io_timeout = io_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ControlServer:
        """Bind (replacing a stale socket file), make it 0600, listen, serve. Raises OSError."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()  # left by a daemon that died; the root lock says it is not running
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            # Before listen(): until then every connect() is refused, so there is no moment in which
            # the socket is reachable with the mode bind() gave it.
            os.chmod(self.path, SOCKET_MODE)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control-socket", daemon=True)
        self._thread.start()
        log.info("control socket at %s", self.path)
        return self

    def close(self) -> None:
        """Stop accepting, remove the socket file (if it is still ours). Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            sock.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                log.warning("control socket: accept failed: %s", os.strerror(exc.errno or 0) or exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._closed.wait(0.1)  # out of descriptors: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="control-request", daemon=True).start()
            except RuntimeError:  # no thread to be had
                self._slots.release()
                self._refuse_busy(conn)

    def _refuse_busy(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(0.5)
            _send_line(conn, {"ok": False, "error": "busy: too many control requests at once"})
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        op = "?"
        try:
            deadline = time.monotonic() + self.io_timeout
            conn.settimeout(self.io_timeout)
            pid, uid, _gid = peer_credentials(conn)
            if uid not in self.allowed_uids:
                log.warning("control socket: refused a request from uid %d (pid %d)", uid, pid)
                _send_line(conn, {"ok": False, "error": "permission denied"})
                return
            try:
                request = self._read_request(conn, deadline)
                op = request["op"]
                handler = self.operations.get(op)
                if handler is None:
                    raise ControlRequestError(f"unknown operation {op[:64]!r}")
                log.debug("control socket: %s from pid %d (uid %d)", op, pid, uid)
                result = dict(handler(request))
            except ControlRequestError as exc:
                _send_line(conn, {"ok": False, "error": str(exc)})
                return
            except (socket.timeout, ConnectionError):
                raise
            except Exception as exc:  # a handler bug: the client gets a clear line, the log no secret
                log.error("control operation %s failed: %s", op, type(exc).__name__)
                _send_line(conn, {"ok": False, "error": f"{op}: internal error ({type(exc).__name__}); see the daemon's log"})
                return
            result.pop("ok", None)
            _send_line(conn, {"ok": True, **result})
        except socket.timeout:
            log.info("control socket: dropped a client that did not finish within %g s (operation %s)",
                     self.io_timeout, op)
        except OSError as exc:
            log.debug("control socket: connection failed (%s)", type(exc).__name__)
        finally:
            conn.close()
            self._slots.release()

    def _read_request(self, conn: socket.socket, deadline: float) -> dict[str, Any]:
        """One line (or everything up to EOF), at most `max_request` bytes, parsed as a JSON object with "op"."""
        data = bytearray()
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            conn.settimeout(remaining)
            piece = conn.recv(min(65536, self.max_request + 1 - len(data)))
            if not piece:
                break
            data += piece
            if len(data) > self.max_request:
                raise ControlRequestError(f"request larger than {self.max_request} bytes")
        line = bytes(data).split(b"\n", 1)[0]
        if len(line) > self.max_request:
            raise ControlRequestError(f"request larger than {self.max_request} bytes")
        try:
            request = json_object(line, "request", empty="empty request")
        except ValueError as exc:
            raise ControlRequestError(str(exc)) from None
        if not isinstance(request.get("op"), str) or not request["op"]:
            raise ControlRequestError('request has no "op"')
        return request


def json_object(data: bytes, what: str, *, empty: str, kind: str = "a JSON object") -> dict[str, Any]:
    """`data` parsed as a JSON object; ValueError("<what> is not valid JSON" ...) that never quotes it
    (requests carry secrets)."""
    if not data.strip():
        raise ValueError(empty)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be {kind}")
    return doc


def _send_line(conn: socket.socket, doc: Mapping[str, Any]) -> None:
    conn.sendall(json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n")


def call(address: str | os.PathLike[str], op: str, timeout: float = CLIENT_TIMEOUT, **fields: Any) -> dict[str, Any]:
    """Send `{"op": op, **fields}` to the daemon at `address` and return its ok reply.

    Raises ControlUnavailable when nobody listens there (or no answer within `timeout` seconds in
    all), ControlError when the daemon refused the request (its message) or answered nonsense."""
    path = socket_path(address)
    deadline = time.monotonic() + timeout
    request = json.dumps({**fields, "op": op}, separators=(",", ":")).encode("utf-8") + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(f"no stargz-store daemon at {path} ({os.strerror(exc.errno)})") from None
        except socket.timeout:
            raise ControlUnavailable(f"the stargz-store daemon at {path} did not accept within {timeout:g} s") from None
        except OSError as exc:
            raise ControlUnavailable(f"cannot connect to {path}: {os.strerror(exc.errno or 0) or type(exc).__name__}") from None
        reply = bytearray()
        failure: OSError | None = None
        try:
            sock.sendall(request)
        except socket.timeout:
            raise ControlUnavailable(f"the stargz-store daemon at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            failure = exc  # it may have answered before it stopped reading (a refusal): read that
        try:
            while b"\n" not in reply and len(reply) <= MAX_REPLY:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                piece = sock.recv(65536)
                if not piece:
                    break
                reply += piece
        except socket.timeout:
            raise ControlUnavailable(f"the stargz-store daemon at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            failure = failure or exc
        if not reply and failure is not None:
            reason = os.strerror(failure.errno or 0) if failure.errno else type(failure).__name__
            raise ControlError(f"connection to {path} failed: {reason}")
    try:
        doc = json.loads(bytes(reply).split(b"\n", 1)[0])
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ControlError(f"the daemon at {path} sent no valid reply")
    if not doc["ok"]:
        raise ControlError(str(doc.get("error") or "request refused"))
    return doc
