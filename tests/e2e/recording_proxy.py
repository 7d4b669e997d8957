"""A pass-through HTTP proxy in front of the registry that writes down every blob request.

The registry's own access log has byte counts but no `Range` header, and the e2e tests must show
*which* bytes of a layer were fetched (none twice; all of them once background fetch is done).
This proxy changes nothing: it forwards GET and HEAD to the registry, streams the answer back
unchanged and records method, path, requested ranges, status, bytes sent and User-Agent.
Image references that name the proxy's host make both podman and the store go through it.
"""
from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it; `ranges` are inclusive byte ranges, () for a whole-blob GET;
    `authorization` the scheme of its Authorization header ("Basic", "Bearer"; "" without one),
    never the credentials."""

    method: str
    path: str
    status: int
    bytes_sent: int
    user_agent: str
    ranges: tuple[tuple[int, int], ...]
    authorization: str = ""

    @property
    def blob_digest(self) -> str | None:
        m = _BLOB_PATH.match(self.path.split("?", 1)[0])
        return m.group("digest") if m else None

    @property
    def from_podman(self) -> bool:
        """containers/image identifies itself as `containers/<version> (github.com/containers/image)`."""
        return "containers/image" in self.user_agent


def parse_range_header(value: str | None, blob_size: int | None = None) -> tuple[tuple[int, int], ...]:
    """`bytes=a-b,c-d` as ((a, b), (c, d)); suffix ranges (`-n`) need `blob_size`."""
    if not value:
        return ()
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes":
        raise ValueError(f"unsupported range unit in {value!r}")
    out = []
    for part in spec.split(","):
        start, _, end = part.strip().partition("-")
        if start == "":
            if blob_size is None:
                raise ValueError(f"suffix range {part!r} needs the blob size")
            out.append((blob_size - int(end), blob_size - 1))
        elif end == "":
            out.append((int(start), blob_size - 1 if blob_size is not None else -1))
        else:
            out.append((int(start), int(end)))
    return tuple(out)


class RecordingProxy:
    """`host` is `127.0.0.1:PORT`; `requests()` returns a snapshot of what went through so far."""

    def __init__(self, upstream_host: str) -> None:
        self.upstream_host = upstream_host
        self._log: list[Request] = []
        self._in_flight = 0
        self._idle = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-proxy", daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests(self, settle_timeout: float = 10.0) -> list[Request]:
        """Everything recorded so far, once requests being answered right now are recorded too.

        A client can have its last byte before the handler has written its record down; waiting
        for in-flight requests closes that gap, so a count taken after a container exits is complete.
        """
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=settle_timeout)
            return list(self._log)

    def _begin(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _record(self, request: Request) -> None:
        with self._idle:
            self._log.append(request)
            self._in_flight -= 1
            self._idle.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
                self._forward(send_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._forward(send_body=True)

            def _forward(self, send_body: bool) -> None:
                """Relay one request and record it exactly once, also when relaying fails."""
                proxy._begin()
                status, sent, total = 0, 0, None
                try:
                    status, sent, total = self._relay(send_body)
                finally:
                    try:
                        ranges = parse_range_header(self.headers.get("Range"), total)
                    except ValueError:
                        ranges = ((-1, -1),)  # unparseable: recorded so a test sees it, never silently whole-blob
                    scheme = self.headers.get("Authorization", "").partition(" ")[0]
                    proxy._record(Request(self.command, self.path, status, sent, self.headers.get("User-Agent", ""),
                                          ranges, scheme))

            def _relay(self, send_body: bool) -> tuple[int, int, int | None]:
                """Returns status, body bytes sent, and the blob size from Content-Range (if any)."""
                upstream = http.client.HTTPConnection(proxy.upstream_host, timeout=60)
                # Header by header: clients repeat `Accept`, and a dict would keep only the last one.
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                upstream.putheader("Host", proxy.upstream_host)
                for key, value in self.headers.items():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "host":
                        upstream.putheader(key, value)
                upstream.endheaders()
                resp = upstream.getresponse()
                length = resp.getheader("Content-Length")
                body = b"" if length is not None else resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.end_headers()
                sent = 0
                try:
                    if send_body and length is None:
                        self.wfile.write(body)
                        sent = len(body)
                    elif send_body:
                        while piece := resp.read(1 << 20):
                            self.wfile.write(piece)
                            sent += len(piece)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away; still record what it got
                finally:
                    upstream.close()
                return resp.status, sent, _total_size(resp.getheader("Content-Range"))

        return Handler


def _total_size(content_range: str | None) -> int | None:
    """The `/total` of a `Content-Range: bytes a-b/total` answer, when the registry gave one."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return None


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of inclusive ranges, sorted and coalesced."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlapping_pairs(ranges: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs of ranges that share at least one byte (what "fetched twice" means)."""
    pairs = []
    ordered = sorted(ranges)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b[0] > a[1]:
                break
            pairs.append((a, b))
    return pairs
