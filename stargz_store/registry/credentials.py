"""Where credentials come from: containers auth files, Docker's config.json, credential helpers.

Lookup order (registry.md §9.1): an explicit auth file (config or $REGISTRY_AUTH_FILE) alone if
given; otherwise ${XDG_RUNTIME_DIR}/containers/auth.json (or /run/containers/<uid>/auth.json),
${XDG_CONFIG_HOME:-~/.config}/containers/auth.json, $DOCKER_CONFIG/config.json or ~/.docker/config.json,
~/.dockercfg. The first file that yields credentials for the host wins. Secrets never reach a log.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CredentialHelperError
from .reference import DOCKER_HUB, DOCKER_HUB_ALIASES

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0
_NOT_FOUND_MESSAGE = "credentials not found in native keychain"
_DOCKER_HUB_HELPER_ADDRESS = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credentials:
    """A username/password pair or an identity (OAuth2 refresh) token. repr hides the secret."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def is_empty(self) -> bool:
        return not (self.username or self.password or self.identity_token)


def default_auth_files(env: dict[str, str] | None = None) -> list[Path]:
    """Candidate files in lookup order, given the environment (without an explicit file)."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    files: list[Path] = []
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    else:
        files.append(Path(f"/run/containers/{os.getuid()}/auth.json"))
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env["DOCKER_CONFIG"]) / "config.json" if env.get("DOCKER_CONFIG")
                 else home / ".docker" / "config.json")
    files.append(home / ".dockercfg")
    return files


def _normalize_key(key: str) -> str:
    """Strip scheme and path from a legacy/URL-style key, and fold Docker Hub aliases."""
    host = key
    if "://" in host:
        host = host.split("://", 1)[1].split("/", 1)[0]
    if host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host


def _decode_auth_entry(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict) or not entry:
        return None  # `{}` is a marker left by credential helpers
    username = entry.get("username", "") or ""
    password = entry.get("password", "") or ""
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            log.warning("ignoring an auth entry whose 'auth' field is not base64 of user:password")
            return None
        username, _, password = decoded.partition(":")
        password = password.rstrip("\x00")
    creds = Credentials(username, password, entry.get("identitytoken", "") or "")
    return None if creds.is_empty else creds


class _Lookup:
    """One lookup in progress: the threads asking for the same key meanwhile wait for its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Credentials | None = None
        self.error: BaseException | None = None


