"""A streaming HTTP/1.1 relay in front of a registry that logs every answer it relays (for the
fleet benchmark's origin and mirror egress, and for tests that count what crossed a hop).

    python -m stargz_store.localenv.counting_proxy --listen 10.213.78.2:5000 --upstream 127.0.0.1:5001 --log FILE

Unlike the tests' fault proxy (which reads a whole answer before sending it), bodies are relayed
piece by piece as they arrive, so a client that hangs up after the bytes it wanted stops the relay
(and the upstream connection) the way it would stop the origin itself. Requests are forwarded
unchanged (the Range header included, so multi-range answers are relayed as the registry sent
them), one upstream connection per client connection. Each relayed answer is one JSON line in the
log, written when the answer ended:

    {"t": 1.5e9, "method": "GET", "path": "/v2/...", "range": "bytes=0-9", "status": 206,
     "length": 10, "sent": 10, "complete": true, "dur": 0.02, "node": "node03", "ua": "..."}

`t` is when the request arrived, `dur` how long its answer took; `sent` counts body bytes written
to the client (headers excluded; a piece whose write failed is not counted, so the link's own
counter is the exact figure of bytes that left); `complete` is false when the client or the
upstream went away before the announced length; `node` is the request's X-Fleet-Node header (absent
without one), `ua` its User-Agent (which tells a pull-through mirror's fill from a store's read).
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

# A header naming the client (the fleet benchmark gives each store its own): logged as "node".
NODE_HEADER = "X-Fleet-Node"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
PIECE = 256 << 10
UPSTREAM_TIMEOUT = 120.0


class _Log:
    """Append-only JSON lines, one writer lock, flushed per line (the benchmark reads it live)."""

    def __init__(self, path: Path | None) -> None:
        self._f: IO[str] | None = open(path, "a", buffering=1) if path else None
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._f.write(line + "\n")


def make_handler(upstream: str, log: _Log, challenge: str | None = None) -> type[BaseHTTPRequestHandler]:
    """`challenge`: answer `GET /v2/` with 401 and this WWW-Authenticate value instead of relaying it
    (see `main`'s --challenge)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stalls
        upstream_conn: http.client.HTTPConnection | None = None

        def log_message(self, *args) -> None:
            pass

        def _connection(self) -> http.client.HTTPConnection:
            if self.upstream_conn is None:
                self.upstream_conn = http.client.HTTPConnection(upstream, timeout=UPSTREAM_TIMEOUT)
                self.upstream_conn.connect()
                self.upstream_conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self.upstream_conn

        def _drop_upstream(self) -> None:
            if self.upstream_conn is not None:
                self.upstream_conn.close()
                self.upstream_conn = None

        def finish(self) -> None:
            self._drop_upstream()
            super().finish()

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if challenge and self.path == "/v2/" and self.command in ("GET", "HEAD"):
                self._challenge()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            record = {"t": time.time(), "method": self.command, "path": self.path,
                      "range": self.headers.get("Range"), "status": 0, "length": -1, "sent": 0, "complete": False}
            if self.headers.get(NODE_HEADER):
                record["node"] = self.headers[NODE_HEADER]
            record["ua"] = self.headers.get("User-Agent", "")
            try:
                resp = self._send_upstream(body, headers)
            except OSError as e:
                record["error"] = type(e).__name__
                log.write(record)
                self.send_error(502)
                return
            record["status"] = resp.status
            announced = resp.getheader("Content-Length")
            record["length"] = int(announced) if announced and announced.isdigit() else -1
            chunked = announced is None and self.command != "HEAD" and resp.status not in (204, 304)
            try:
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if self.command == "HEAD":
                    resp.read()  # nothing to read, but http.client wants the answer finished
                else:
                    self._relay_body(resp, chunked, record)
                record["complete"] = resp.isclosed()
            except (OSError, http.client.HTTPException) as e:
                record["error"] = type(e).__name__
                self.close_connection = True
                self._drop_upstream()
            finally:
                if not record["complete"]:
                    self._drop_upstream()  # its answer was not read to the end: never reuse it
                record["dur"] = round(time.time() - record["t"], 4)
                log.write(record)

        def _challenge(self) -> None:
            payload = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            self.send_response_only(401, "Unauthorized")
            self.send_header("WWW-Authenticate", challenge or "")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)
            log.write({"t": time.time(), "method": self.command, "path": self.path, "range": None, "status": 401,
                       "length": len(payload), "sent": len(payload) if self.command == "GET" else 0,
                       "complete": True, "dur": 0.0})

        def _send_upstream(self, body: bytes | None, headers: dict[str, str]) -> http.client.HTTPResponse:
            for attempt in (0, 1):
                conn = self._connection()
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    return conn.getresponse()
                except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                    self._drop_upstream()  # a kept-alive connection the upstream had closed: once more
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def _relay_body(self, resp: http.client.HTTPResponse, chunked: bool, record: dict) -> None:
            """Relays the body, counting it in record["sent"] piece by piece (so an answer cut short
            still shows what was written before the failed write)."""
            buf = bytearray(PIECE)
            view = memoryview(buf)
            while True:
                n = resp.readinto(view)
                if not n:
                    break
                if chunked:
                    self.wfile.write(b"%x\r\n" % n)
                self.wfile.write(view[:n])
                if chunked:
                    self.wfile.write(b"\r\n")
                record["sent"] += n
            if chunked:
                self.wfile.write(b"0\r\n\r\n")

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            super().handle_error(request, client_address)


class CountingProxy:
    """In-process use (tests of the benchmark): `with CountingProxy(upstream, log_path) as p: p.host`."""

    def __init__(self, upstream: str, log_path: Path | None, listen: tuple[str, int] = ("127.0.0.1", 0),
                 challenge: str | None = None) -> None:
        self.server = _Server(listen, make_handler(upstream, _Log(log_path), challenge))
        self.thread = threading.Thread(target=self.server.serve_forever, name="counting-proxy", daemon=True)

    @property
    def host(self) -> str:
        address, port = self.server.server_address[:2]
        return f"{address}:{port}"

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def read_log(path: Path, since: int = 0) -> tuple[list[dict], int]:
    """The records logged after byte offset `since`, and the offset after them (complete lines only)."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            data = f.read()
    except FileNotFoundError:
        return [], since
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, since + end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the registry")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--challenge", default=None, metavar="WWW-AUTHENTICATE",
                        help="answer GET /v2/ with 401 and this challenge, as every public registry does, "
                             "while the registry behind asks for nothing (a pull-through mirror in front "
                             "pings /v2/ before each miss, under a lock, until it has seen a challenge)")
    args = parser.parse_args(argv)
    address, _, port = args.listen.rpartition(":")
    server = _Server((address, int(port)), make_handler(args.upstream, _Log(args.log), args.challenge))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
