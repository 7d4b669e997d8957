"""Ranged reads through a pull-through mirror that has not cached the blob yet (issue 18).

The mirror is Debian's docker-registry in proxy mode: on a miss it answers a range request with
`200` and the whole blob, streamed from the origin for that request alone, while a fill of its
own cache runs beside it. The client must use what it needs of such an answer, hang up on the
rest, and come back to the mirror once it has filled.
"""
from __future__ import annotations

import threading
import time

import pytest

from stargz_store.registry import RegistryClient, RegistryConfig, parse_reference
from stargz_store.registry.client import sha256_digest
from stargz_store.registry.errors import DigestMismatchError
from tests.fixtures.answered import AnsweredRequests
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.mirror_site import Site
from tests.fixtures.waiting import wait_for

from .imagetools import random_blob

LARGE = 3 << 20  # past the forward-read bound, and past the whole-blob limit these tests set


@pytest.fixture
def site(private_registry, tmp_path):
    s = Site(private_registry, tmp_path)
    yield s
    s.stop()


class BodyMeter:
    """How many body bytes the client pulled from each answer (urllib3's own count)."""

    def __init__(self, client: RegistryClient) -> None:
        self.answers: list[tuple[str, int, object]] = []
        client.transport.session.hooks["response"].append(
            lambda resp, *a, **k: self.answers.append((resp.url, resp.status_code, resp.raw)))

    def read_from(self, host: str, status: int) -> list[int]:
        return [raw.tell() for url, code, raw in self.answers if f"//{host}/" in url and code == status]


def _mirror_blob_gets(answered: AnsweredRequests, site: Site, digest: str) -> list[str]:
    return answered.urls("GET", f"//{site.mirror.host}/", f"/blobs/{digest}")


def _origin_blob_gets(answered: AnsweredRequests, site: Site, digest: str) -> list[str]:
    return answered.urls("GET", f"//{site.origin.host}/", f"/blobs/{digest}")


def test_cold_mirror_far_range_is_abandoned_then_the_mirror_serves_after_its_fill(site):
    """A range far into a large blob: the mirror's whole-body answer is not read through (the old
    client read 2.5 MB to reach it), the origin serves that one request, and once the mirror has
    filled and the short back-off has passed, the blob's ranges come from the mirror again (the
    old client pinned the blob to the origin for good). The first read after the back-off races
    the mirror (no head start: it answered with a whole body before) against the origin (the
    loser is hung up on; a mirror hung up on before answering is asked again after a back-off);
    once the mirror has answered a range, the blob's reads go to it alone."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/far", data)
    with site.client(whole_blob_limit=1 << 20, mirror_retry=0.05) as client:
        answered, meter = AnsweredRequests(client), BodyMeter(client)
        assert client.read_blob_range(ref, digest, 2_500_000, 1000) == data[2_500_000:2_501_000]
        assert len(_mirror_blob_gets(answered, site, digest)) == 1
        assert len(_origin_blob_gets(answered, site, digest)) == 1
        assert max(meter.read_from(site.mirror.host, 200)) < 256 << 10, "the whole body was not read"

        assert wait_for(lambda: site.filled(digest)), "the mirror's own fill completes without us"
        mirror = client._live_endpoints(ref)[0]
        key = (ref.registry, ref.repository, digest)
        for _ in range(4):  # the origin may win a race on loopback: then the mirror is asked again
            assert wait_for(lambda: client._ranged.routes.retry_at(key, mirror) <= time.monotonic())
            assert client.read_blob_range(ref, digest, 100, 1000) == data[100:1100]
            if client._ranged.routes.standing(key, mirror)[0]:
                break
        assert client._ranged.routes.standing(key, mirror)[0], "the mirror answered a range"
        origin_gets = len(_origin_blob_gets(answered, site, digest))
        mirror_gets = len(_mirror_blob_gets(answered, site, digest))
        assert 1 <= origin_gets <= 5
        assert client.read_blob_tail(ref, digest, 5000) == (LARGE - 5000, LARGE, data[-5000:])
        assert len(_mirror_blob_gets(answered, site, digest)) == mirror_gets + 1
        assert len(_origin_blob_gets(answered, site, digest)) == origin_gets
    assert meter.read_from(site.mirror.host, 206)[-1] == 5000


def test_reads_during_the_fill_wait_for_the_mirror(site):
    """The read that met the cold mirror went to the origin; the next one, while the mirror is in
    back-off for the blob, waits for it (up to `mirror_fill_wait`) instead of asking the origin
    too: in a fleet the origin would otherwise serve every node's reads on top of the fill."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/wait", data)
    with site.client(whole_blob_limit=1 << 20, mirror_retry=2.0, mirror_fill_wait=10.0) as client:
        answered = AnsweredRequests(client)
        assert client.read_blob_range(ref, digest, 2_000_000, 1000) == data[2_000_000:2_001_000]
        assert wait_for(lambda: site.filled(digest))
        assert client.read_blob_range(ref, digest, 2_500_000, 1000) == data[2_500_000:2_501_000]
    assert len(_origin_blob_gets(answered, site, digest)) == 1
    assert len(_mirror_blob_gets(answered, site, digest)) == 2


