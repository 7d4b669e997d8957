"""A private podman for the benchmark: `stargz_store.localenv.podman` with the benchmark's timeouts.

runc, cgroupfs, ulimits within this machine's hard limit, overlay storage under the benchmark's
run directory, a short runroot under /tmp (a long one makes podman 4.3.1 stall 20 s per
`podman run`, which would land in every measured start), an empty auth file; with
`additional_layer_store` podman asks our store for layers before downloading them. Every podman
the benchmark starts dies with it.
"""
from __future__ import annotations

import subprocess

from stargz_store.localenv.podman import PodmanError, podman_cleanup, podman_env, podman_reset, run_podman

from . import leftovers

__all__ = ["DEFAULT_TIMEOUT", "PodmanError", "cleanup", "podman", "podman_env", "reset"]

DEFAULT_TIMEOUT = 900.0


def podman(*args: str, env: dict[str, str], timeout: float = DEFAULT_TIMEOUT,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_podman(*args, env=env, timeout=timeout, check=check, preexec_fn=leftovers.die_with_parent())


def reset(env: dict[str, str]) -> None:
    """No containers, no images: the next pull starts from nothing."""
    podman_reset(env, timeout=120, preexec_fn=leftovers.die_with_parent())


def cleanup(env: dict[str, str]) -> None:
    podman_cleanup(env, timeout=120, preexec_fn=leftovers.die_with_parent())
