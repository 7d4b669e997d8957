"""Who sent a filesystem request, as far as the model cares (no FUSE here: the adapter fills it in)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """The requesting process's uid (FUSE request context).

    File permissions are the kernel's business (`default_permissions`); the model only needs to
    know whether the caller may make the store act with root's registry credentials: resolve an
    image nobody resolved yet, send `use`/`release` notifications. Only uid 0 may
    (containers/storage runs as root; a rootless design can come later).
    """

    uid: int

    @property
    def privileged(self) -> bool:
        return self.uid == 0


ROOT = Caller(0)
