"""The channel between the restart holder and a serving process, and what travels on it.

One unix stream socket per serving process (a `socketpair` made by the holder; the server gets
its end as an inherited descriptor), carrying JSON lines `{"op": NAME, ...}`. The holder outlives
upgrades of the package, so this protocol must stay readable by older and newer versions: new
fields may be added, none removed or changed in meaning (`PROTOCOL` counts incompatible changes).

server -> holder
- `prepared` {pid, version, protocol}: the store is built; waiting for `go`.
- `init` {state}: the kernel's INIT was answered; `state` is the `fuse.ConnectionState` (dict).
- `serving` {resend}: requests are being read; `resend`: FUSE_NOTIFY_RESEND was accepted.
- `node` {id, key} / `dropped` {id}: a store node entered or left the node table (so that a
  process taking over after a crash can rebuild it: ids follow from keys).
- `uses` {uses: [[ref, key, count]...]}: every use count, after each use or release notification.
- `credentials` {document}: credentials the runtime sent (a secret: memory only, never logged).
- `stopped` {nodes: [[key, count]...], uses, drained, files}: after `stop`, nothing more is read
  from /dev/fuse and every request read was answered (`drained` false: some were not, in time);
  `files`: the open files per inode and mode with their passthrough backing ids
  (`fuse.Session.hand_over_open_files`), which belong to the connection and must be answered
  alike. An OPEN or RELEASE not yet counted when `files` is taken is never answered by the
  stopped process: the next one counts it when the kernel resends it.

holder -> server
- `go` {state, nodes, uses, credentials, files}: serve (`state` None: a fresh mount, INIT comes
  first; otherwise resume it and ask the kernel to resend what a predecessor read but did not
  answer). `files` is the stopped predecessor's; None after a crash (the new process then
  replays the dead one's `<root>/open-files.journal`).
- `stop`: stop reading requests, answer those read, send `stopped`, exit 0.
- `shutdown`: the store is being unmounted: fail waiting requests at once and exit once the
  connection has ended.

Messages a process sends before the reply to the kernel's request that caused them (a LOOKUP
answered, a `use` counted) reach the holder before the kernel knows of the result: if the process
dies a moment later, the holder still has them.

Standard library only: the holder imports it and must stay small.
"""
from __future__ import annotations

import json
import socket
import threading
from typing import Any

PROTOCOL = 1
MAX_LINE = 64 << 20  # a node table of a very busy node is a few MB at most


class ChannelClosed(Exception):
    """The other end is gone."""


class Channel:
    """JSON lines over a connected stream socket. `send` is thread-safe; `receive` (blocking)
    and `read_available` (after the socket polled readable) are for one reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._send_lock = threading.Lock()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: str, **fields: Any) -> bool:
        """Send one message; False if the other end is gone."""
        data = json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"
        with self._send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
            except OSError:
                return False
        return True

    def receive(self) -> dict[str, Any] | None:
        """The next message, waiting for it; None once the other end has closed."""
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self._append(chunk)
        return self._pop()

    def read_available(self) -> list[dict[str, Any]]:
        """The messages complete after one `recv` (call when the socket is readable). Raises
        `ChannelClosed` at the end of the stream (the messages before it were returned first)."""
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b""
        if not chunk:
            raise ChannelClosed()
        self._append(chunk)
        out = []
        while b"\n" in self._buffer:
            message = self._pop()
            if message is not None:
                out.append(message)
        return out

    def close(self) -> None:
        with self._send_lock:
            self.closed = True
        self.sock.close()

    def _append(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) > MAX_LINE and b"\n" not in self._buffer:
            raise ChannelClosed("a message larger than the channel allows")

    def _pop(self) -> dict[str, Any] | None:
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None
