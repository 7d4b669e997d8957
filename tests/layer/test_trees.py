"""The GC policy around built TOC trees (`layer.trees`): the pause during builds leaves the GC as
it found it, parallel builds share one pause, and a release asked for during a build happens
once the build ends (deferred, never dropped)."""
from __future__ import annotations

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from stargz_store.formats.errors import InvalidTocError
from stargz_store.formats.toc import build_toc
from stargz_store.layer import release_frozen
from stargz_store.layer.trees import building_trees, builds_running

from .helpers import wait_until

D1 = "sha256:" + "1" * 64


def _file(name, size=1, offset=10):
    return {"name": name, "type": "reg", "size": size, "offset": offset, "digest": D1, "chunkDigest": D1}


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_state_is_restored(enabled):
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with building_trees():
            assert not gc.isenabled()
            build_toc([_file("f")], data_end=100)
        assert gc.isenabled() is enabled
        with pytest.raises(InvalidTocError):
            with building_trees():
                build_toc([{"name": "f", "type": "bogus"}], data_end=100)
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_parallel_builds_share_one_gc_pause():
    raw = [_file(f"d/f{i}", offset=10 + i) for i in range(3000)]
    assert gc.isenabled()
    paused: list[bool] = []

    def build(_: int):
        with building_trees():
            paused.append(not gc.isenabled())
            return build_toc(raw, data_end=10_000)

    with ThreadPoolExecutor(4) as pool:
        tocs = list(pool.map(build, range(8)))
    assert gc.isenabled() and all(paused)
    assert all(len(t) == 3002 and t.lookup("d/f2999").chunks[0].blob_end == 10_000 for t in tocs)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic GC frees it


def test_a_release_during_a_build_collects_when_the_build_ends():
    assert gc.isenabled()
    wait_until(lambda: builds_running() == 0)
    garbage = _Node()
    gone = weakref.ref(garbage)
    gc.freeze()  # as after a build: the cycle is out of the GC's sight
    del garbage
    gc.collect()
    assert gone() is not None  # frozen: a plain collection does not see it
    with building_trees():
        assert release_frozen() is False  # a build runs: deferred
        assert gone() is not None
    # The deferred collection runs on its own thread once the last build has ended.
    wait_until(lambda: gone() is None)
    assert release_frozen() is True  # nothing running: collected at once
