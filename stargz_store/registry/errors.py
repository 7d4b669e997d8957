"""Typed errors of the registry client.

Callers (the layer reader, the converter, the daemon) map these to EIO, ENOENT or a clear CLI
message in one place each. Invariant: no message ever contains a credential, a token or a presigned
URL query string; build messages with `redact_url`.
"""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class RegistryError(Exception):
    """Base class of every failure talking to a registry."""


class InvalidReferenceError(RegistryError, ValueError):
    """An image reference string does not follow the docker reference grammar."""


class NotFoundError(RegistryError):
    """The manifest, blob or repository is unknown to the registry (404, *_UNKNOWN codes)."""


class PlatformNotFoundError(NotFoundError):
    """An index has no manifest for the requested platform."""


class AuthError(RegistryError):
    """401/403 after trying every credential we have for the host."""


class UnreachableError(RegistryError):
    """Connection refused, DNS failure, TLS failure: the host could not be talked to at all."""


class RegistryTimeoutError(RegistryError):
    """A connect or read timeout persisted through every retry."""


class ShortReadError(RegistryError):
    """The registry returned fewer bytes than asked, even after retries."""


class DigestMismatchError(RegistryError):
    """Downloaded bytes do not hash to the digest that named them: never serve them."""


class UnsupportedManifestError(RegistryError):
    """A manifest media type we cannot use (e.g. Docker schema 1) or malformed manifest JSON."""


class ServerError(RegistryError):
    """The registry kept answering 5xx / 429, or an unexpected status, after retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CredentialHelperError(AuthError):
    """A `docker-credential-*` helper failed for a reason other than "no credentials"."""


def redact_url(url: str) -> str:
    """The URL without userinfo, query or fragment: presigned URLs carry their signature there."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.hostname and ":" in parts.hostname:
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RangeNotSatisfiableError(RegistryError):
    """HTTP 416: the requested range lies beyond the end of the blob."""


class RangeIgnoredError(ShortReadError):
    """A server answered a range request with the whole blob (200), too large to read through for
    the range: the answer was abandoned (a mirror is then skipped for that blob for a while)."""
