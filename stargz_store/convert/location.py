"""Where images come from and go to: `oci:DIR[:TAG]` (an OCI image layout) or `docker://REF` (a registry)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..registry.errors import InvalidReferenceError
from ..registry.reference import Reference, parse_reference
from .errors import LocationSyntaxError

OCI_PREFIX = "oci:"
DOCKER_PREFIX = "docker://"


@dataclass(frozen=True)
class OciLocation:
    """An OCI image layout directory; `tag` is its `org.opencontainers.image.ref.name` (None = the only image)."""

    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class RegistryLocation:
    """An image in a registry; `text` is what the user wrote, kept for messages."""

    reference: Reference
    text: str

    def __str__(self) -> str:
        return f"docker://{self.reference}"


Location = OciLocation | RegistryLocation


def parse_location(text: str) -> Location:
    """Parse SRC/DST. Like skopeo, the first `:` after `oci:DIR` separates the tag, so DIR holds no `:`."""
    if text.startswith(OCI_PREFIX):
        rest = text[len(OCI_PREFIX):]
        path, sep, tag = rest.partition(":")
        if not path:
            raise LocationSyntaxError(f"{text!r}: missing directory after 'oci:' (expected oci:DIR[:TAG])")
        if sep and not tag:
            raise LocationSyntaxError(f"{text!r}: empty tag after ':' (expected oci:DIR[:TAG])")
        return OciLocation(Path(path), tag or None)
    if text.startswith(DOCKER_PREFIX):
        rest = text[len(DOCKER_PREFIX):]
        if not rest:
            raise LocationSyntaxError(f"{text!r}: missing image reference after 'docker://'")
        try:
            return RegistryLocation(parse_reference(rest), text)
        except InvalidReferenceError as exc:
            raise LocationSyntaxError(f"{text!r}: {exc}") from None
    raise LocationSyntaxError(
        f"{text!r}: unknown image location; use oci:DIR[:TAG] or docker://HOST[:PORT]/REPO:TAG"
    )
