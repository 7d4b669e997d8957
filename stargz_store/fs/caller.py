"""Who sent a filesystem request, as far as the model cares (no FUSE here: the adapter fills it in)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """The requesting process's uid (FUSE request context).

    File permissions are the kernel's business (`default_permissions`); the model only needs to
    know whether the caller may make the store act with root's registry credentials: resolve an
    image nobody resolved yet, send `use`/`release` notifications. Only uid 0 may, and
    `store_uid`: a rootless store's own user, whose rootless Podman (root in its user namespace)
    reaches the store's FUSE mount as that uid (`idmap.Ownership.store_uid`).
    """

    uid: int
    store_uid: int = 0

    @property
    def privileged(self) -> bool:
        return self.uid == 0 or self.uid == self.store_uid


ROOT = Caller(0)
