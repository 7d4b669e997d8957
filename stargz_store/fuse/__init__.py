"""A FUSE server of our own: the kernel protocol on `/dev/fuse`, no libfuse (see `session`).

The session and journal names are loaded on first use (PEP 562 `__getattr__`): the holder process
imports `fuse.mount` only, and must not carry the session's imports (holder_main's docstring)."""
from __future__ import annotations

from typing import Any

from .mount import MountError, MountSpec, is_dead_mount, mount, unmount

_LAZY = {
    "ConnectionState": "session", "Context": "session", "DirEntry": "session", "FuseError": "session",
    "OpenReply": "session", "Operations": "session", "Session": "session", "SessionOptions": "session",
    "passthrough_permitted": "session", "OpenFilesJournal": "journal",
}

__all__ = ["ConnectionState", "Context", "DirEntry", "FuseError", "MountError", "MountSpec", "OpenFilesJournal", "OpenReply", "Operations",
           "Session", "SessionOptions", "is_dead_mount", "mount", "passthrough_permitted", "unmount"]


_SUBMODULES = frozenset({"abi", "journal", "session"})


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if name in _SUBMODULES:  # `fuse.abi` and the like, as if imported here
        return import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