class CredentialStore:
    """Answers "which credentials for host H (and repository R)?" from files and helpers.

    Files are re-read on every lookup miss of the per-host cache; `forget(host)` drops the cache entry
    when a registry rejected what we sent, so an updated auth file is picked up without a restart.

    Thread-safe: fetch threads of many layers ask at once. Each (host, repository) is looked up
    once until it is forgotten, however many threads ask concurrently (the others wait for that
    one lookup: a credential helper is a process run, and each run may prompt or rate-limit); a
    failed lookup is not cached, and is reported to every thread that waited for it. Lookups of
    different keys run in parallel (the lock is never held during one).
    """

    def __init__(self, auth_file: str | None = None, env: dict[str, str] | None = None,
                 configured: dict[str, Credentials] | None = None) -> None:
        self._env = dict(os.environ) if env is None else env
        self._configured = {_normalize_key(k): v for k, v in (configured or {}).items()}
        explicit = auth_file or self._env.get("REGISTRY_AUTH_FILE")
        self.files = [Path(explicit)] if explicit else default_auth_files(self._env)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Credentials | None] = {}
        self._running: dict[tuple[str, str], _Lookup] = {}

    def forget(self, host: str) -> None:
        """Drop what is cached for `host`; a lookup of it still running then answers its waiters
        but is not cached (it may have read what the registry just rejected)."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == host]:
                del self._cache[key]
            for key in [k for k in self._running if k[0] == host]:
                del self._running[key]

    def lookup(self, host: str, repository: str = "") -> Credentials | None:
        key = (host, repository)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            running = self._running.get(key)
            if running is None:
                mine = self._running[key] = _Lookup()
        if running is not None:
            running.done.wait()
            if running.error is not None:
                raise running.error
            return running.result
        try:
            mine.result = self._lookup(host, repository)
        except BaseException as e:
            mine.error = e
            raise
        finally:
            with self._lock:
                if self._running.get(key) is mine:
                    del self._running[key]
                    if mine.error is None:
                        self._cache[key] = mine.result
            mine.done.set()
        return mine.result

    def _lookup(self, host: str, repository: str) -> Credentials | None:
        host = _normalize_key(host)
        if host in self._configured:
            return self._configured[host]
        for path in self.files:
            doc = self._load(path)
            if doc is None:
                continue
            creds = self._from_document(doc, host, repository, legacy=path.name == ".dockercfg")
            if creds is not None:
                log.debug("using credentials for %s from %s", host, path)
                return creds
        return None

    def _load(self, path: Path) -> dict | None:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable auth file %s: %s", path, type(exc).__name__)
            return None
        return doc if isinstance(doc, dict) else None

    def _from_document(self, doc: dict, host: str, repository: str, *, legacy: bool) -> Credentials | None:
        if legacy:
            return _match_auths(doc, host, "")
        helpers = doc.get("credHelpers") or {}
        for name, helper in helpers.items():
            if _normalize_key(name) == host and helper:
                return self._from_helper(helper, host)
        auths = doc.get("auths") or {}
        creds = _match_auths(auths, host, repository)
        if creds is not None:
            return creds
        if doc.get("credsStore"):
            return self._from_helper(doc["credsStore"], host)
        return None

    def _from_helper(self, helper: str, host: str) -> Credentials | None:
        return run_credential_helper(helper, host, env=self._env)


def _match_auths(auths: dict, host: str, repository: str) -> Credentials | None:
    """Most specific key first (host/ns/repo, host/ns, host), then any key normalising to host."""
    if not isinstance(auths, dict):
        return None
    if repository:
        parts = repository.split("/")
        for i in range(len(parts), 0, -1):
            creds = _decode_auth_entry(auths.get(f"{host}/{'/'.join(parts[:i])}"))
            if creds is not None:
                return creds
    creds = _decode_auth_entry(auths.get(host))
    if creds is not None:
        return creds
    for key, entry in auths.items():
        if _normalize_key(key) == host:
            creds = _decode_auth_entry(entry)
            if creds is not None:
                return creds
    return None


def run_credential_helper(helper: str, host: str, env: dict[str, str] | None = None) -> Credentials | None:
    """`docker-credential-<helper> get` with the server address on stdin; None when it has nothing."""
    program = f"docker-credential-{helper}"
    path_env = (env or os.environ).get("PATH")
    exe = shutil.which(program, path=path_env)
    if exe is None:
        log.warning("credential helper %s is configured for %s but not found in PATH", program, host)
        return None
    address = _DOCKER_HUB_HELPER_ADDRESS if host == DOCKER_HUB else host
    try:
        proc = subprocess.run(
            [exe, "get"], input=address.encode(), capture_output=True, timeout=HELPER_TIMEOUT,
            env=env, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialHelperError(f"credential helper {program} failed for {host}: {type(exc).__name__}") from None
    out = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        if _NOT_FOUND_MESSAGE in out or _NOT_FOUND_MESSAGE in proc.stderr.decode("utf-8", "replace"):
            return None
        # The helper's output may echo secrets: report only the exit status.
        raise CredentialHelperError(f"credential helper {program} exited with status {proc.returncode} for {host}")
    try:
        doc = json.loads(out)
        username, secret = str(doc.get("Username", "")), str(doc.get("Secret", ""))
    except (ValueError, AttributeError):
        raise CredentialHelperError(f"credential helper {program} printed invalid JSON for {host}") from None
    if username == "<token>":
        return Credentials(identity_token=secret)
    creds = Credentials(username, secret)
    return None if creds.is_empty else creds
