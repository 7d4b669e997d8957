"""Errors of the local environment (for demos, benchmarks and tests; not used by the daemon)."""
from __future__ import annotations


class LocalEnvError(RuntimeError):
    """A helper process (registry, podman, store) did not start or failed; the message carries its log tail."""
