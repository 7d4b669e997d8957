"""The process-wide garbage-collector policy for built TOC trees.

A built tree is large (~150,000 tracked tuples for 120,000 entries), immutable and acyclic, and
lives as long as its layer is open. Two things follow, both decided here (not in `formats/`,
which stays pure):

- while trees are being built, the cyclic GC is paused (`building_trees`): a build allocates ~2
  objects per entry and would trigger collections that rescan the raw records again and again,
  doubling its time. Builds in parallel threads (a resolve opens an image's layers in parallel)
  share one pause, which ends with the last of them; other threads' collections are only
  deferred meanwhile. The pause covers the TOC's fetch too (one or two ranged reads): the format
  readers fetch and build in one call and must not reach up to here.
- when the last build of a burst ends, everything alive is frozen out of the GC (`gc.freeze`):
  refcounting frees a tree, and scanning the frozen ones would cost a full collection (~30 ms
  per 120,000 entries) right after the build and again on every later one.

Whoever releases long-lived objects (the daemon, after closing layers) calls `release_frozen()`:
the frozen objects go back to the GC, one collection reclaims the cycles that held a released
tree, and the survivors are frozen again. While a build runs that collection cannot happen (it
would unfreeze and rescan the half-built tree); it is then deferred, and the end of the last
running build starts it on a thread of its own, so the layer being opened does not wait for it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
from typing import Iterator

__all__ = ["building_trees", "builds_running", "release_frozen"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_builds = 0  # builds running now
_was_enabled = False  # the GC's state when the first of them began
_collect_pending = False  # release_frozen was called while a build ran


@contextlib.contextmanager
def building_trees() -> Iterator[None]:
    """Pause the cyclic GC while the block builds trees; on the way out of the last concurrent
    block, freeze what was built (or run a deferred `release_frozen`) and restore the GC's state,
    whatever the block raised."""
    global _builds, _was_enabled, _collect_pending
    with _lock:
        if _builds == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _builds += 1
    try:
        yield
    finally:
        deferred = False
        with _lock:
            _builds -= 1
            if _builds == 0:
                deferred, _collect_pending = _collect_pending, False
                if _was_enabled:
                    gc.freeze()
                    gc.enable()
        if deferred:
            threading.Thread(target=release_frozen, name="gc-release", daemon=True).start()


def release_frozen() -> bool:
    """Hand the frozen objects back to the GC, collect once, freeze the survivors again.

    True when the collection ran now; False when builds are running: it is then deferred to the
    end of the last of them (never dropped). For a thread that may wait (the collection scans
    every live tree once)."""
    global _collect_pending
    with _lock:
        if _builds:
            _collect_pending = True
            return False
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
    log.debug("released frozen objects: %d unreachable collected", found)
    return True


def builds_running() -> int:
    """How many `building_trees` blocks are running (for tests that need a quiet moment)."""
    with _lock:
        return _builds
