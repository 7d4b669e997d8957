"""HTTP exchanges with registries: one pooled session, auth, scheme choice, redirects, retries.

`Transport.call` runs one logical operation: send, authorise on 401, follow redirects (dropping
Authorization and configured headers when the host changes), hand the response to a `consume`
function, and retry transient failures (connection errors, timeouts, 429, 5xx except 501, a body cut
short) with exponential back-off and jitter, bounded in count and total time. Every failure leaves
as a typed `RegistryError`.
"""
from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .auth import Authorizer, TransientError
from .config import Endpoint, RegistryConfig
from .credentials import Credentials, CredentialStore
from .hangup import Hangup, HangupAdapter, HungUp
from .multipart import parse_content_range
from .reference import Reference
from .runtime_credentials import RuntimeCredentials
from .errors import (
    AuthError,
    NotFoundError,
    RangeNotSatisfiableError,
    RegistryError,
    RegistryTimeoutError,
    ServerError,
    ShortReadError,
    UnreachableError,
    redact_url,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
_HTTPS_ONLY_MARKER = b"HTTP request to an HTTPS server"
_NOT_FOUND_CODES = {"BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UPLOAD_UNKNOWN"}


@dataclass
class Target:
    """Where a request goes: a registry endpoint plus path, or an absolute foreign URL (no auth).

    `reference`: the image the request is made for, when it is a pull; it selects the runtime's
    credentials for that reference (`runtime_reference`)."""

    endpoint: Endpoint | None
    path: str = ""
    url: str = ""
    reference: Reference | None = None


def runtime_reference(target: Target) -> str | None:
    """The reference whose runtime credentials `target` may carry: only a request to the reference's
    own registry. A mirror never gets them (the runtime gave them for that registry alone), nor does
    a foreign URL or an endpoint of another registry."""
    endpoint, ref = target.endpoint, target.reference
    if endpoint is None or ref is None or endpoint.is_mirror or endpoint.registry != ref.registry:
        return None
    return str(ref)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def registry_error_summary(resp: requests.Response) -> str:
    """`CODE: message` from a distribution-spec error body, or ''; never echoes headers."""
    try:
        body = resp.raw.read(MAX_ERROR_BODY, decode_content=True) if not resp._content_consumed else resp.content
    except Exception:  # a broken error body must not hide the status
        return ""
    try:
        errors = json.loads(body or b"{}").get("errors") or []
        first = errors[0]
        return f"{first.get('code', 'UNKNOWN')}: {first.get('message', '')}".strip().rstrip(":")
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""


def check_status(resp: requests.Response, what: str, ok: tuple[int, ...] = (200,)) -> None:
    """Map a non-`ok` status to its typed error (the body is read for the registry's error code)."""
    status = resp.status_code
    if status in ok:
        return
    summary = registry_error_summary(resp)
    detail = f"HTTP {status}" + (f" {summary}" if summary else "")
    code = summary.split(":", 1)[0] if summary else ""
    if status == 404 or code in _NOT_FOUND_CODES:
        raise NotFoundError(f"{what}: not found ({detail})")
    if status in (401, 403):
        raise AuthError(f"{what}: access denied ({detail})")
    if status == 416:
        raise RangeNotSatisfiableError(f"{what}: range not satisfiable ({detail})")
    raise ServerError(f"{what}: unexpected answer ({detail})", status)


def _no_netrc(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


class Transport:
    """Owns the pooled `requests.Session`; safe to share between threads."""

    def __init__(self, config: RegistryConfig, credentials: CredentialStore | None = None,
                 runtime_credentials: RuntimeCredentials | None = None) -> None:
        self.config = config
        self.session = requests.Session()
        # Credentials come from the auth files and helpers (`CredentialStore`); this keeps requests
        # from looking for a ~/.netrc on every request (proxy variables are still honoured).
        self.session.auth = _no_netrc
        adapter = HangupAdapter(pool_connections=16, pool_maxsize=max(1, config.pool_size), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.headers.update({
            "User-Agent": config.user_agent,
            "Docker-Distribution-API-Version": "registry/2.0",
        })
        self.credentials = credentials or CredentialStore(config.auth_file, configured={
            host: Credentials(cfg.username, cfg.password or "")
            for host, cfg in config.hosts.items() if cfg.username})
        self.runtime_credentials = runtime_credentials if runtime_credentials is not None else RuntimeCredentials()
        self.auth = Authorizer(self.session, self.credentials, self.timeout, self._verify_for_url, self.retrying,
                               self.runtime_credentials)
        self._schemes: dict[str, str] = {}  # scheme learned per endpoint host (automatic mode)
        insecure = set(config.insecure_hosts) | {h for h, c in config.hosts.items() if c.insecure}
        if insecure:
            # Verification is off only where configured; say so once instead of urllib3 per request.
            log.warning("TLS verification disabled for %s (configured insecure)", ", ".join(sorted(insecure)))
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        self.session.close()

    def timeout(self, endpoint: Endpoint | None = None) -> tuple[float, float]:
        read = endpoint.read_timeout if endpoint and endpoint.read_timeout else self.config.read_timeout
        return (self.config.connect_timeout, read)

    def _verify_for_url(self, url: str) -> bool | str:
        return self.config.ca_bundle or True

    def call(
        self,
        target: Target,
        method: str,
        consume: Callable[[requests.Response], T],
        *,
        repository: str = "",
        actions: tuple[str, ...] = ("pull",),
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Callable[[], Any] | bytes | None = None,
        what: str = "",
        follow_redirects: bool = True,
        retries: int | None = None,
        hangup: Hangup | None = None,
    ) -> T:
        """Run `consume(response)` with retries; `body` may be a factory so a retry re-reads a file.
        `hangup`: another thread may end the request before its answer comes (`HungUp` is raised
        then, never retried; see `hangup.py`)."""
        max_retries = self.config.max_retries if retries is None else retries
        deadline = time.monotonic() + self.config.max_retry_time
        attempt = 0
        auth_failures = 0
        while True:
            resp: requests.Response | None = None
            try:
                if hangup is None:
                    resp = self._send(target, method, repository, actions, headers, params, body, follow_redirects)
                else:
                    with hangup.active():
                        resp = self._send(target, method, repository, actions, headers, params, body,
                                          follow_redirects)
                    if not hangup.answered():
                        raise HungUp(f"{what}: hung up on (another answer was taken)")
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s -> HTTP %d", method, redact_url(resp.url), resp.status_code)
                _partial_marked_200(resp, headers)
                if resp.status_code == 401 and target.endpoint is not None and not getattr(resp, "redirected", False):
                    auth_failures += 1
                    if auth_failures > 2:
                        check_status(resp, what)  # raises AuthError
                    if not resp.headers.get("WWW-Authenticate") and not self.auth.known_challenge(target.endpoint.host):
                        self._ping_for_challenge(target.endpoint, resp, repository, actions)
                    self.auth.handle_unauthorized(target.endpoint.host, resp, repository, actions)
                    release(resp)
                    continue
                if resp.status_code in RETRY_STATUSES:
                    summary = registry_error_summary(resp)
                    raise TransientError(
                        ServerError(f"{what}: HTTP {resp.status_code} {summary}".rstrip(), resp.status_code),
                        parse_retry_after(resp.headers.get("Retry-After")),
                    )
                result = consume(resp)
                if result is not resp:
                    release(resp)
                return result
            except TransientError as exc:
                if resp is not None:
                    resp.close()
                attempt += 1
                self._backoff(exc, attempt, max_retries, deadline, what)
            except requests.exceptions.RequestException as exc:
                if resp is not None:
                    resp.close()
                if hangup is not None and hangup.hung_up:
                    raise HungUp(f"{what}: hung up on (another answer was taken)") from None
                mapped = self._map_exception(exc, what)
                if isinstance(exc, requests.exceptions.SSLError) or isinstance(exc, requests.exceptions.InvalidURL):
                    raise mapped from None
                attempt += 1
                self._backoff(TransientError(mapped), attempt, max_retries, deadline, what)
            except BaseException:
                if resp is not None:
                    resp.close()
                raise

    def _ping_for_challenge(self, endpoint: Endpoint, resp: requests.Response, repository: str,
                            actions: tuple[str, ...]) -> None:
        """Some registries answer 401 without a challenge except on `GET /v2/` (containers/image pings
        first for this reason): learn the challenge there."""
        base = resp.url.split("/v2/", 1)[0]
        try:
            ping = self.session.get(f"{base}/v2/", headers=dict(endpoint.headers), stream=True,
                                    timeout=self.timeout(endpoint), verify=endpoint.verify, allow_redirects=False)
        except requests.exceptions.RequestException:
            return
        try:
            if ping.status_code == 401 and ping.headers.get("WWW-Authenticate"):
                self.auth.handle_unauthorized(endpoint.host, ping, repository, actions)
        finally:
            release(ping)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` until it stops raising TransientError, under the same bounds as `call`."""
        deadline = time.monotonic() + self.config.max_retry_time
        attempt = 0
        while True:
            try:
                return fn()
            except TransientError as exc:
                attempt += 1
                self._backoff(exc, attempt, self.config.max_retries, deadline, what)

    def _backoff(self, exc: TransientError, attempt: int, max_retries: int, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if attempt > max_retries or remaining <= 0:
            raise exc.final from None
        delay = min(self.config.max_wait, self.config.min_wait * (2 ** (attempt - 1)))
        delay += random.uniform(0, delay)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        if delay > remaining:
            raise exc.final from None
        log.info("%s: %s; retry %d/%d in %.2fs", what, exc.final, attempt, max_retries, delay)
        time.sleep(delay)

    def _map_exception(self, exc: requests.exceptions.RequestException, what: str) -> RegistryError:
        name = type(exc).__name__
        if isinstance(exc, requests.exceptions.Timeout) or _wraps_read_timeout(exc):
            return RegistryTimeoutError(f"{what}: timed out ({name})")
        if isinstance(exc, requests.exceptions.SSLError):
            return UnreachableError(f"{what}: TLS failure ({_ssl_reason(exc)})")
        if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
            return ShortReadError(f"{what}: connection broken in the middle of the body ({name})")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return UnreachableError(f"{what}: cannot connect ({_connection_reason(exc)})")
        return RegistryError(f"{what}: request failed ({name})")

    def _send(self, target: Target, method: str, repository: str, actions: tuple[str, ...],
              headers: Mapping[str, str] | None, params: Mapping[str, str] | None,
              body: Callable[[], Any] | bytes | None, follow_redirects: bool) -> requests.Response:
        endpoint = target.endpoint
        hdrs: dict[str, str] = {}
        if endpoint is not None:
            hdrs.update(dict(endpoint.headers))
            authorization = self.auth.authorization(endpoint.host, repository, actions, use_credentials=True,
                                                    runtime_reference=runtime_reference(target))
            if authorization:
                hdrs["Authorization"] = authorization
        hdrs.update(headers or {})
        resp = self._send_first(target, method, hdrs, params, body)
        hops = 0
        while follow_redirects and resp.status_code in REDIRECT_STATUSES and resp.headers.get("Location"):
            hops += 1
            if hops > MAX_REDIRECTS:
                resp.close()
                raise ServerError(f"too many redirects from {redact_url(resp.url)}")
            location = urljoin(resp.url, resp.headers["Location"])
            if _origin(location) != _origin(resp.url):
                # Another host: nothing of ours (credentials, configured headers) may follow.
                hdrs = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
            if resp.status_code == 303 and method != "HEAD":
                method, body = "GET", None
            verify = endpoint.verify if endpoint and _origin(location)[1:] == _origin(resp.url)[1:] else self._verify_for_url(location)
            release(resp)
            log.debug("following redirect to %s", redact_url(location))
            resp = self.session.request(method, location, headers=hdrs, data=_body(body), stream=True,
                                        allow_redirects=False, timeout=self.timeout(endpoint), verify=verify)
            resp.redirected = True  # type: ignore[attr-defined]
        return resp

    def learn_scheme(self, endpoint: Endpoint) -> str | None:
        """Settle HTTPS-or-plain-HTTP for an automatic endpoint with one `GET /v2/`, and leave the
        connection in the pool. Raises requests exceptions when the host cannot be reached."""
        if endpoint.tls is not None or endpoint.host in self._schemes:
            return self._schemes.get(endpoint.host)
        resp = self._send_first(Target(endpoint, "/v2/"), "GET", dict(endpoint.headers), None, None)
        release(resp)
        return self._schemes.get(endpoint.host)

    def _send_first(self, target: Target, method: str, hdrs: dict[str, str],
                    params: Mapping[str, str] | None, body: Callable[[], Any] | bytes | None) -> requests.Response:
        endpoint = target.endpoint
        if endpoint is None:
            return self.session.request(method, target.url, headers=hdrs, params=params, data=_body(body),
                                        stream=True, allow_redirects=False, timeout=self.timeout(),
                                        verify=self._verify_for_url(target.url))
        scheme = self._schemes.get(endpoint.host) or endpoint.default_scheme()
        url = f"{scheme}://{endpoint.host}{target.path}"
        kwargs = dict(headers=hdrs, params=params, stream=True, allow_redirects=False,
                      timeout=self.timeout(endpoint), verify=endpoint.verify)
        automatic = endpoint.tls is None and endpoint.host not in self._schemes
        try:
            resp = self.session.request(method, url, data=_body(body), **kwargs)
        except (requests.exceptions.SSLError, requests.exceptions.ConnectionError):
            if not (automatic and scheme == "https" and endpoint.insecure):
                raise
            resp = self.session.request(method, f"http://{endpoint.host}{target.path}", data=_body(body), **kwargs)
            log.info("%s does not speak TLS; using plain HTTP as it is configured insecure", endpoint.host)
            self._schemes[endpoint.host] = "http"
            return resp
        if automatic and scheme == "http" and resp.status_code == 400 and method != "HEAD":
            if _HTTPS_ONLY_MARKER in resp.content[:4096]:
                log.info("%s speaks only HTTPS; switching to it", endpoint.host)
                self._schemes[endpoint.host] = "https"
                return self.session.request(method, f"https://{endpoint.host}{target.path}", data=_body(body),
                                            **kwargs)
        if automatic and resp.status_code < 400:
            self._schemes.setdefault(endpoint.host, scheme)
        return resp


def release(resp: requests.Response) -> None:
    """Return the connection to the pool when the rest of the body is small, else close it.

    `Response.close()` on an unread streamed body drops the connection; a HEAD or error answer would
    then cost a new TCP (and TLS) handshake on the next request.
    """
    raw = resp.raw
    try:
        remaining = getattr(raw, "length_remaining", None)
        if remaining is not None and remaining <= MAX_ERROR_BODY:
            raw.drain_conn()
            raw.release_conn()
            return
    except Exception:  # draining is an optimisation; closing is always correct
        pass
    resp.close()


def _body(body: Callable[[], Any] | bytes | None) -> Any:
    return body() if callable(body) else body


def _wraps_read_timeout(exc: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 6:
        if isinstance(cur, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return True
        nxt = cur.args[0] if cur.args and isinstance(cur.args[0], BaseException) else None
        cur = nxt or cur.__context__
        seen += 1
    return False


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "No route to host", "Connection reset", "Network is unreachable", "Remote end closed"):
        if marker in text:
            return marker
    return type(exc).__name__


def _ssl_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "hostname mismatch", "certificate verify failed"):
        if marker in text:
            return marker
    return "handshake failed"


def _partial_marked_200(resp: requests.Response, headers: Mapping[str, str] | None) -> None:
    """A 200 that carries a `Content-Range` for the range asked for is a partial answer, and is
    made a 206 here, once, for every reader of ranges: Dragonfly's dfdaemon proxy (client up to
    v1.3.8, dragonflyoss/client#1874) answers so. Read as a whole body, its bytes would be taken
    for the blob's first ones. A 200 without one (a server that ignores ranges) is left alone."""
    if resp.status_code != 200 or not headers or not any(k.lower() == "range" for k in headers):
        return
    value = resp.headers.get("Content-Range")
    if value and parse_content_range(value) is not None:
        log.debug("%s: HTTP 200 with Content-Range %s read as 206", redact_url(resp.url), value)
        resp.status_code = 206
