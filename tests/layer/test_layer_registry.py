"""Layer over a real docker-registry: what reaches the registry, and what still works without it."""
from __future__ import annotations

import hashlib
import uuid

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.layer import LayerConfig, LayerReadError, LayerResolver
from stargz_store.registry.client import RegistryClient
from stargz_store.registry.config import RegistryConfig
from stargz_store.registry.reference import parse_reference
from tests.fixtures.answered import AnsweredRequests
from tests.formats.expected import load_expected, load_oci_image

from .conftest import lazy_config
from .helpers import BuiltLayer


def push(registry, built_path, digest: str, client: RegistryClient):
    ref = parse_reference(f"{registry.host}/layer-test/{uuid.uuid4().hex[:12]}:latest")
    client.push_blob(ref, digest, built_path)
    return ref


@pytest.fixture
def client():
    c = RegistryClient(RegistryConfig(connect_timeout=2.0, read_timeout=5.0, max_retries=1, max_retry_time=3.0))
    yield c
    c.close()


class BlobGets(AnsweredRequests):
    """GETs of one blob that the watched clients sent and got an answer to."""

    def __init__(self, digest: str, *clients: RegistryClient) -> None:
        super().__init__(*clients)
        self.digest = digest

    @property
    def count(self) -> int:
        return self.blob_gets(self.digest)


def read_all(layer, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size + 1) == data, name


def test_open_prefetch_and_lazy_reads_over_http(registry, sample_layer: BuiltLayer, tmp_path, client):
    digest = sample_layer.result.digest
    ref = push(registry, sample_layer.path, digest, client)
    gets = BlobGets(digest, client)
    resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), lazy_config(no_prefetch=False))
    with resolver.open_layer(ref, sample_layer.descriptor) as layer:
        assert layer.drain(30)  # the prefetch streams in after the open returned
        assert gets.count == 2  # the tail, then [0, landmark)
        for name in ("etc/hello.txt", "usr/lib/lib.so"):  # prioritized: already here
            entry = layer.toc.lookup(name)
            assert layer.read(entry, 0, entry.size) == sample_layer.files[name]
        assert gets.count == 2
        entry = layer.toc.lookup("bin/app")
        c = entry.chunks[4]
        assert layer.read(entry, c.file_offset, 10) == sample_layer.files["bin/app"][c.file_offset :][:10]
        assert gets.count == 3
        read_all(layer, sample_layer.files)
        blob = sample_layer.path.read_bytes()
        assert hashlib.sha256(layer.read_blob(0, len(blob))).hexdigest() == digest.split(":")[1]


def test_after_background_fetch_the_registry_is_not_needed(private_registry, sample_layer, tmp_path, client):
    digest = sample_layer.result.digest
    ref = push(private_registry, sample_layer.path, digest, client)
    config = LayerConfig(fetch_timeout=5.0, background_batch_size=200_000)
    resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), config)
    with resolver.open_layer(ref, sample_layer.descriptor) as layer:
        assert layer.wait_background(60)
        assert layer.stats()["background_state"] == "done"
        private_registry.stop()
        read_all(layer, sample_layer.files)
        # the raw blob was never fetched: now that read fails, boundedly, instead of hanging
        with pytest.raises(LayerReadError):
            layer.read_blob(0, 100)


def test_restart_on_the_same_root_makes_no_data_request(private_registry, sample_layer, tmp_path, client):
    digest = sample_layer.result.digest
    ref = push(private_registry, sample_layer.path, digest, client)
    first_resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), lazy_config())
    with first_resolver.open_layer(ref, sample_layer.descriptor) as first:
        read_all(first, sample_layer.files)
    with RegistryClient(RegistryConfig(max_retries=1)) as fresh_client:
        gets = BlobGets(digest, client, fresh_client)
        resolver = LayerResolver(fresh_client, ChunkCache(tmp_path / "c"), lazy_config())
        with resolver.open_layer(ref, sample_layer.descriptor) as second:
            assert gets.count == 0  # the TOC bytes were kept too
            read_all(second, sample_layer.files)
            assert second.fetched_bytes() == 0
            assert second.stats()["requests"] == 0
    assert gets.count == 0


def test_restart_with_the_registry_down_serves_what_was_fetched(private_registry, sample_layer, tmp_path, client):
    digest = sample_layer.result.digest
    ref = push(private_registry, sample_layer.path, digest, client)
    fetched = {k: v for k, v in sample_layer.files.items() if k != "bin/app"}
    first_resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), lazy_config())
    with first_resolver.open_layer(ref, sample_layer.descriptor) as first:
        read_all(first, fetched)
    private_registry.stop()
    resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), lazy_config(fetch_timeout=5.0))
    with resolver.open_layer(ref, sample_layer.descriptor) as second:
        read_all(second, fetched)
        with pytest.raises(LayerReadError):
            second.read(second.toc.lookup("bin/app"), 0, 10)


def test_toc_larger_than_the_tail_window_costs_a_second_request(registry, sample_layer, tmp_path, client):
    digest = sample_layer.result.digest
    ref = push(registry, sample_layer.path, digest, client)
    gets = BlobGets(digest, client)
    resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), lazy_config(tail_size=64))
    with resolver.open_layer(ref, sample_layer.descriptor) as layer:
        assert layer.toc.lookup("bin/app") is not None
    assert gets.count == 2


def test_unreachable_registry_fails_reads_within_the_timeout(private_registry, sample_layer, tmp_path, client):
    digest = sample_layer.result.digest
    ref = push(private_registry, sample_layer.path, digest, client)
    resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), lazy_config(fetch_timeout=3.0))
    with resolver.open_layer(ref, sample_layer.descriptor) as layer:
        private_registry.stop()
        entry = layer.toc.lookup("bin/app")
        with pytest.raises(LayerReadError):
            layer.read(entry, 0, 10)
        private_registry.start()
        assert layer.read(entry, 0, 10) == sample_layer.files["bin/app"][:10]


@pytest.mark.parametrize(
    "image_name,expected_name", [("tricky-esgz", "tricky"), ("podman-zstdchunked", "podman-zstdchunked")]
)
def test_reference_image_reads_byte_exact_over_http(registry, testdata, tmp_path, client, image_name, expected_name):
    image = load_oci_image(testdata / image_name)
    oci_layer = image.layers[0]
    ref = push(registry, oci_layer.path, oci_layer.digest, client)
    expected = load_expected(testdata, expected_name)["source_layers"][0]
    # thousands of small files: let the background fetch bring them in batches, then read offline
    resolver = LayerResolver(client, ChunkCache(tmp_path / "c"), LayerConfig(fetch_timeout=10.0))
    with resolver.open_layer(ref, oci_layer.descriptor) as layer:
        assert layer.wait_background(120)
        assert layer.stats()["background_state"] == "done"
        requests = layer.stats()["requests"]
        for path, exp in expected["entries"].items():
            if exp["type"] == "reg":
                entry = layer.toc.lookup(path)
                got = layer.read(entry, 0, entry.size)
                assert hashlib.sha256(got).hexdigest() == exp["sha256"], path
        assert layer.stats()["requests"] == requests
