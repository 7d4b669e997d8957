"""Passthrough copies of fully cached files wait until the layers' fetches have gone quiet (at most
`backing_copy_wait` seconds), so a starting container keeps the cores (layer/backing.py)."""
from __future__ import annotations

import random
import threading
import time

import pytest

from stargz_store.cache.backing_files import BackingFileStore
from stargz_store.layer.backing import BackingFiles
from stargz_store.layer.resolver import LayerResolver

from .conftest import lazy_config
from .helpers import build_layer, wait_until


@pytest.fixture
def opened(tmp_path, cache):
    """opened(files, wait): a layer of `files` opened by a resolver whose backing files defer to
    its scheduler (quiet period 0.2 s, copies wait at most `wait`); (resolver, backing, layer)."""
    layers = []

    def _open(files: dict[str, bytes], wait: float):
        built = build_layer(tmp_path / "layer.blob", files)
        backing = BackingFiles(BackingFileStore(tmp_path / "files"), cache)
        resolver = LayerResolver(None, cache, lazy_config(background_quiet_period=0.2, backing_copy_wait=wait),
                                 backing=backing)
        layer = resolver.open_layer_from_source(built.source(), built.descriptor)
        layers.append(layer)
        return resolver, backing, layer

    yield _open
    for layer in layers:
        layer.close()


@pytest.fixture
def served(opened):
    """A layer opened as `opened` does, one file of it read whole (every chunk cached)."""

    def _open(wait: float):
        files = {"bin/app": random.Random(2).randbytes(300_000)}
        resolver, backing, layer = opened(files, wait)
        entry = layer.toc.lookup("bin/app")
        assert layer.read(entry, 0, entry.size) == files["bin/app"]
        assert layer.drain(10)
        return resolver, backing, entry

    return _open


@pytest.fixture
def busy():
    """busy(resolver): a foreground fetch in flight (what a starting container's reads are)
    until the returned event is set (at the latest when the test ends)."""
    done: list[threading.Event] = []

    def _busy(resolver: LayerResolver) -> threading.Event:
        entered, release = threading.Event(), threading.Event()

        def hold():
            with resolver.scheduler.foreground():
                entered.set()
                release.wait(60)

        threading.Thread(target=hold, daemon=True).start()
        assert entered.wait(5)
        done.append(release)
        return release

    yield _busy
    for release in done:
        release.set()


def test_a_copy_waits_for_the_fetches_to_go_quiet(served, busy):
    resolver, backing, entry = served(wait=60.0)
    fetching = busy(resolver)
    backing.offer(entry)
    wait_until(lambda: backing.stats()["deferred"] == 1)  # the worker got to it, and waits
    assert backing.lookup(entry) is None  # not while a fetch is in flight
    fetching.set()
    assert backing.wait_idle(30)
    assert backing.lookup(entry) is not None  # made once they were quiet


def test_a_copy_waits_no_longer_than_told(served, busy):
    resolver, backing, entry = served(wait=0.5)
    busy(resolver)  # never quiet
    began = time.monotonic()
    backing.offer(entry)
    wait_until(lambda: backing.lookup(entry) is not None, timeout=10)
    assert 0.5 <= time.monotonic() - began < 10  # it waited as long as told, then copied anyway
    assert backing.stats()["deferred"] == 1


def test_with_no_wait_a_copy_is_made_at_once(served, busy):
    resolver, backing, entry = served(wait=0.0)
    busy(resolver)
    backing.offer(entry)
    assert backing.wait_idle(10)
    assert backing.lookup(entry) is not None
    assert backing.stats()["deferred"] == 0


def test_a_walk_of_many_files_keeps_every_copy_while_they_wait(opened, busy):
    """A walk releases files faster than waiting copies are made: none is dropped (at a bound of
    4,096 a 20,000-file walk kept 4,101 and the next walk was served READ by READ)."""
    files = {f"d{i % 50}/f{i}": f"{i}\n".encode() for i in range(5000)}
    resolver, backing, layer = opened(files, wait=60.0)
    fetching = busy(resolver)
    entries = [layer.toc.lookup(name) for name in files]
    for entry in entries:
        assert layer.read(entry, 0, entry.size) == files[entry.name]
        backing.offer(entry)  # what the release of a walked file does
    fetching.set()
    assert backing.wait_idle(120)
    assert sum(backing.lookup(entry) is not None for entry in entries) == len(files)
