"""Pull, push, ranged reads and platform selection against a real plain-HTTP docker-registry."""
from __future__ import annotations

import itertools
import json

import pytest

from stargz_store.registry import (
    NotFoundError,
    RegistryClient,
    RegistryConfig,
    UnreachableError,
    parse_reference,
)
from stargz_store.registry.client import (
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    sha256_digest,
)
from stargz_store.registry.errors import (
    DigestMismatchError,
    PlatformNotFoundError,
    RangeNotSatisfiableError,
    UnsupportedManifestError,
)
from stargz_store.registry.platforms import host_platform
from tests.fixtures.answered import AnsweredRequests

from .imagetools import push_image, push_index, random_blob

_names = itertools.count()


@pytest.fixture
def client():
    with RegistryClient(RegistryConfig(max_retries=1, min_wait=0.01)) as c:
        yield c


@pytest.fixture
def repo(registry):
    """A fresh repository name per test on the shared registry."""
    return parse_reference(f"{registry.host}/plain/t{next(_names)}:latest")


@pytest.fixture
def blob(client, repo):
    data = random_blob(300_000)
    digest = sha256_digest(data)
    client.push_blob(repo, digest, data)
    return data, digest


def test_push_and_pull_image_round_trip(client, repo):
    layers = [random_blob(1000), random_blob(70_000)]
    digest, raw = push_image(client, repo, layers)
    manifest = client.get_manifest(repo)
    assert manifest.digest == digest == sha256_digest(raw)
    assert manifest.raw == raw
    assert manifest.media_type == MEDIA_TYPE_OCI_MANIFEST
    assert [layer["digest"] for layer in manifest.layers] == [sha256_digest(x) for x in layers]
    config = client.get_config(repo, manifest)
    assert config["rootfs"]["diff_ids"] == [sha256_digest(x) for x in layers]
    for layer in layers:
        assert client.get_blob(repo, sha256_digest(layer)) == layer
        assert client.blob_size(repo, sha256_digest(layer)) == len(layer)
    by_digest = client.get_manifest(repo.with_digest(digest))
    assert by_digest.raw == raw
    raw2, media_type, digest2 = client.get_raw_manifest(repo)
    assert (raw2, media_type, digest2) == (raw, MEDIA_TYPE_OCI_MANIFEST, digest)
    assert client.head_manifest(repo) == (digest, MEDIA_TYPE_OCI_MANIFEST, len(raw))


def test_docker_schema2_media_types(client, repo):
    digest, raw = push_image(client, repo, [random_blob(100)], docker=True)
    manifest = client.get_manifest(repo)
    assert (manifest.digest, manifest.media_type) == (digest, MEDIA_TYPE_DOCKER_MANIFEST)


def test_push_blob_skips_existing_and_checks_content(client, repo, registry):
    data = random_blob(5000)
    digest = sha256_digest(data)
    assert not client.blob_exists(repo, digest)
    client.push_blob(repo, digest, data)
    assert client.blob_exists(repo, digest)
    client.push_blob(repo, digest, data)  # no second upload: HEAD answers 200
    with pytest.raises(DigestMismatchError):
        client.push_blob(repo, sha256_digest(b"other"), data)


def test_chunked_push_streams_from_a_file(repo, tmp_path, registry):
    config = RegistryConfig(monolithic_push_limit=100_000, push_chunk_size=64 * 1024)
    path = tmp_path / "big.bin"
    data = random_blob(1_000_003)
    path.write_bytes(data)
    digest = sha256_digest(data)
    with RegistryClient(config) as client:
        client.push_blob(repo, digest, path)
        assert client.blob_size(repo, digest) == len(data)
        assert client.get_blob(repo, digest) == data
    log = registry.log_path.read_text()
    assert log.count(f'"PATCH /v2/{repo.repository}/blobs/uploads/') == 16  # ceil(1_000_003 / 65536)


def test_open_blob_streams_and_verifies(client, repo, blob):
    data, digest = blob
    with client.open_blob(repo, digest) as stream:
        parts = []
        while chunk := stream.read(7777):
            parts.append(chunk)
    assert b"".join(parts) == data


