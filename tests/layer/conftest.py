from __future__ import annotations

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.layer import LayerConfig, LayerResolver

from .helpers import BuiltLayer, build_layer, sample_files


@pytest.fixture(scope="module")
def sample_layer(tmp_path_factory) -> BuiltLayer:
    """One eStargz blob with prioritized files, 64 KiB chunks; shared read-only by a module."""
    d = tmp_path_factory.mktemp("blob")
    return build_layer(d / "layer.blob", sample_files(), prioritized=("etc/hello.txt", "usr/lib/lib.so"))


@pytest.fixture
def cache(tmp_path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


def lazy_config(**kw) -> LayerConfig:
    """The production table with every fetch policy off (no prefetch, no background fetch, no
    guesses): only what a test reads is fetched. `kw` turns one back on, or changes a value."""
    return LayerConfig().with_policies(**{"fetch_timeout": 10.0, **kw})


@pytest.fixture
def open_layer(cache):
    """open_layer(built, source=None, config=None, cache=None, scheduler=None, library_worker=None, import_worker=None)
    -> (layer, source); closes them after. `scheduler` replaces the resolver's (e.g. a WatchedScheduler)."""
    opened = []

    def _open(built: BuiltLayer, *, source=None, config: LayerConfig | None = None, cache_=None, scheduler=None,
              library_worker=None, import_worker=None):
        src = source or built.source()
        resolver = LayerResolver(None, cache_ or cache, config or lazy_config(), library_worker=library_worker,
                                 import_worker=import_worker)
        if scheduler is not None:
            resolver.scheduler = scheduler
        layer = resolver.open_layer_from_source(src, built.descriptor)
        opened.append(layer)
        return layer, src

    yield _open
    for layer in opened:
        layer.close()
