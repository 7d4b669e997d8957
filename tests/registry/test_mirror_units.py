"""The per-blob mirror routing and the whole-blob store on their own (no registry needed)."""
from __future__ import annotations

import random
import threading
import time

import pytest

from stargz_store.registry.config import RegistryConfig, endpoints_for
from stargz_store.registry.errors import DigestMismatchError, ShortReadError
from stargz_store.registry.routes import MAX_BACKOFF, BlobRoutes
from stargz_store.registry.whole_blobs import WholeBlob, WholeBlobStore
from tests.fixtures.waiting import wait_for

KEY = ("origin.example:5000", "app", "sha256:" + "a" * 64)


def _endpoints():
    return endpoints_for(RegistryConfig(mirrors={"origin.example:5000": ["mirror.example:5000"]}), "origin.example:5000")


def test_a_mirror_that_failed_a_blob_is_skipped_for_it_with_a_jittered_doubling_backoff():
    routes = BlobRoutes(retry_base=1.0, rng=random.Random(7))
    mirror, origin = _endpoints()
    assert routes.order(KEY, [mirror, origin]) == [mirror, origin]
    delays = [routes.failed(KEY, mirror) for _ in range(8)]
    for i, delay in enumerate(delays):
        nominal = min(MAX_BACKOFF, 2.0 ** i)
        assert 0.5 * nominal <= delay <= 1.5 * nominal
    assert len({round(d / min(MAX_BACKOFF, 2.0 ** i), 6) for i, d in enumerate(delays)}) > 1, "jittered"
    now = time.monotonic()
    assert routes.order(KEY, [mirror, origin], now) == [origin]
    assert routes.order(("r", "other", KEY[2]), [mirror, origin], now) == [mirror, origin], "per blob only"
    assert routes.order(KEY, [mirror, origin], routes.retry_at(KEY, mirror)) == [mirror, origin], "asked again"
    assert routes.failed(KEY, origin) == 0.0 and routes.order(KEY, [origin], now) == [origin]
    routes.served(KEY, mirror, None)
    assert routes.order(KEY, [mirror, origin], now) == [mirror, origin]
    assert 0.5 <= routes.failed(KEY, mirror) <= 1.5, "a success resets the back-off"


def test_first_contact_with_a_mirror_is_a_single_flight_per_blob():
    routes = BlobRoutes(retry_base=1.0)
    mirror, origin = _endpoints()
    outcomes: list[bool] = []
    probe_in = threading.Event()
    release = threading.Event()

    def probe() -> None:
        with routes.first_contact(KEY, mirror, timeout=30) as contact:
            outcomes.append(contact.go)
            probe_in.set()
            release.wait(30)
            routes.failed(KEY, mirror)  # e.g. the mirror answered with its whole body

    def follower() -> None:
        with routes.first_contact(KEY, mirror, timeout=30) as contact:
            outcomes.append(contact.go)

    first = threading.Thread(target=probe)
    first.start()
    assert probe_in.wait(30)
    followers = [threading.Thread(target=follower) for _ in range(3)]
    for t in followers:
        t.start()
    in_flight = routes._routes[KEY].probes[mirror.host]
    assert wait_for(lambda: len(in_flight._cond._waiters) == 3), "the followers wait for the probe"
    with routes.first_contact(KEY, origin, timeout=30) as contact:
        assert contact.go, "the origin is never gated"
    release.set()
    for t in [first, *followers]:
        t.join(30)
    assert outcomes == [True, False, False, False], "followers waited, then look again"
    routes.served(KEY, mirror, None)
    with routes.first_contact(KEY, mirror, timeout=0) as contact:
        assert contact.go, "a confirmed mirror needs no single flight"


def test_whole_blob_store_bounds():
    store = WholeBlobStore(per_blob_limit=100, total_limit=250, idle_ttl=60)
    assert store.start(("r", "a", "sha256:1"), "sha256:1", 101) is None, "over the per-blob limit"
    a = store.start(("r", "a", "sha256:1"), "sha256:1", 100)
    b = store.start(("r", "a", "sha256:2"), "sha256:2", 100)
    assert a is not None and b is not None and store.held_bytes() == 200
    assert store.start(("r", "a", "sha256:3"), "sha256:3", 100) is None, "the others are still arriving"
    a.fail(ShortReadError("cut"))
    assert store.start(("r", "a", "sha256:3"), "sha256:3", 100) is not None, "a failed blob makes room"
    assert store.held_bytes() == 200 and store.get(("r", "a", "sha256:1")) is None


def test_whole_blob_readers_wait_for_their_bytes_and_see_a_failure():
    blob = WholeBlob("sha256:" + "0" * 64, 10)
    with pytest.raises(ShortReadError):
        blob.read(0, 4, deadline=time.monotonic() + 0.01)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(blob.read(2, 3, deadline=time.monotonic() + 30)))
    reader.start()
    with blob._cond:
        blob._buf[:5] = b"abcde"
        blob._received = 5
        blob._cond.notify_all()
    reader.join(30)
    assert got == [b"cde"]
    blob.fail(DigestMismatchError("bad"))
    with pytest.raises(ShortReadError, match="refused"):
        blob.read(0, 2, deadline=time.monotonic() + 30)


def test_mirror_keys_from_config_toml():
    cfg = RegistryConfig.from_toml({"blob": {"whole_blob_limit_mb": 2, "whole_blob_memory_mb": 8,
                                             "mirror_retry_msec": 250, "mirror_fill_wait_msec": 1500}})
    assert (cfg.whole_blob_limit, cfg.whole_blob_memory, cfg.mirror_retry, cfg.mirror_fill_wait) == \
        (2 << 20, 8 << 20, 0.25, 1.5)
    off = RegistryConfig.from_toml({"blob": {"whole_blob_limit_mb": 0, "mirror_fill_wait_msec": 0}})
    assert off.whole_blob_limit == 0 and not WholeBlobStore(off.whole_blob_limit, off.whole_blob_memory).fits(1)
    assert off.mirror_fill_wait == 0.0
    defaults = RegistryConfig.from_toml({})
    assert (defaults.whole_blob_limit, defaults.whole_blob_memory, defaults.mirror_retry, defaults.mirror_fill_wait) == \
        (4 << 20, 32 << 20, 0.5, 0.0)
    assert defaults.mirror_race == 0.1
    assert RegistryConfig.from_toml({"blob": {"mirror_race_msec": 250}}).mirror_race == 0.25
    assert RegistryConfig.from_toml({"blob": {"mirror_race_msec": 0}}).mirror_race == 0.0


def test_background_mirror_wait_from_config_toml():
    assert RegistryConfig.from_toml({"blob": {"background_mirror_wait_msec": 5000}}).background_mirror_wait == 5.0
    assert RegistryConfig.from_toml({"blob": {"background_mirror_wait_msec": 0}}).background_mirror_wait == 0.0
    assert RegistryConfig.from_toml({}).background_mirror_wait == 30.0
