"""Pure helpers: multipart/byteranges, ranges, platforms, config, URL redaction, Retry-After."""
from __future__ import annotations

import pytest

from stargz_store.registry.config import RegistryConfig, endpoints_for, is_loopback
from stargz_store.registry.errors import InvalidReferenceError, redact_url
from stargz_store.registry.multipart import (
    MultipartError,
    boundary_of,
    merge_regions,
    parse_byteranges,
    parse_content_range,
    range_header,
)
from stargz_store.registry.platforms import Platform, parse_platform, select_descriptor
from stargz_store.registry.transport import parse_retry_after


def multipart(parts, boundary="XyZ", preamble=b"ignored preamble\r\n"):
    body = preamble
    for first, data, total in parts:
        body += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Range: bytes {first}-{first + len(data) - 1}/{total}\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def test_parse_byteranges_uses_each_parts_content_range():
    data_a, data_b = b"--XyZ inside data\r\n\r\n", b"\x00" * 7
    body = multipart([(100, data_b, 1000), (5, data_a, 1000)])
    assert parse_byteranges(body, "XyZ") == [(100, data_b), (5, data_a)]


def test_parse_byteranges_rejects_truncation():
    body = multipart([(0, b"abcdef", 10)])
    with pytest.raises(MultipartError):
        parse_byteranges(body[:-20], "XyZ")
    with pytest.raises(MultipartError):
        parse_byteranges(b"no boundary here", "XyZ")


def test_content_type_and_range_parsing():
    assert boundary_of('multipart/byteranges; boundary="abc"') == "abc"
    assert boundary_of("multipart/byteranges;boundary=3d6b6a416f9b5") == "3d6b6a416f9b5"
    assert boundary_of("application/octet-stream") is None
    cr = parse_content_range("bytes 10-19/*")
    assert (cr.first, cr.last, cr.total, cr.length) == (10, 19, None, 10)
    assert parse_content_range("bytes */100") is None
    assert parse_content_range("bytes 9-1/100") is None


def test_merge_regions():
    assert merge_regions([(10, 5), (0, 5), (5, 5), (100, 1), (101, 0), (50, 10), (55, 2)]) == \
        [(0, 15), (50, 10), (100, 1)]
    assert range_header([(0, 15), (100, 1)]) == "bytes=0-14,100-100"


def test_platform_parsing_and_selection():
    assert parse_platform("linux/arm64") == Platform("linux", "arm64", "v8")
    assert parse_platform("linux/x86_64") == Platform("linux", "amd64", "")
    with pytest.raises(InvalidReferenceError):
        parse_platform("linux")
    index = {"manifests": [
        {"digest": "att", "platform": {"os": "unknown", "architecture": "unknown"}},
        {"digest": "arm64", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "v6", "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": "v7", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "any"},
    ]}
    assert select_descriptor(index, parse_platform("linux/arm64/v8"))["digest"] == "arm64"
    assert select_descriptor(index, parse_platform("linux/arm/v7"))["digest"] == "v7"
    assert select_descriptor(index, parse_platform("linux/arm/v6"))["digest"] == "v6"
    assert select_descriptor(index, parse_platform("linux/riscv64"))["digest"] == "any"


def test_config_from_toml_and_endpoints():
    cfg = RegistryConfig.from_toml({
        "resolver": {"request_timeout_sec": 12, "host": {"docker.io": {"mirrors": [
            {"host": "mirror.example.com:5000", "insecure": True, "request_timeout_sec": 3,
             "header": {"X-Foo": "bar", "X-Multi": ["a", "b"]}},
        ]}, "quay.io": {"ca_file": "/etc/ca.pem", "header": {"X-Q": "1"}}}},
        "blob": {"max_retries": 7, "min_wait_msec": 50, "max_wait_msec": 2000, "force_single_range_mode": True},
    })
    assert (cfg.read_timeout, cfg.max_retries, cfg.min_wait, cfg.max_wait, cfg.force_single_range) == \
        (12.0, 7, 0.05, 2.0, True)
    mirror, origin = endpoints_for(cfg, "docker.io")
    assert (mirror.host, mirror.is_mirror, mirror.default_scheme(), mirror.read_timeout) == \
        ("mirror.example.com:5000", True, "http", 3.0)
    assert dict(mirror.headers) == {"X-Foo": "bar", "X-Multi": "a, b"}
    assert (origin.host, origin.is_mirror, origin.default_scheme(), origin.verify) == \
        ("registry-1.docker.io", False, "https", True)
    [quay] = endpoints_for(cfg, "quay.io")
    assert (quay.verify, quay.default_scheme(), dict(quay.headers)) == ("/etc/ca.pem", "https", {"X-Q": "1"})
    assert [e.host for e in endpoints_for(cfg, "docker.io", pull=False)] == ["registry-1.docker.io"]
    # config.toml refuses a mirror with a path at start; one given in code is skipped with a warning
    coded = RegistryConfig(mirrors={"docker.io": ["bad/path", "m.example:5000"]})
    assert [e.host for e in endpoints_for(coded, "docker.io")] == ["m.example:5000", "registry-1.docker.io"]


@pytest.mark.parametrize("host,expected", [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True), ("127.1.2.3", True),
    ("[::1]:5000", True), ("::1", True), ("10.0.0.1:5000", False), ("example.com", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_redact_url_and_retry_after():
    assert redact_url("https://user:pw@s3.example.com:8443/bucket/blob?X-Amz-Signature=SECRET#f") == \
        "https://s3.example.com:8443/bucket/blob"
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("garbage") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1


def test_documented_config_example_parses():
    import tomllib

    import stargz_store.registry as registry_pkg

    example = "\n".join(line[4:] for line in registry_pkg.__doc__.splitlines() if line.startswith("    "))
    cfg = RegistryConfig.from_toml(tomllib.loads(example))
    private = cfg.hosts["registry.example.com:5000"]
    assert (private.username, private.ca_bundle, private.headers) == ("builder", "/etc/registry-ca.pem",
                                                                     {"X-Team": "storage"})
    assert [e.host for e in endpoints_for(cfg, "docker.io")] == ["mirror.example.com:5000", "registry-1.docker.io"]
    assert (cfg.auth_file, cfg.max_retry_time, cfg.redirect_valid_interval) == ("/run/containers/0/auth.json", 30.0, 60.0)
