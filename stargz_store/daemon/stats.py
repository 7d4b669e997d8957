"""The pool's counters, and the document SIGUSR1 writes to `<root>/stats.json`.

One `PoolCounters` is shared by the pool's parts; each names what it counts. The shape of the
document is what tests and operators read (`tests/fixtures/store.py`)::

    {"pool": {<counter>: n, "images": n, "open_layers": n, ...},
     "refcounts": {"<ref> <key>": n},          # use notifications not yet released
     "layers": {"<ref>@<blob digest>": Layer.stats()},
     "fs": {"nodes": n, "open_files": n}}       # the filesystem model's bookkeeping (`StoreModel.stats`)

A metrics exporter (issue 16) reads the same sources: `PoolCounters.snapshot()`, the pool's
gauges and each open layer's `stats()`.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

COUNTERS = (
    "image_resolves",  # manifests (and configs) fetched from a registry
    "image_resolve_failures",
    "image_loads_from_disk",  # images served from kept metadata instead
    "images_dropped",  # images forgotten (and their metadata removed) beyond `max_images`
    "layer_opens",
    "layer_open_failures",
    "layers_closed",  # idle layers closed (memory freed; the disk cache stays)
    "negative_hits",  # lookups answered from a remembered failure
    "uses",
    "releases",
    "untracked_releases",  # releases of a layer no use notification was counted for (after a restart)
    "use_counts_dropped",  # use counts forgotten beyond `max_use_counts`
)


class PoolCounters:
    """Thread-safe monotonic counters, by name (`COUNTERS`)."""

    def __init__(self) -> None:
        self._values = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def layer_stats(layers: Mapping[str, Callable[[], dict]]) -> dict[str, Any]:
    """Each open layer's own counters; one that fails says so instead of breaking the document."""
    out: dict[str, Any] = {}
    for name, stats in layers.items():
        try:
            out[name] = stats()
        except Exception as e:  # counters must never break the daemon
            out[name] = {"error": str(e)}
    return out


def write_stats(document: Mapping[str, Any], root: Path) -> None:
    """`<root>/stats.json`, replaced atomically (a reader never sees half of it)."""
    path = root / "stats.json"
    tmp = root / ".stats.json.tmp"
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
    tmp.replace(path)
