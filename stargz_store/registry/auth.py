"""Registry authentication: WWW-Authenticate parsing, Basic, and the Bearer token flow.

One `Authorizer` per client. It remembers the challenge each endpoint host answered with, so later
requests carry credentials up front, and caches Bearer tokens per (host, realm, service, scope,
credentials) until they expire or the registry rejects them. Credentials are only ever sent to the
host they are configured for and to the token realm that host names. No secret is logged or put in
an error.

Which credentials: those the runtime sent for the exact image reference of the request, when the
transport allows them for this request (the reference's own registry, never a mirror); else those
of the auth files and config for the endpoint's host (`CredentialStore`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import requests
import urllib3

from .credentials import Credentials, CredentialStore
from .runtime_credentials import RuntimeCredentials
from .errors import AuthError, RegistryError, RegistryTimeoutError, ServerError, UnreachableError, redact_url

log = logging.getLogger(__name__)

MAX_TOKEN_RESPONSE = 1 << 20
MIN_TOKEN_LIFETIME = 60.0
TOKEN_EXPIRY_MARGIN = 5.0
CLIENT_ID = "stargz-store-python"


class TransientError(Exception):
    """A failure worth retrying; `final` is what the caller gets when retries run out."""

    def __init__(self, final: RegistryError, retry_after: float | None = None) -> None:
        super().__init__(str(final))
        self.final = final
        self.retry_after = retry_after


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge; `scheme` is lower case, parameter names too."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in " \t,=\"":
        i += 1
    return text[start:i], i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """`i` points after the opening quote; backslash escapes the next character (RFC 7230)."""
    out = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return "".join(out), i


def parse_www_authenticate(headers: str | Iterable[str]) -> list[Challenge]:
    """Parse one or several header values into challenges, tolerating several per line.

    `Bearer realm="a,b",service=x, Basic realm=y` yields two challenges; token68 values are ignored.
    """
    values = [headers] if isinstance(headers, str) else list(headers)
    challenges: list[Challenge] = []
    for text in values:
        i = 0
        scheme = ""
        params: dict[str, str] = {}
        while i < len(text):
            i = _skip_ws(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            token, j = _read_token(text, i)
            if not token:
                i = j + 1
                continue
            k = _skip_ws(text, j)
            if k < len(text) and text[k] == "=" and scheme:
                k = _skip_ws(text, k + 1)
                if k < len(text) and text[k] == '"':
                    value, k = _read_quoted(text, k + 1)
                else:
                    value, k = _read_token(text, k)
                params[token.lower()] = value
                i = k
            else:
                if scheme:
                    challenges.append(Challenge(scheme, params))
                scheme, params = token.lower(), {}
                i = j
        if scheme:
            challenges.append(Challenge(scheme, params))
    return challenges


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Bearer over Basic; unknown schemes are ignored."""
    for wanted in ("bearer", "basic"):
        for ch in challenges:
            if ch.scheme == wanted:
                return ch
    return None


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _fingerprint(creds: Credentials | None) -> str | None:
    """Tells credentials apart in the token cache without keeping the secret in the key: a token got
    with one password or identity token is never reused for another (e.g. a refreshed one)."""
    if creds is None:
        return None
    material = "\0".join((creds.username, creds.password, creds.identity_token)).encode("utf-8")
    return hashlib.sha256(material).hexdigest()


@dataclass
class _Token:
    value: str
    expires_at: float  # time.monotonic() deadline


