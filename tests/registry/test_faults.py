"""Robustness against faults a real registry cannot produce, injected by FaultProxy."""
from __future__ import annotations

import itertools

import pytest

from stargz_store.registry import (
    RegistryClient,
    RegistryConfig,
    RegistryTimeoutError,
    ShortReadError,
    parse_reference,
)
from stargz_store.registry.client import sha256_digest
from stargz_store.registry.errors import DigestMismatchError, ServerError
from tests.fixtures.fault_proxy import FaultProxy

from .imagetools import push_image, random_blob

_names = itertools.count()


@pytest.fixture
def blob(registry):
    """A blob pushed directly to the registry; returns (data, digest, repository name)."""
    name = f"faults/t{next(_names)}"
    data = random_blob(200_000)
    with RegistryClient() as client:
        client.push_blob(parse_reference(f"{registry.host}/{name}"), sha256_digest(data), data)
    return data, sha256_digest(data), name


def client_for(**kwargs) -> RegistryClient:
    return RegistryClient(RegistryConfig(**{"max_retries": 3, "min_wait": 0.01, "max_wait": 0.05, **kwargs}))


def test_5xx_then_success_is_retried(fault_proxy, blob):
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}")
    fault_proxy.add_rule("status", status=503, times=1, path_contains="/blobs/", method="GET")
    fault_proxy.add_rule("status", status=500, times=1, path_contains="/blobs/", method="GET")
    with client_for() as client:
        assert client.read_blob_range(ref, digest, 100, 1000) == data[100:1100]
    assert len(fault_proxy.requests_to("/blobs/", "GET")) == 3


def test_persistent_5xx_ends_in_server_error(fault_proxy, blob):
    _, digest, name = blob
    fault_proxy.add_rule("status", status=502, times=-1, path_contains="/blobs/")
    with client_for(max_retries=2) as client:
        with pytest.raises(ServerError, match="502") as info:
            client.read_blob_range(parse_reference(f"{fault_proxy.host}/{name}"), digest, 0, 10)
    assert info.value.status == 502
    assert len(fault_proxy.requests_to("/blobs/")) == 3


def test_501_is_not_retried(fault_proxy, blob):
    _, digest, name = blob
    fault_proxy.add_rule("status", status=501, times=-1, path_contains="/blobs/")
    with client_for() as client:
        with pytest.raises(ServerError):
            client.read_blob_range(parse_reference(f"{fault_proxy.host}/{name}"), digest, 0, 10)
    assert len(fault_proxy.requests_to("/blobs/")) == 1


def test_429_honours_retry_after(fault_proxy, blob):
    data, digest, name = blob
    fault_proxy.add_rule("status", status=429, headers={"Retry-After": "1"}, path_contains="/blobs/",
                         body=b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}')
    with client_for() as client:
        assert client.read_blob_range(parse_reference(f"{fault_proxy.host}/{name}"), digest, 5, 5) == data[5:10]
    assert len(fault_proxy.requests_to("/blobs/")) == 2


def test_retry_after_beyond_the_time_budget_gives_up(fault_proxy, blob):
    _, digest, name = blob
    fault_proxy.add_rule("status", status=429, headers={"Retry-After": "3600"}, path_contains="/blobs/")
    with client_for(max_retry_time=5) as client:
        with pytest.raises(ServerError, match="429"):
            client.read_blob_range(parse_reference(f"{fault_proxy.host}/{name}"), digest, 0, 5)


@pytest.mark.parametrize("action", ["reset_mid_body", "short_body"])
def test_broken_body_is_retried(fault_proxy, blob, action):
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}")
    fault_proxy.add_rule(action, path_contains="/blobs/", method="GET")
    with client_for() as client:
        assert client.read_blob_range(ref, digest, 1000, 50_000) == data[1000:51_000]
        fault_proxy.add_rule(action, times=2, path_contains="/blobs/", method="GET")
        assert client.read_blob_ranges(ref, digest, [(0, 10), (100_000, 10)]) == [data[:10], data[100_000:100_010]]
        fault_proxy.add_rule(action, times=-1, path_contains="/blobs/", method="GET")
        with pytest.raises(ShortReadError):
            client.read_blob_range(ref, digest, 0, 50_000)


