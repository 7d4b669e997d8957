"""Reference parsing follows distribution/reference normalisation (registry.md §1.1)."""
import pytest

from stargz_store.registry import InvalidReferenceError, parse_reference
from stargz_store.registry.reference import Reference

DIGEST = "sha256:" + "0123456789abcdef" * 4

NORMALISED = [
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("docker://alpine:3.19", "docker.io/library/alpine:3.19"),
    ("user/app", "docker.io/user/app:latest"),
    ("docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
    ("index.docker.io/library/ubuntu:x", "docker.io/library/ubuntu:x"),
    ("registry-1.docker.io/foo/bar", "docker.io/foo/bar:latest"),
    ("localhost/foo", "localhost/foo:latest"),
    ("localhost:5000/foo:bar", "localhost:5000/foo:bar"),
    ("127.0.0.1:5000/x/y/z:v1.2-rc_3", "127.0.0.1:5000/x/y/z:v1.2-rc_3"),
    (f"127.0.0.1:5000/x@{DIGEST}", f"127.0.0.1:5000/x@{DIGEST}"),
    (f"quay.io/org/img:tag@{DIGEST}", f"quay.io/org/img:tag@{DIGEST}"),
    ("ghcr.io/a-b/c__d.e", "ghcr.io/a-b/c__d.e:latest"),
    ("[::1]:5000/foo", "[::1]:5000/foo:latest"),
    ("Example.com/foo", "Example.com/foo:latest"),
]

INVALID = [
    "",
    "ubuntu:",
    "Ubuntu",
    "docker.io/Library/ubuntu",
    "foo/../bar",
    "a//b",
    "-foo",
    "foo:-bar",
    "foo:bad tag",
    "foo@sha256:abc",
    "foo@sha256:" + "A" * 64,
    "foo@md5",
    "host:notaport/foo",
    "foo/",
    "/foo",
    "foo:" + "x" * 129,
    "example.com/" + "a" * 250,
]


@pytest.mark.parametrize("text,expected", NORMALISED)
def test_normalisation(text, expected):
    assert str(parse_reference(text)) == expected


@pytest.mark.parametrize("text", INVALID)
def test_invalid_reference_is_a_clear_value_error(text):
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_fields_and_derivations():
    ref = parse_reference("127.0.0.1:5000/org/img:v1")
    assert ref == Reference("127.0.0.1:5000", "org/img", "v1", None)
    pinned = ref.with_digest(DIGEST)
    assert (pinned.tag, pinned.digest, pinned.manifest_ref) == ("v1", DIGEST, DIGEST)
    retagged = pinned.with_tag("v2")
    assert (retagged.tag, retagged.digest, retagged.manifest_ref) == ("v2", None, "v2")
    assert parse_reference(f"x@{DIGEST}").tag is None
    with pytest.raises(InvalidReferenceError):
        ref.with_tag("no spaces")
    with pytest.raises(InvalidReferenceError):
        ref.with_digest("sha256:short")
