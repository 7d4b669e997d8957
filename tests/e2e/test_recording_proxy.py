"""The measuring instrument of the e2e tests: if it misread ranges, their byte accounting would lie."""
from __future__ import annotations

import http.client
import json

import pytest

from tests.fixtures.images import LayerBuilder, write_oci_image, push_oci_layout

from .recording_proxy import RecordingProxy, merge_ranges, overlapping_pairs, parse_range_header


@pytest.mark.parametrize("header, size, expected", [
    (None, None, ()),
    ("bytes=0-99", None, ((0, 99),)),
    ("bytes=0-9, 20-29", None, ((0, 9), (20, 29))),
    ("bytes=-10", 100, ((90, 99),)),
    ("bytes=50-", 100, ((50, 99),)),
])
def test_parse_range_header(header, size, expected):
    assert parse_range_header(header, size) == expected


def test_parse_range_header_rejects_other_units():
    with pytest.raises(ValueError):
        parse_range_header("items=0-1")


def test_merge_and_overlap():
    ranges = [(10, 19), (0, 9), (30, 39), (35, 50)]
    assert merge_ranges(ranges) == [(0, 19), (30, 50)]
    assert overlapping_pairs(ranges) == [((30, 39), (35, 50))]
    assert overlapping_pairs([(0, 9), (10, 19)]) == []
    assert overlapping_pairs([(0, 9), (9, 9)]) == [((0, 9), (9, 9))]


def test_proxy_forwards_unchanged_and_records_ranges(registry, tmp_path):
    layer = LayerBuilder().add_file("hello.txt", b"hello\n" * 1000).gzip()
    image = write_oci_image(tmp_path / "img", [layer], tag="t")
    push_oci_layout(image.layout, "t", f"{registry.host}/e2e/proxy-check:t")
    proxy = RecordingProxy(registry.host).start()
    try:
        host, port = proxy.host.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        # Two Accept headers, as containers/image sends them: the registry must see both.
        conn.putrequest("GET", "/v2/e2e/proxy-check/manifests/t", skip_accept_encoding=True)
        conn.putheader("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        conn.putheader("Accept", "application/vnd.oci.image.manifest.v1+json")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["layers"][0]["digest"] == image.layer_digests[0]

        conn.request("GET", f"/v2/e2e/proxy-check/blobs/{image.layer_digests[0]}", headers={"Range": "bytes=5-14"})
        resp = conn.getresponse()
        assert resp.status == 206
        assert resp.read() == layer[5:15]
        conn.close()
    finally:
        proxy.stop()
    blob_requests = [r for r in proxy.requests() if r.blob_digest]
    assert [(r.blob_digest, r.ranges, r.bytes_sent, r.status) for r in blob_requests] == [
        (image.layer_digests[0], ((5, 14),), 10, 206)]