@pytest.mark.parametrize("action", ["reset_mid_body", "short_body"])
def test_streamed_range_starts_over_after_a_broken_body(fault_proxy, blob, action):
    """With a sink, a range arrives piece by piece; a retried request hands the range to the sink
    again from its start (the sink's contract), and the bytes are exact both times."""
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}")
    fault_proxy.add_rule(action, path_contains="/blobs/", method="GET")
    pieces: list[tuple[int, bytes]] = []
    with client_for() as client:
        assert client.read_blob_range(ref, digest, 1000, 180_000, sink=lambda o, p: pieces.append((o, p))) == b""
    starts = [i for i, (off, _) in enumerate(pieces) if off == 1000]
    assert len(starts) == 2  # the broken answer's first piece (before the cut), then the retry's
    retry = pieces[starts[1]:]
    assert b"".join(p for _, p in retry) == data[1000:181_000]
    offsets = [off for off, _ in retry]
    assert offsets == [1000 + sum(len(p) for _, p in retry[:i]) for i in range(len(retry))]


def test_tail_from_a_server_that_ignores_ranges(fault_proxy, blob, registry):
    """A 200 with the whole blob to a suffix range: a small blob is read whole once and held, and
    the tail and every later range of it come from memory; a blob larger than the whole-blob
    limit and the forward-read bound is refused unread (it could be gigabytes)."""
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}")
    fault_proxy.add_rule("ignore_range", times=-1, path_contains="/blobs/")
    with client_for() as client:
        assert client.read_blob_tail(ref, digest, 1000) == (len(data) - 1000, len(data), data[-1000:])
        assert client.read_blob_range(ref, digest, 10, 5) == data[10:15]
        assert client.read_blob_ranges(ref, digest, [(0, 3), (150_000, 7)]) == [data[:3], data[150_000:150_007]]
    assert len(fault_proxy.requests_to("/blobs/", "GET")) == 1, "one whole body served every range"

    big = random_blob(1_500_000)
    big_name = f"faults/t{next(_names)}"
    with RegistryClient() as direct:
        direct.push_blob(parse_reference(f"{registry.host}/{big_name}"), sha256_digest(big), big)
    big_ref = parse_reference(f"{fault_proxy.host}/{big_name}")
    with client_for(whole_blob_limit=1 << 20) as client:
        with pytest.raises(ShortReadError, match="no usable suffix range"):
            client.read_blob_tail(big_ref, sha256_digest(big), 1000)
        # a plain range from the same server still works (read forward in the whole body: no other endpoint)
        assert client.read_blob_range(big_ref, sha256_digest(big), 10, 5) == big[10:15]


def test_open_blob_resumes_after_a_reset(fault_proxy, blob):
    data, digest, name = blob
    fault_proxy.add_rule("reset_mid_body", path_contains="/blobs/", method="GET")
    with client_for() as client:
        assert client.get_blob(parse_reference(f"{fault_proxy.host}/{name}"), digest) == data
    ranges = [h.get("Range") for _, _, h in fault_proxy.requests_to("/blobs/", "GET")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1].endswith("-")
    assert int(ranges[1][6:-1]) > 0


def test_stalled_body_times_out_then_retries(fault_proxy, blob):
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}")
    fault_proxy.add_rule("stall_body", stall=5, path_contains="/blobs/", method="GET")
    with client_for(read_timeout=1.5) as client:
        assert client.read_blob_range(ref, digest, 0, 100_000) == data[:100_000]
        fault_proxy.add_rule("stall_body", stall=5, times=-1, path_contains="/blobs/", method="GET")
    with client_for(read_timeout=1.5, max_retries=1) as client, pytest.raises(RegistryTimeoutError):
        client.read_blob_range(ref, digest, 0, 100_000)


def test_flipped_bytes_are_caught_by_digest_checks(fault_proxy, blob, registry):
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}:v1")
    with client_for() as client:
        manifest_digest, _ = push_image(client, ref, [random_blob(100)])
        fault_proxy.mode = "flip_bytes"
        fault_proxy.mode_options = {"offset": 1234}
        with pytest.raises(DigestMismatchError):
            client.get_blob(ref, digest)
        with pytest.raises(DigestMismatchError):
            client.get_manifest(ref.with_digest(manifest_digest))
        # Ranged reads are verified by the layer reader against the TOC, not here: bytes pass through.
        assert client.read_blob_range(ref, digest, 1234, 1) == bytes([data[1234] ^ 0xFF])