def test_a_mirror_slow_to_answer_does_not_hold_up_reads(site):
    """A cold pull-through mirror answers only after its own round trips to the origin, and queues
    them when a fleet misses at once (seconds, measured). A read gives a mirror not known to hold
    the blob `mirror_race` to answer, then asks the origin too and takes the first answer: here
    the mirror's answers are held back until the reads have returned (the old client waited for
    the mirror up to its read timeout). The next read does not queue behind that first contact
    either: the mirror is in back-off for the blob once the origin has answered."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/slow", data)
    with FaultProxy(site.mirror.host) as slow:
        slow.add_rule("hold", path_contains="/blobs/", times=-1)
        config = RegistryConfig(max_retries=1, min_wait=0.01, max_wait=0.05, read_timeout=300.0, mirror_retry=30.0,
                                whole_blob_limit=1 << 20, mirrors={site.origin.host: [slow.host]})
        with RegistryClient(config) as client:
            answered = AnsweredRequests(client)
            got: dict[int, bytes] = {}

            def read(offset: int) -> None:
                got[offset] = client.read_blob_range(ref, digest, offset, 1000)

            first = threading.Thread(target=read, args=(2_000_000,))
            first.start()
            first.join(timeout=60)
            assert not first.is_alive(), "the read waited for the mirror"
            second = threading.Thread(target=read, args=(100_000,))
            second.start()
            second.join(timeout=60)
            assert not second.is_alive(), "the read queued behind the first contact"
            assert got == {2_000_000: data[2_000_000:2_001_000], 100_000: data[100_000:101_000]}
            assert len(slow.requests_to(f"/blobs/{digest}", "GET")) == 1, "one first contact with the mirror"
            assert len(_origin_blob_gets(answered, site, digest)) == 2
            slow.release.set()


def test_a_race_lost_by_the_mirror_hangs_up_on_it_before_its_answer(site):
    """The origin answered first: the mirror's request is hung up on at once, not when its answer
    comes. A cold pull-through mirror's answer is a copy of the whole blob streamed from the origin
    for this request, paid for by the origin until the mirror sees the hang-up (the old client kept
    the request open until the answer came and its thread got round to closing it). The mirror is
    then skipped for the blob for a back-off, so the next read does not meet it again at once."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/hangup", data)
    with FaultProxy(site.mirror.host) as slow:
        held = slow.add_rule("hold", path_contains="/blobs/", times=-1)
        config = RegistryConfig(max_retries=1, min_wait=0.01, max_wait=0.05, read_timeout=300.0,
                                mirror_retry=30.0, mirrors={site.origin.host: [slow.host]})
        with RegistryClient(config) as client:
            answered = AnsweredRequests(client)
            assert client.read_blob_range(ref, digest, 2_000_000, 1000) == data[2_000_000:2_001_000]
            assert held.hung_up.wait(30), "the mirror's request was left open after the origin answered"
            assert client.read_blob_range(ref, digest, 100_000, 1000) == data[100_000:101_000]
            assert len(slow.requests_to(f"/blobs/{digest}", "GET")) == 1, "the mirror is in back-off for the blob"
            assert len(_origin_blob_gets(answered, site, digest)) == 2
            slow.release.set()
    assert not site.filled(digest), "the held request never reached the mirror: nothing started its fill"


