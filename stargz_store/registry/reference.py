"""Docker-style image references: parsing and normalisation (distribution/reference rules).

`ubuntu` means `docker.io/library/ubuntu:latest`; the first path component is a registry host only
when it is `localhost` or contains `.` or `:` (or upper case, which a repository cannot have).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    """A fully normalised reference. Blob calls use only `registry` and `repository`."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_ref(self) -> str:
        """What goes after `/manifests/`: the digest when pinned (it wins over the tag), else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        """Same repository at `tag`; any digest is dropped because it would win over the tag."""
        _check_tag(tag)
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        """Same repository pinned to `digest` (the tag, if any, is kept for display and pushes)."""
        check_digest(digest)
        return replace(self, digest=digest)


def check_digest(digest: str) -> None:
    """Raise InvalidReferenceError unless `digest` is `algorithm:hex`; sha256 must be 64 lower hex."""
    if not _DIGEST_RE.match(digest):
        raise InvalidReferenceError(f"invalid digest {digest!r}: expected 'sha256:<64 hex digits>'")
    if digest.startswith("sha256:") and not _SHA256_RE.match(digest):
        raise InvalidReferenceError(f"invalid sha256 digest {digest!r}: expected 64 lower-case hex digits")


def _check_tag(tag: str) -> None:
    if not _TAG_RE.match(tag):
        raise InvalidReferenceError(
            f"invalid tag {tag!r}: up to 128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )


def is_registry_host(text: str) -> bool:
    """True for what a reference's registry part may be: `host[:port]`, an IP or `[IPv6][:port]`."""
    return bool(_DOMAIN_RE.match(text))


def normalize_registry(host: str) -> str:
    """`index.docker.io` and `registry-1.docker.io` name Docker Hub: `docker.io`."""
    return DOCKER_HUB if host.lower() in DOCKER_HUB_ALIASES else host


def parse_reference(text: str) -> Reference:
    """Parse and normalise `text` as Docker does; raise InvalidReferenceError saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError("empty image reference")
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    if any(c.isspace() for c in text):
        raise InvalidReferenceError(f"invalid reference {original!r}: contains whitespace")

    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        check_digest(digest)

    tag: str | None = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        _check_tag(tag)

    if not text:
        raise InvalidReferenceError(f"invalid reference {original!r}: no repository name")
    first, sep, rest = text.partition("/")
    if sep and (first == "localhost" or "." in first or ":" in first or first != first.lower()):
        registry, path = first, rest
        if not _DOMAIN_RE.match(registry):
            raise InvalidReferenceError(f"invalid reference {original!r}: bad registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, text
    registry = normalize_registry(registry)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"

    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            hint = " (repository names must be lower case)" if component != component.lower() else ""
            raise InvalidReferenceError(
                f"invalid reference {original!r}: bad repository path component {component!r}{hint}"
            )
    if len(registry) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReferenceError(f"invalid reference {original!r}: name longer than {MAX_NAME_LENGTH}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