class Authorizer:
    """Chooses the `Authorization` header for a request and reacts to 401 answers."""

    def __init__(
        self,
        session: requests.Session,
        credentials: CredentialStore,
        timeout: Callable[[], tuple[float, float]],
        verify: Callable[[str], bool | str],
        retry: Callable[[Callable[[], _Token], str], _Token],
        runtime_credentials: RuntimeCredentials | None = None,
    ) -> None:
        self._session = session
        self._retry = retry
        self._credentials = credentials
        self._runtime = runtime_credentials
        self._timeout = timeout
        self._verify = verify
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple, _Token] = {}
        self._lock = threading.Lock()
        self._fetch_locks: dict[tuple, threading.Lock] = {}

    def known_challenge(self, host: str) -> Challenge | None:
        return self._challenges.get(host)

    def authorization(self, host: str, repository: str, actions: tuple[str, ...], use_credentials: bool,
                      runtime_reference: str | None = None) -> str | None:
        """The header value to send to `host` now, or None to go anonymous (no challenge seen yet).

        `runtime_reference`: the image reference whose runtime credentials this request may carry
        (the caller decides it is a request to that reference's own registry), None for none."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        creds = self._lookup(host, repository, runtime_reference) if use_credentials else None
        if challenge.scheme == "basic":
            if creds is None or not creds.username:
                raise AuthError(f"{host} requires Basic authentication and no credentials are configured for it")
            return basic_header(creds)
        scopes = self._scopes(challenge, repository, actions)
        return "Bearer " + self._token(host, challenge, scopes, creds)

    def _lookup(self, host: str, repository: str, runtime_reference: str | None) -> Credentials | None:
        """Runtime credentials of the exact reference first, then the files and config for the host."""
        if runtime_reference is not None and self._runtime is not None:
            creds = self._runtime.lookup(runtime_reference)
            if creds is not None:
                return creds
        return self._credentials.lookup(host, repository)

    def handle_unauthorized(self, host: str, response: requests.Response, repository: str,
                            actions: tuple[str, ...]) -> None:
        """Learn the challenge of a 401 and drop the token that was refused, so the retry re-authorises."""
        challenge = pick_challenge(parse_www_authenticate(response.headers.get("WWW-Authenticate", "")))
        with self._lock:
            if challenge is not None:
                self._challenges[host] = challenge
            else:
                challenge = self._challenges.get(host)
            if challenge is None:
                raise AuthError(f"{host} answered 401 without a usable WWW-Authenticate challenge")
            if challenge.scheme == "bearer":
                for key in [k for k in self._tokens if k[0] == host]:
                    del self._tokens[key]
        if challenge.scheme == "basic":
            self._credentials.forget(host)

    def _scopes(self, challenge: Challenge, repository: str, actions: tuple[str, ...]) -> tuple[str, ...]:
        scopes = {f"repository:{repository}:{','.join(actions)}"} if repository else set()
        if challenge.params.get("error") == "insufficient_scope" and challenge.params.get("scope"):
            scopes.update(challenge.params["scope"].split())
        if not scopes and challenge.params.get("scope"):
            scopes.update(challenge.params["scope"].split())
        return tuple(sorted(scopes))

    def _token(self, host: str, challenge: Challenge, scopes: tuple[str, ...], creds: Credentials | None) -> str:
        key = (host, challenge.realm, challenge.params.get("service", ""), scopes, _fingerprint(creds))
        with self._lock:
            token = self._tokens.get(key)
            if token and token.expires_at > time.monotonic():
                return token.value
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:
            with self._lock:
                token = self._tokens.get(key)
                if token and token.expires_at > time.monotonic():
                    return token.value
            token = self._fetch_token(host, challenge, scopes, creds)
            with self._lock:
                self._tokens[key] = token
            return token.value

    def _fetch_token(self, host: str, challenge: Challenge, scopes: tuple[str, ...],
                     creds: Credentials | None) -> _Token:
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{host} sent a Bearer challenge without a usable realm")
        return self._retry(lambda: self._fetch_token_once(host, challenge, scopes, creds),
                           f"token for {host} from {redact_url(realm)}")

    def _fetch_token_once(self, host: str, challenge: Challenge, scopes: tuple[str, ...],
                          creds: Credentials | None) -> _Token:
        realm = challenge.realm
        service = challenge.params.get("service")
        where = redact_url(realm)
        kwargs = dict(timeout=self._timeout(), verify=self._verify(realm), allow_redirects=True, stream=True)
        try:
            resp = None
            if creds is not None and creds.identity_token:
                # An identity token is an OAuth2 refresh token: only the POST form flow accepts it.
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": CLIENT_ID, "scope": " ".join(scopes)}
                if service:
                    form["service"] = service
                resp = self._session.post(realm, data=form, **kwargs)
                if resp.status_code in (404, 405):
                    resp.close()
                    resp = None  # no OAuth2 endpoint: fall back to the GET flow below
            if resp is None:
                params: list[tuple[str, str]] = [("scope", s) for s in scopes]
                if service:
                    params.insert(0, ("service", service))
                auth = None
                if creds is not None and creds.username and creds.password:
                    params.append(("account", creds.username))
                    auth = (creds.username, creds.password)
                resp = self._session.get(realm, params=params, auth=auth, **kwargs)
        except requests.exceptions.Timeout:
            raise TransientError(RegistryTimeoutError(f"token server {where} timed out")) from None
        except requests.exceptions.RequestException as exc:
            raise TransientError(UnreachableError(f"token server {where} unreachable: {type(exc).__name__}")) from None
        with resp:
            if resp.status_code in (401, 403):
                who = "the configured credentials" if creds else "anonymous access"
                raise AuthError(f"token server {where} refused {who} for {host} (HTTP {resp.status_code})")
            if resp.status_code == 429 or resp.status_code >= 500:
                raise TransientError(ServerError(f"token server {where} answered HTTP {resp.status_code}",
                                                 resp.status_code))
            if resp.status_code != 200:
                raise ServerError(f"token server {where} answered HTTP {resp.status_code}", resp.status_code)
            try:
                body = resp.raw.read(MAX_TOKEN_RESPONSE + 1, decode_content=True)
            except (urllib3.exceptions.HTTPError, OSError):
                raise TransientError(UnreachableError(f"token server {where}: connection broken")) from None
        if len(body) > MAX_TOKEN_RESPONSE:
            raise AuthError(f"token server {where} sent a response over {MAX_TOKEN_RESPONSE} bytes")
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or MIN_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"token server {where} sent an invalid token response") from None
        if not value or not isinstance(value, str):
            raise AuthError(f"token server {where} sent no token")
        # Expiry is measured from receipt on our monotonic clock: immune to clock skew with the server.
        lifetime = max(lifetime, MIN_TOKEN_LIFETIME)
        log.debug("got a token for %s scopes %s valid %.0fs", host, scopes, lifetime)
        return _Token(value, time.monotonic() + lifetime - TOKEN_EXPIRY_MARGIN)
