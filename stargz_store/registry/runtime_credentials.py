"""Credentials the container runtime hands over per image reference (`additional-layer-store-auth-helper`).

containers/image 5.32+ (Podman 5.1+, CRI-O) runs a helper on every `docker://` source open with
`{"<reference>": {"username": ..., "password": ..., "identityToken": ...}}` on stdin (ALS spec
§9.6); the helper passes it to the daemon's control socket, which stores it here.

What must hold:
- memory only: nothing here is ever written to disk, logged, or put into an error or a repr;
- keyed by the exact (canonical) reference string: an entry is used for requests made for that
  reference alone, and the transport uses it only towards the reference's own registry, never a
  mirror (`transport.runtime_reference`);
- every call replaces what the runtime said before about a reference; an entry with no secret
  removes it (the runtime now pulls that reference anonymously, e.g. after `podman logout`);
- `identityToken` wins over username/password: it is an OAuth2 refresh token, sent with an empty
  user (as the Go store's keychain does);
- bounded: at most `max_entries`, the least recently refreshed entry goes first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Mapping

from .credentials import Credentials
from .errors import InvalidReferenceError
from .reference import parse_reference

DEFAULT_MAX_ENTRIES = 1024
_FIELDS = {"username": "username", "password": "password", "identityToken": "identity_token"}


class RuntimeCredentialsError(ValueError):
    """What a runtime sent is not the helper's JSON; the message never contains a secret."""


def parse_helper_document(doc: Any) -> dict[str, Credentials | None]:
    """`{"<ref>": {"username", "password", "identityToken"}}` -> canonical ref -> credentials (None: no secret).

    Raises RuntimeCredentialsError naming the reference or field that is wrong, never a value."""
    if not isinstance(doc, Mapping):
        raise RuntimeCredentialsError("credentials must be a JSON object of image reference -> credentials")
    parsed: dict[str, Credentials | None] = {}
    for ref_text, entry in doc.items():
        try:
            ref = str(parse_reference(ref_text))
        except InvalidReferenceError as exc:
            raise RuntimeCredentialsError(f"invalid image reference in credentials: {exc}") from None
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            raise RuntimeCredentialsError(f"credentials for {ref} must be a JSON object")
        values: dict[str, str] = {}
        for key, name in _FIELDS.items():
            value = entry.get(key, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise RuntimeCredentialsError(f"credentials for {ref}: {key} must be a string")
            values[name] = value
        if values["identity_token"]:
            creds: Credentials | None = Credentials(identity_token=values["identity_token"])
        elif values["username"] or values["password"]:
            creds = Credentials(values["username"], values["password"])
        else:
            creds = None
        parsed[ref] = creds
    return parsed


class RuntimeCredentials:
    """Thread-safe map of canonical image reference -> credentials from the runtime."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Credentials] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RuntimeCredentials({len(self)} references)"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def update(self, entries: Mapping[str, Credentials | None]) -> list[str]:
        """Apply what the runtime sent (from `parse_helper_document`); returns the references whose
        credentials changed (added, replaced by different ones, or removed)."""
        changed: list[str] = []
        with self._lock:
            for ref, creds in entries.items():
                old = self._entries.pop(ref, None)
                if creds is not None:
                    self._entries[ref] = creds  # (re)inserted last: the most recently refreshed
                if old != creds:
                    changed.append(ref)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return changed

    def lookup(self, reference: str) -> Credentials | None:
        """The credentials for exactly this canonical reference string, or None."""
        with self._lock:
            return self._entries.get(reference)

    def references(self) -> list[str]:
        """The references that have credentials, oldest first (references are not secret)."""
        with self._lock:
            return list(self._entries)