def test_redirect_to_another_host_drops_authorization(token_registry, registry, blob, tmp_path):
    """Registry -> 307 -> storage on another host: the storage must never see our Authorization,
    the redirect target is reused for later reads, and re-resolved when it starts refusing."""
    data, digest, name = blob  # the plain registry plays the storage backend for this blob
    from .test_auth import write_auth_file

    front = FaultProxy(token_registry.host).start()
    storage = FaultProxy(registry.host).start()
    try:
        auth = write_auth_file(tmp_path / "auth.json", {front.host: ("alice", token_registry.users["alice"])})
        ref = parse_reference(f"{front.host}/{name}")
        with client_for(auth_file=auth) as client:
            client.push_blob(ref, digest, data)  # so that auth succeeds on the front registry
            front.add_rule("redirect", location=f"http://localhost:{storage.port}", times=-1,
                           path_contains="/blobs/sha256", method="GET")
            assert client.read_blob_range(ref, digest, 10, 20) == data[10:30]
            assert client.read_blob_range(ref, digest, 50, 20) == data[50:70]
            assert len(front.requests_to("/blobs/sha256", "GET")) == 1, "redirect target reused"
            storage.add_rule("status", status=403, path_contains="/blobs/")  # presigned URL expired
            assert client.read_blob_range(ref, digest, 90, 20) == data[90:110]
            assert len(front.requests_to("/blobs/sha256", "GET")) == 2, "re-resolved after 403"
        with client_for(auth_file=auth, redirect_valid_interval=0) as client:
            assert client.read_blob_range(ref, digest, 0, 5) == data[:5]
            assert client.read_blob_range(ref, digest, 5, 5) == data[5:10]
            assert len(front.requests_to("/blobs/sha256", "GET")) == 4, "an expired redirect is resolved again"
        front_auth = [h.get("Authorization") for _, _, h in front.requests_to("/blobs/sha256", "GET")]
        # The first client had authenticated (push) before the redirects began; the second starts
        # anonymous, and the proxy redirects before the registry would ask for a token.
        assert front_auth[0].startswith("Bearer ") and front_auth[1].startswith("Bearer ")
        storage_requests = storage.requests_to("/blobs/")
        assert len(storage_requests) == 6
        for _, _, headers in storage_requests:
            assert "Authorization" not in headers
            assert headers["Range"].startswith("bytes=")
    finally:
        front.stop()
        storage.stop()


@pytest.mark.parametrize("fault", ["chunk_refused", "answer_lost", "status_unavailable"])
def test_chunked_push_survives_a_failed_chunk(fault_proxy, tmp_path, fault):
    """chunk_refused: a 500 before the registry saw the chunk, resumed from the upload status.
    answer_lost: the registry stored the chunk but the answer was reset; docker-registry then
    cancels the session resumed with a stale state token, so a new upload starts.
    status_unavailable: the chunk fails and so does the status query: a new upload starts."""
    data = random_blob(700_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = sha256_digest(data)
    ref = parse_reference(f"{fault_proxy.host}/faults/push{next(_names)}")
    if fault == "chunk_refused":
        fault_proxy.add_rule("status", status=500, method="PATCH", times=1)
    elif fault == "answer_lost":
        fault_proxy.add_rule("pass", method="PATCH", times=2)
        fault_proxy.add_rule("reset_mid_body", method="PATCH", times=1)
    else:
        fault_proxy.add_rule("status", status=503, method="PATCH", times=1)
        fault_proxy.add_rule("status", status=502, method="GET", path_contains="/uploads/", times=-1)
    with client_for(monolithic_push_limit=100_000, push_chunk_size=128 * 1024, max_retries=1) as client:
        client.push_blob(ref, digest, path)
        assert client.get_blob(ref, digest) == data
    sessions = len(fault_proxy.requests_to("/blobs/uploads/", "POST"))
    status_queries = len(fault_proxy.requests_to("/blobs/uploads/", "GET"))
    assert (sessions, status_queries > 0) == {"chunk_refused": (1, True), "answer_lost": (2, True),
                                              "status_unavailable": (2, True)}[fault]


def test_a_partial_answer_marked_200_with_its_content_range_is_a_206(fault_proxy, blob):
    """Dragonfly's dfdaemon proxy (client up to v1.3.8, dragonflyoss/client#1874) answers a range
    with the range's bytes, `Content-Range`, and status 200. Read as a whole body, the range, the
    tail and the streamed blob would be the wrong bytes; the Content-Range says what they are."""
    data, digest, name = blob
    ref = parse_reference(f"{fault_proxy.host}/{name}")
    fault_proxy.add_rule("partial_as_200", times=-1, path_contains="/blobs/")
    with client_for() as client:
        assert client.read_blob_range(ref, digest, 150_000, 1000) == data[150_000:151_000]
        assert client.read_blob_tail(ref, digest, 1000) == (len(data) - 1000, len(data), data[-1000:])
        pieces: list[bytes] = []
        assert client.stream_blob(ref, digest, lambda off, p: pieces.append(p), offset=100_000) == len(data)
        assert b"".join(pieces) == data[100_000:]
    assert all(h.get("Range") for m, p, h in fault_proxy.requests_to("/blobs/", "GET"))