def test_read_blob_range_returns_exactly_the_bytes(client, repo, blob):
    data, digest = blob
    for offset, length in [(0, 1), (1000, 5000), (299_999, 1), (0, 300_000), (123, 0)]:
        assert client.read_blob_range(repo, digest, offset, length) == data[offset:offset + length]
    with pytest.raises(RangeNotSatisfiableError):
        client.read_blob_range(repo, digest, 299_990, 11)
    with pytest.raises(RangeNotSatisfiableError):
        client.read_blob_range(repo, digest, 400_000, 10)
    with pytest.raises(ValueError):
        client.read_blob_range(repo, digest, -1, 10)


def test_read_blob_tail_needs_no_size(client, repo, blob):
    data, digest = blob
    answered = AnsweredRequests(client)
    assert client.read_blob_tail(repo, digest, 13 << 10) == (len(data) - (13 << 10), len(data), data[-(13 << 10):])
    assert client.read_blob_tail(repo, digest, 1 << 20) == (0, len(data), data)  # shorter blob: all of it
    assert answered.blob_gets(digest) == 2
    with pytest.raises(NotFoundError):
        client.read_blob_tail(repo, "sha256:" + "0" * 64, 100)
    with pytest.raises(ValueError):
        client.read_blob_tail(repo, digest, 0)


def test_read_blob_ranges_uses_one_multipart_request(client, repo, blob, registry):
    data, digest = blob
    ranges = [(250_000, 100), (10, 20), (25, 100), (10, 20), (100_000, 50_000), (299_990, 10), (500, 0)]
    answered = AnsweredRequests(client)
    got = client.read_blob_ranges(repo, digest, ranges)
    assert got == [data[o:o + n] for o, n in ranges]
    assert answered.blob_gets(digest) == 1
    assert registry.host not in client._single_range_hosts


def test_single_range_mode_sends_one_request_per_region(repo, blob, registry):
    data, digest = blob
    ranges = [(0, 10), (5, 10), (1000, 10), (200_000, 10)]
    with RegistryClient(RegistryConfig(force_single_range=True)) as client:
        answered = AnsweredRequests(client)
        assert client.read_blob_ranges(repo, digest, ranges) == [data[o:o + n] for o, n in ranges]
    assert answered.blob_gets(digest) == 3  # (0,10) and (5,10) merge


def test_index_platform_selection(client, repo):
    amd, amd_raw = push_image(client, repo, [random_blob(10)], arch="amd64", tag="amd64")
    arm, arm_raw = push_image(client, repo, [random_blob(10)], arch="arm64", variant="v8", tag="arm64")
    arm7, arm7_raw = push_image(client, repo, [random_blob(10)], arch="arm", variant="v7", tag="arm7")
    index_digest, _ = push_index(client, repo, [
        (arm7, arm7_raw, {"os": "linux", "architecture": "arm", "variant": "v7"}),
        (arm, arm_raw, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (amd, amd_raw, {"os": "linux", "architecture": "amd64"}),
    ])
    _, media_type, digest = client.get_raw_manifest(repo)
    assert (media_type, digest) == (MEDIA_TYPE_OCI_INDEX, index_digest)
    assert client.get_manifest(repo, "linux/amd64").digest == amd
    assert client.get_manifest(repo, "linux/arm64").digest == arm
    assert client.get_manifest(repo, "linux/arm64/v8").digest == arm
    assert client.get_manifest(repo, "linux/arm/v7").digest == arm7
    assert client.get_manifest(repo, "linux/arm/v8").digest == arm7  # a v8 arm host runs v7
    expected = {"amd64": amd, "arm64": arm}.get(host_platform().architecture)
    if expected:
        assert client.get_manifest(repo).digest == expected
    with pytest.raises(PlatformNotFoundError, match="linux/s390x"):
        client.get_manifest(repo, "linux/s390x")
    with pytest.raises(PlatformNotFoundError):
        client.get_manifest(repo, "windows/amd64")


def test_docker_manifest_list_and_nested_index(client, repo):
    amd, amd_raw = push_image(client, repo, [random_blob(10)], docker=True, tag="one")
    inner_ref = repo.with_tag("inner")
    inner, inner_raw = push_index(client, inner_ref, [(amd, amd_raw, {"os": "linux", "architecture": "amd64"})],
                                  docker=True)
    assert client.get_raw_manifest(inner_ref)[1] == MEDIA_TYPE_DOCKER_LIST
    outer = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [
        {"mediaType": MEDIA_TYPE_DOCKER_LIST, "digest": inner, "size": len(inner_raw)}]}
    outer_ref = repo.with_tag("outer")
    client.push_manifest(outer_ref, json.dumps(outer).encode(), MEDIA_TYPE_OCI_INDEX)
    assert client.get_manifest(outer_ref, "linux/amd64").digest == amd


