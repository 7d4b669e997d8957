"""The image pool's settings (filled from config.toml by `daemon.config`; defaults here)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolConfig:
    """Times in seconds; sizes bound the pool's bookkeeping (see `images`, `handles`)."""

    resolve_timeout: float = 30.0  # the longest a lookup waits for an image or layer (stargz-store: 30 s)
    negative_ttl: float = 10.0  # how long a failed resolution is answered from memory
    release_grace: float = 120.0  # an idle layer (nothing holds it) is closed this long after it became idle
    idle_layers: int = 64  # idle layers kept open at most (least recently used closed first)
    max_images: int = 256  # images (and remembered failures) kept; beyond, unused ones are forgotten
    max_use_counts: int = 65536  # (ref, layer) use notifications counted at most
    resolve_workers: int = 8  # layers opened in parallel (TOC fetch + prefetch)
    platform: str | None = None  # None = the host platform