def test_small_blob_through_a_cold_mirror_is_read_whole_once(site):
    """A blob within the whole-blob limit: the mirror's whole body is read once, verified and held;
    the tail, ranges, multi-ranges and streamed ranges of it are all answered from memory."""
    data = random_blob(300_000)
    ref, digest = site.push("fill/small", data)
    with site.client() as client:
        answered = AnsweredRequests(client)
        assert client.read_blob_tail(ref, digest, 13 << 10) == (len(data) - (13 << 10), len(data), data[-(13 << 10):])
        assert client.read_blob_range(ref, digest, 1000, 5000) == data[1000:6000]
        assert client.read_blob_ranges(ref, digest, [(0, 10), (250_000, 10)]) == [data[:10], data[250_000:250_010]]
        pieces: list[tuple[int, bytes]] = []
        assert client.read_blob_range(ref, digest, 7, 200_000, sink=lambda o, p: pieces.append((o, p))) == b""
        assert b"".join(p for _, p in pieces) == data[7:200_007] and pieces[0][0] == 7
        key = (ref.registry, ref.repository, digest)
        assert wait_for(lambda: client._ranged.whole.get(key) is not None and client._ranged.whole.get(key).complete)
    assert len(_mirror_blob_gets(answered, site, digest)) == 1
    assert _origin_blob_gets(answered, site, digest) == []


def test_concurrent_readers_of_a_cold_blob_cost_the_mirror_one_miss(site):
    """Eight readers of one cold blob at the same moment: one of them meets the cold mirror (each
    concurrent miss would cost the origin another full copy), the others wait for its answer and
    then go where it says (here the origin, while the mirror fills)."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/herd", data)
    offsets = [1_200_000 + i * 200_000 for i in range(8)]
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(len(offsets))
    with site.client(whole_blob_limit=1 << 20, mirror_retry=30.0) as client:
        answered = AnsweredRequests(client)

        def read(offset: int) -> None:
            barrier.wait()
            results[offset] = client.read_blob_range(ref, digest, offset, 4096)

        threads = [threading.Thread(target=read, args=(o,)) for o in offsets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(results[o] == data[o:o + 4096] for o in offsets)
    assert len(_mirror_blob_gets(answered, site, digest)) == 1
    assert len(_origin_blob_gets(answered, site, digest)) == len(offsets)


def test_whole_body_to_a_multi_range_request_keeps_multi_range_for_the_origin(site):
    """A cold mirror's 200 to a multi-range request says nothing about the origin's range support:
    the far regions are asked of the origin in one multi-range request, and the origin is not
    switched to single ranges (the old client did, for good)."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/multi", data)
    with site.client(whole_blob_limit=1 << 20) as client:
        answered = AnsweredRequests(client)
        got = client.read_blob_ranges(ref, digest, [(10, 10), (2_900_000, 10)])
        assert got == [data[10:20], data[2_900_000:2_900_010]]
        assert site.origin.host not in client._single_range_hosts
    assert len(_origin_blob_gets(answered, site, digest)) == 1


