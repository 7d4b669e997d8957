"""Local environments for demos, benchmarks and tests: a registry, a private podman, a store process.

Nothing here is used by the daemon itself. It ships with the package because `make demo` and
`make bench` need it as much as the tests do, and one implementation of each piece keeps the
three from drifting apart (a fix such as podman's short runroot then reaches all of them).
Everything runs on 127.0.0.1 and under directories the caller owns.
"""
from __future__ import annotations

from .errors import LocalEnvError
from .podman import PodmanError, podman_cleanup, podman_env, run_podman
from .registry import LocalRegistry, RegistryStartError
from .store import StoreError, StoreProcess

__all__ = [
    "LocalEnvError",
    "LocalRegistry",
    "PodmanError",
    "RegistryStartError",
    "StoreError",
    "StoreProcess",
    "podman_cleanup",
    "podman_env",
    "run_podman",
]