def test_not_found_errors(client, repo, blob):
    _, digest = blob
    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN|NAME_UNKNOWN"):
        client.get_manifest(repo.with_tag("missing"))
    with pytest.raises(NotFoundError):
        client.get_blob(repo, sha256_digest(b"never pushed"))
    with pytest.raises(NotFoundError):
        client.read_blob_range(repo, sha256_digest(b"never pushed"), 0, 10)
    with pytest.raises(NotFoundError):
        client.blob_size(parse_reference(f"{repo.registry}/no/such/repo"), digest)


def test_schema1_is_refused(client, repo):
    raw = json.dumps({"schemaVersion": 1, "name": repo.repository, "tag": "latest", "fsLayers": []}).encode()
    # docker-registry 2.8 refuses schema 1 pushes, so check the guard on sniffed content only.
    from stargz_store.registry.client import sniff_media_type
    assert sniff_media_type(raw, "application/json").endswith("manifest.v1+json")
    with pytest.raises(UnsupportedManifestError):
        from stargz_store.registry.client import Manifest
        Manifest.from_raw(raw, sniff_media_type(raw, None), sha256_digest(raw))


def test_unreachable_registry_is_a_typed_error(private_registry):
    ref = parse_reference(f"{private_registry.host}/x:latest")
    private_registry.stop()
    with RegistryClient(RegistryConfig(max_retries=1, min_wait=0.01, connect_timeout=2)) as client:
        with pytest.raises(UnreachableError, match="refused"):
            client.get_manifest(ref)


def test_concurrent_reads_share_one_client(client, repo, blob):
    from concurrent.futures import ThreadPoolExecutor

    data, digest = blob
    jobs = [(i * 9_973 % 290_000, 1 + i * 37 % 9_000) for i in range(200)]

    def read(job):
        off, n = job
        if off % 2:
            return client.read_blob_range(repo, digest, off, n)
        return b"".join(client.read_blob_ranges(repo, digest, [(off, n // 2), (off + n // 2, n - n // 2)]))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, jobs))
    assert results == [data[o:o + n] for o, n in jobs]


def test_http_proxy_environment_is_honoured(repo, blob, fault_proxy, monkeypatch):
    """HTTP(S)_PROXY and NO_PROXY apply as requests implements them (the proxy here forwards
    absolute-form requests to the registry unchanged)."""
    data, digest = blob
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", fault_proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    with RegistryClient() as client:
        assert client.read_blob_range(repo, digest, 0, 10) == data[:10]
    assert any(path.startswith(f"http://{repo.registry}/v2/") for _, path, _ in fault_proxy.seen)
    seen = len(fault_proxy.seen)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with RegistryClient() as client:
        assert client.read_blob_range(repo, digest, 0, 10) == data[:10]
    assert len(fault_proxy.seen) == seen


def test_learn_schemes_settles_plain_http_before_the_first_pull(registry):
    # "vm" resolves to 127.0.0.1 in this machine's /etc/hosts but is not a loopback *name*, so an
    # insecure "vm:PORT" starts with HTTPS and must discover that the registry speaks plain HTTP.
    import socket

    try:
        if socket.gethostbyname("vm") != "127.0.0.1":
            pytest.skip("needs a non-localhost name for 127.0.0.1")
    except OSError:
        pytest.skip("needs a non-localhost name for 127.0.0.1")
    host = f"vm:{registry.host.rsplit(':', 1)[1]}"
    with RegistryClient(RegistryConfig(max_retries=1, min_wait=0.01, insecure_hosts=(host,))) as c:
        assert c.learn_schemes() == 1
        assert c.transport._schemes.get(host) == "http"
        data = random_blob(1000)
        ref = parse_reference(f"{host}/plain/learned{next(_names)}:latest")
        c.push_blob(ref, sha256_digest(data), data)
        assert c.get_blob(ref, sha256_digest(data)) == data


def test_learn_schemes_skips_loopback_and_secure_hosts(registry):
    config = RegistryConfig(max_retries=1, min_wait=0.01, insecure_hosts=(registry.host,))
    with RegistryClient(config) as c:
        assert c.learn_schemes() == 0  # loopback starts with plain HTTP: nothing to discover