def test_stream_blob_waits_for_a_filling_mirror(site):
    """Background fetch's primitive: one GET streams the whole blob; a mirror still filling is
    waited for (its whole-body answers abandoned) rather than the origin asked."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/stream", data)
    pieces: list[tuple[int, bytes]] = []
    with site.client(mirror_retry=0.1) as client:
        answered, meter = AnsweredRequests(client), BodyMeter(client)
        size = client.stream_blob(ref, digest, lambda o, p: pieces.append((o, p)), wait_for_mirror=60)
    assert size == LARGE
    assert b"".join(p for _, p in pieces) == data
    assert [o for o, _ in pieces] == [sum(len(p) for _, p in pieces[:i]) for i in range(len(pieces))]
    assert _origin_blob_gets(answered, site, digest) == []
    assert len(_mirror_blob_gets(answered, site, digest)) >= 2, "the first answer was the cold whole body"
    assert meter.read_from(site.mirror.host, 200) and max(meter.read_from(site.mirror.host, 200)) < 256 << 10
    assert meter.read_from(site.mirror.host, 206) == [LARGE]


def test_a_mirror_streaming_a_blob_serves_its_reads_from_the_first_byte(site):
    """Background fetch's stream answered with a 206 by the mirror: the mirror holds the blob, so
    the node's reads of it go to it without racing the origin from then on, not only once the
    stream has ended. In a fleet every node streams from the mirror at once right after its fill;
    its answers to reads are then slower than the origin's, and a read that lost a race was hung
    up on before its answer could confirm the mirror: reads went on racing (a head start each,
    then the origin) for the whole stream."""
    data = random_blob(LARGE)
    ref, digest = site.push("fill/confirm", data)
    with site.client() as warming:
        warming.stream_blob(ref, digest, lambda o, p: None, wait_for_mirror=60)
    assert wait_for(lambda: site.filled(digest))
    with site.client(mirror_race=0.1) as client:
        mirror = client._live_endpoints(ref)[0]
        key = (ref.registry, ref.repository, digest)
        at_first_piece: list[bool] = []

        def sink(offset: int, piece: bytes) -> None:
            if not at_first_piece:
                at_first_piece.append(client._ranged.routes.standing(key, mirror)[0])

        assert client.stream_blob(ref, digest, sink, wait_for_mirror=60) == LARGE
    assert at_first_piece == [True], "the mirror was confirmed for the blob as its stream began"


def test_mirror_whole_body_that_does_not_hash_to_its_digest_is_dropped(private_registry, tmp_path):
    """A mirror whose upstream corrupts the blob: the whole body the client held fails its digest
    at the end, is dropped, and the blob's next ranges come from the origin."""
    with FaultProxy(private_registry.host) as corrupting:
        corrupting.mode = "flip_bytes"
        corrupting.mode_path_contains = "/blobs/sha256"
        corrupting.mode_options = {"offset": 100_000}
        site = Site(private_registry, tmp_path, upstream=corrupting.host)
        try:
            data = random_blob(300_000)
            ref, digest = site.push("fill/corrupt", data)
            with site.client(mirror_retry=30.0) as client:
                answered = AnsweredRequests(client)
                # before the bad byte: from the held body, or from the origin when the digest check
                # was quicker than this read
                assert client.read_blob_range(ref, digest, 0, 1000) == data[:1000]
                key = (ref.registry, ref.repository, digest)
                assert wait_for(lambda: client._ranged.whole.get(key) is None), "dropped after the digest check"
                assert client.read_blob_range(ref, digest, 99_000, 2000) == data[99_000:101_000]
            assert len(_origin_blob_gets(answered, site, digest)) in (1, 2)
            assert len(_mirror_blob_gets(answered, site, digest)) == 1
        finally:
            site.stop()


@pytest.mark.parametrize("fault", ["short_body", "flip_bytes"])
def test_stream_blob_resumes_a_broken_body_and_verifies_the_blob(fault_proxy, registry, fault):
    """Straight from one registry: a broken body resumes with `Range: bytes=N-` from the next byte;
    bytes that do not hash to the digest raise DigestMismatchError at the end."""
    data = random_blob(LARGE)
    name = f"fill/stream-{fault}"
    with RegistryClient() as direct:
        direct.push_blob(parse_reference(f"{registry.host}/{name}"), sha256_digest(data), data)
    fault_proxy.add_rule(fault, path_contains="/blobs/", method="GET", offset=2_000_000)
    pieces: list[tuple[int, bytes]] = []
    with RegistryClient(RegistryConfig(max_retries=2, min_wait=0.01, max_wait=0.05)) as client:
        ref = parse_reference(f"{fault_proxy.host}/{name}")
        if fault == "flip_bytes":
            with pytest.raises(DigestMismatchError):
                client.stream_blob(ref, sha256_digest(data), lambda o, p: pieces.append((o, p)))
            return
        assert client.stream_blob(ref, sha256_digest(data), lambda o, p: pieces.append((o, p))) == LARGE
    assert b"".join(p for _, p in pieces) == data
    ranges = [h.get("Range") for _, _, h in fault_proxy.requests_to("/blobs/", "GET")]
    assert len(ranges) == 2 and ranges[0] == "bytes=0-" and ranges[1].startswith("bytes=") and ranges[1].endswith("-")
    assert 0 < int(ranges[1][6:-1]) < LARGE

