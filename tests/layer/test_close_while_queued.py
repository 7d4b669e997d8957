"""Closing a layer while its fetches are queued behind a stalled source leaks no foreground count:
background fetch keeps getting turns on every other layer sharing the scheduler."""
from __future__ import annotations

from stargz_store.layer import LayerResolver

from .conftest import lazy_config
from .helpers import FaultySource


def test_closing_a_layer_with_queued_fetches_leaves_background_fetch_running_elsewhere(sample_layer, cache):
    # One resolver, so one FetchScheduler shared by both layers; one worker thread per layer, so
    # a second fetch on the stalled layer queues behind the first.
    config = lazy_config(max_concurrency=1, executable_fetch_limit=1 << 30, background_quiet_period=0.0,
                         background_idle_wait=0.01, background_batch_size=100_000)
    resolver = LayerResolver(None, cache, config)
    stalled = FaultySource(sample_layer.path)
    layer = resolver.open_layer_from_source(stalled, sample_layer.descriptor)
    healthy_layer = None
    try:
        stalled.reset_counters()  # the TOC was read through it: wait for the next request only
        stalled.stall = True
        assert layer.fetch_ahead(layer.toc.lookup("bin/app"))
        assert stalled.entered.wait(10)  # that fetch holds the only worker, stalled
        assert layer.fetch_ahead(layer.toc.lookup("usr/lib/lib.so"))  # queued behind it
        layer.close(timeout=0.1)  # the drain times out: the queued fetch is cancelled
        stalled.release.set()  # the stalled request ends (as a registry timeout would)

        # Another layer on the same scheduler: its background fetch gets turns and completes.
        healthy_layer = resolver.open_layer_from_source(sample_layer.source(), sample_layer.descriptor)
        cache.clear_memory()
        for c in {c.digest for e in healthy_layer.toc.files_in_blob_order() for c in e.chunks}:
            cache.discard(c)
        healthy_layer.start_background_fetch()
        assert healthy_layer.wait_background(20), "background fetch never got a turn"
        assert healthy_layer.background_state == "done"
        assert healthy_layer.stats()["background_bytes"] > 0
        assert resolver.scheduler.foreground_active == 0
        assert layer.drain(0)  # nothing of the closed layer is left counted either
    finally:
        stalled.release.set()
        layer.close()
        if healthy_layer is not None:
            healthy_layer.close()
