"""Registry client: references, auth, manifests, ranged and multi-range blob reads, pushes."""
from .client import Manifest, RegistryClient, RegistryConfig
from .config import HostConfig, MirrorConfig
from .errors import (
    AuthError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    RegistryTimeoutError,
    ShortReadError,
    UnreachableError,
)
from .reference import Reference, parse_reference

__all__ = [
    "AuthError", "HostConfig", "InvalidReferenceError", "Manifest", "MirrorConfig", "NotFoundError",
    "Reference", "RegistryClient", "RegistryConfig", "RegistryError", "RegistryTimeoutError",
    "ShortReadError", "UnreachableError", "parse_reference",
]
