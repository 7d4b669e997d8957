"""A second docker-registry in pull-through proxy mode, configured as a mirror of the first."""
from __future__ import annotations

import threading

import pytest

from stargz_store.registry import RegistryClient, RegistryConfig, parse_reference
from stargz_store.registry.client import sha256_digest
from stargz_store.registry.config import HostConfig, MirrorConfig
from tests.fixtures.answered import AnsweredRequests
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.registry import Registry, need_registry_binary

from .imagetools import push_image, random_blob


@pytest.fixture
def mirror(private_registry, tmp_path):
    need_registry_binary()
    reg = Registry(tmp_path / "mirror", extra_config=f"proxy:\n  remoteurl: {private_registry.url}\n")
    reg.start()
    yield reg
    reg.stop()


def test_pull_through_mirror_then_origin(private_registry, mirror):
    origin = private_registry
    ref = parse_reference(f"{origin.host}/mirrored/app:v1")
    layer = random_blob(100_000)
    layer_digest = sha256_digest(layer)
    with RegistryClient() as direct:
        digest, _ = push_image(direct, ref, [layer])

    # mirror_race: the mirror's answers are waited for (a cold one on a loaded machine can take longer
    # than the default head start, and this test checks where each request goes)
    config = RegistryConfig(max_retries=1, min_wait=0.01, mirror_race=60.0, mirrors={origin.host: [mirror.host]})
    with RegistryClient(config) as client:
        answered = AnsweredRequests(client)
        assert client.get_manifest(ref).digest == digest
        assert client.read_blob_range(ref, layer_digest, 10, 100) == layer[10:110]
        assert client.read_blob_ranges(ref, layer_digest, [(0, 5), (90_000, 5)]) == [layer[:5], layer[90_000:90_005]]
        assert client.get_blob(ref, layer_digest) == layer
    manifest_gets = answered.urls("GET", "/manifests/v1")
    assert manifest_gets and all(f"//{mirror.host}/" in u and f"ns={origin.host}" in u for u in manifest_gets)
    # The first ranged GET is answered 200 with the whole blob (the proxy is still caching it): the
    # blob is small, so the client reads it whole and answers the multi-range read from memory.
    # Two GETs (that range, then get_blob's own), both to the mirror, none to the origin.
    blob_gets = answered.urls("GET", f"/blobs/{layer_digest}")
    assert len(blob_gets) == 2 and all(f"//{mirror.host}/" in u and f"ns={origin.host}" in u for u in blob_gets)

    mirror.stop()
    with RegistryClient(config) as client:
        answered = AnsweredRequests(client)
        assert client.get_manifest(ref).digest == digest
        assert client.read_blob_range(ref, layer_digest, 10, 100) == layer[10:110]
    assert answered.blob_gets(layer_digest, f"//{origin.host}") == 1


def test_mirror_list_order_and_rich_host_config(private_registry, mirror):
    """`hosts` mirrors (with headers) come after the plain `mirrors` list; a dead first mirror is skipped."""
    origin = private_registry
    ref = parse_reference(f"{origin.host}/mirrored/order:v1")
    with RegistryClient() as direct:
        digest, _ = push_image(direct, ref, [random_blob(10)])
    config = RegistryConfig(
        max_retries=0,
        mirror_race=60.0,
        mirrors={origin.host: ["127.0.0.1:1"]},
        hosts={origin.host: HostConfig(mirrors=[MirrorConfig(host=mirror.host, headers={"X-Test": "yes"})])},
    )
    with RegistryClient(config) as client:
        answered = AnsweredRequests(client)
        assert client.get_manifest(ref).digest == digest
        assert client.get_manifest(ref).digest == digest
        assert list(client._mirror_down_until) == ["127.0.0.1:1"], "the dead mirror is skipped for a while"
    assert len(answered.urls("GET", f"//{mirror.host}/", "/manifests/v1")) == 2


def _mirror_of(origin_host: str, mirror_host: str, **kw) -> RegistryConfig:
    return RegistryConfig(max_retries=1, min_wait=0.01, max_wait=0.05, read_timeout=300.0,
                          mirrors={origin_host: [mirror_host]}, **kw)


def test_a_mirror_that_answers_a_manifest_with_500_still_serves_blobs(private_registry, registry):
    """distribution's pull-through proxy answers 500 (or 404) to an OCI manifest asked for by tag.
    The manifest then comes from the origin, and the mirror stays in service for the image's blob
    reads (the old client skipped it host-wide for 30 s: every blob read of the node went to the
    origin). `registry` stands for a mirror that holds the image's blobs."""
    origin = private_registry
    ref = parse_reference(f"{origin.host}/mirrored/oci:v1")
    layer = random_blob(100_000)
    with RegistryClient() as direct:
        digest, _ = push_image(direct, ref, [layer])
        push_image(direct, parse_reference(f"{registry.host}/mirrored/oci:v1"), [layer])
    with FaultProxy(registry.host) as mirror:
        mirror.add_rule("status", status=500, path_contains="/manifests/", times=-1)
        with RegistryClient(_mirror_of(origin.host, mirror.host, mirror_race=60.0)) as client:
            answered = AnsweredRequests(client)
            assert client.get_manifest(ref).digest == digest
            assert client.read_blob_range(ref, sha256_digest(layer), 10, 100) == layer[10:110]
        assert mirror.requests_to("/manifests/", "GET"), "the mirror was asked for the manifest"
        assert len(mirror.requests_to(f"/blobs/{sha256_digest(layer)}", "GET")) == 1
    assert answered.blob_gets(sha256_digest(layer), f"//{origin.host}") == 0


def test_a_mirror_slow_to_answer_a_manifest_does_not_hold_up_the_lookup(private_registry, registry):
    """A pull-through mirror that misses asks the origin before it answers, and queues those round
    trips when a fleet looks the image up at once (seconds, measured). A manifest the mirror has
    not answered within `mirror_race` is asked of the origin too, and the first answer is taken:
    here the mirror's answer is held back until the lookup has returned (the old client waited
    for it up to its read timeout)."""
    origin = private_registry
    ref = parse_reference(f"{origin.host}/mirrored/slow:v1")
    with RegistryClient() as direct:
        digest, _ = push_image(direct, ref, [random_blob(1000)])
    with FaultProxy(registry.host) as mirror:
        mirror.add_rule("hold", path_contains="/manifests/", times=-1)
        with RegistryClient(_mirror_of(origin.host, mirror.host)) as client:
            got: list[str] = []
            lookup = threading.Thread(target=lambda: got.append(client.get_manifest(ref).digest))
            lookup.start()
            lookup.join(timeout=60)
            assert not lookup.is_alive(), "the lookup waited for the mirror"
            assert got == [digest]
            assert len(mirror.requests_to("/manifests/", "GET")) == 1
            mirror.release.set()
