"""Credentials the runtime hands over per image reference: what is kept, and where the client sends them.

The registries are real (docker-registry with htpasswd, or with a token server); the mirror is a
recording pass-through proxy in front of the same registry, so a credential sent to it would work
(the proxy forwards it) and is seen in its record.
"""
from __future__ import annotations

import base64
import json
import logging

import pytest

from stargz_store.registry import AuthError, RegistryClient, RegistryConfig, parse_reference
from stargz_store.registry.client import sha256_digest
from stargz_store.registry.credentials import Credentials
from stargz_store.registry.runtime_credentials import RuntimeCredentials, RuntimeCredentialsError, parse_helper_document
from tests.e2e.recording_proxy import RecordingProxy

from .imagetools import push_image, push_index, random_blob

SECRET = "runtime-S3CRET-pw"


def write_auth_file(path, host: str, user: str, password: str) -> str:
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return str(path)


def quick(**kwargs) -> RegistryConfig:
    return RegistryConfig(max_retries=1, min_wait=0.01, **kwargs)


def no_files(tmp_path) -> str:
    """An explicit auth file that does not exist: no credentials from any file of the machine."""
    return str(tmp_path / "no-auth.json")


def pushed(reg, tmp_path, repo: str, layers: list[bytes]) -> tuple[str, str]:
    """Push with file credentials (pushes never use the runtime's); returns (reference, manifest digest)."""
    ref = parse_reference(f"{reg.host}/{repo}")
    auth = write_auth_file(tmp_path / "pusher.json", reg.host, "alice", reg.users["alice"])
    with RegistryClient(quick(auth_file=auth)) as client:
        digest, _ = push_image(client, ref, layers)
    return str(ref), digest


def runtime_sends(client: RegistryClient, doc: dict) -> list[str]:
    return client.runtime_credentials.update(parse_helper_document(doc))


# ---- the helper's document and the in-memory map ------------------------------------------------

def test_helper_document_gives_canonical_references_and_identity_token_wins():
    digest = "sha256:" + "a" * 64
    parsed = parse_helper_document({
        "127.0.0.1:5000/app:v1": {"username": "alice", "password": SECRET},
        "alpine": {"username": "bob", "password": "pw", "identityToken": "REFRESH"},
        f"localhost:5000/x@{digest}": {},
        "quay.io/a/b:c": {"username": None, "password": None, "future-field": 1},
    })
    assert parsed == {
        "127.0.0.1:5000/app:v1": Credentials("alice", SECRET),
        "docker.io/library/alpine:latest": Credentials(identity_token="REFRESH"),
        f"localhost:5000/x@{digest}": None,
        "quay.io/a/b:c": None,
    }
    assert SECRET not in repr(parsed) and "REFRESH" not in repr(parsed)


@pytest.mark.parametrize("doc, message", [
    ([SECRET], "JSON object of image reference"),
    ({"Not A Ref": {"password": SECRET}}, "invalid image reference"),
    ({"a.io/b:c": SECRET}, "credentials for a.io/b:c must be a JSON object"),
    ({"a.io/b:c": {"username": "u", "password": 42}}, "password must be a string"),
])
def test_bad_documents_are_refused_without_quoting_secrets(doc, message):
    with pytest.raises(RuntimeCredentialsError, match=message) as info:
        parse_helper_document(doc)
    assert SECRET not in str(info.value) and "42" not in str(info.value)


def test_each_call_replaces_removes_and_the_map_is_bounded():
    store = RuntimeCredentials(max_entries=2)
    a, b, c = "h.io/a:1", "h.io/b:1", "h.io/c:1"
    assert store.update({a: Credentials("u", "p1")}) == [a]
    assert store.update({a: Credentials("u", "p1")}) == [], "the same credentials again change nothing"
    assert store.update({a: Credentials("u", "p2")}) == [a]
    assert store.lookup(a) == Credentials("u", "p2")
    assert store.update({b: Credentials("u", "p"), a: None}) == [b, a], "no secret removes the entry"
    assert store.lookup(a) is None and store.update({a: None}) == []
    store.update({a: Credentials("u", "p")})
    store.update({b: Credentials("u", "p")})  # refreshed: now the newest
    store.update({c: Credentials("u", "p")})  # over the cap: the least recently refreshed (a) goes
    assert store.references() == [b, c]
    assert "p2" not in repr(store) and len(store) == 2


# ---- where the client sends them ------------------------------------------------------------------

def test_credentials_are_used_for_their_exact_reference_only(basic_registry, tmp_path, caplog):
    reg = basic_registry
    layer = random_blob(20_000)
    ref_a, digest_a = pushed(reg, tmp_path, "private/a:v1", [layer])
    ref_b, _ = pushed(reg, tmp_path, "private/b:v1", [random_blob(100)])
    caplog.set_level(logging.DEBUG)
    with RegistryClient(quick(auth_file=no_files(tmp_path))) as client:
        with pytest.raises(AuthError):
            client.get_manifest(parse_reference(ref_a))  # nothing from the runtime yet
        runtime_sends(client, {ref_a: {"username": "alice", "password": reg.users["alice"]}})
        a = parse_reference(ref_a)
        assert client.get_manifest(a).digest == digest_a
        assert client.read_blob_range(a, sha256_digest(layer), 100, 50) == layer[100:150]
        with pytest.raises(AuthError):
            client.get_manifest(parse_reference(ref_b))  # same host, another reference
        with pytest.raises(AuthError):
            client.get_manifest(parse_reference(ref_a).with_tag("v2"))  # another tag is another reference
    assert reg.users["alice"] not in caplog.text
    assert base64.b64encode(f"alice:{reg.users['alice']}".encode()).decode() not in caplog.text


def test_a_mirror_never_receives_them(basic_registry, tmp_path):
    """The mirror forwards to the registry, so a credential sent to it would even work: none is sent."""
    reg = basic_registry
    layer = random_blob(30_000)
    ref, digest = pushed(reg, tmp_path, "private/mirrored:v1", [layer])
    mirror = RecordingProxy(reg.host).start()
    try:
        config = quick(auth_file=no_files(tmp_path), mirrors={reg.host: [mirror.host]})
        with RegistryClient(config) as client:
            runtime_sends(client, {ref: {"username": "alice", "password": reg.users["alice"]}})
            image = parse_reference(ref)
            assert client.get_manifest(image).digest == digest
            assert client.read_blob_range(image, sha256_digest(layer), 0, 10) == layer[:10]
            assert client.get_blob(image, sha256_digest(layer)) == layer
        seen = mirror.requests()
    finally:
        mirror.stop()
    assert seen, "the mirror is tried first"
    assert [r.authorization for r in seen] == [""] * len(seen)
    assert {r.status for r in seen} == {401}


def test_identity_token_is_sent_as_a_refresh_token(token_registry, tmp_path):
    reg = token_registry
    ref, digest = pushed(reg, tmp_path, "private/oauth:v1", [random_blob(100)])
    reg.issuer.refresh_tokens["REFRESH-9"] = "alice"
    before = len(reg.issuer.requests)
    with RegistryClient(quick(auth_file=no_files(tmp_path))) as client:
        runtime_sends(client, {ref: {"username": "alice", "password": "wrong", "identityToken": "REFRESH-9"}})
        assert client.get_manifest(parse_reference(ref)).digest == digest
    requests = reg.issuer.requests[before:]
    assert requests == [{"user": "alice", "scopes": ["repository:private/oauth:pull"], "service": ["test-registry"],
                         "oauth": True}]


def test_the_newest_credentials_win_and_come_before_the_files(basic_registry, tmp_path):
    reg = basic_registry
    ref, digest = pushed(reg, tmp_path, "private/refresh:v1", [random_blob(100)])
    other, other_digest = pushed(reg, tmp_path, "private/other:v1", [random_blob(100)])
    files = write_auth_file(tmp_path / "files.json", reg.host, "bob", reg.users["bob"])
    image = parse_reference(ref)
    with RegistryClient(quick(auth_file=files)) as client:
        runtime_sends(client, {ref: {"username": "alice", "password": "wrong"}})
        with pytest.raises(AuthError):
            client.get_manifest(image)  # the runtime's (wrong) credentials, not the files' good ones
        assert client.get_manifest(parse_reference(other)).digest == other_digest  # files for other references
        runtime_sends(client, {ref: {"username": "alice", "password": reg.users["alice"]}})
        assert client.get_manifest(image).digest == digest
        runtime_sends(client, {ref: {}})  # e.g. after `podman logout`: back to the files
        assert client.get_manifest(image).digest == digest


def test_an_index_is_followed_with_the_credentials_of_the_reference_asked_for(basic_registry, tmp_path):
    reg = basic_registry
    auth = write_auth_file(tmp_path / "pusher.json", reg.host, "alice", reg.users["alice"])
    base = parse_reference(f"{reg.host}/private/multi:v1")
    with RegistryClient(quick(auth_file=auth)) as pusher:
        amd, amd_raw = push_image(pusher, base, [random_blob(100)], arch="amd64", tag="amd64")
        arm, arm_raw = push_image(pusher, base, [random_blob(100)], arch="arm64", tag="arm64")
        index_digest, _ = push_index(pusher, base, [(amd, amd_raw, {"os": "linux", "architecture": "amd64"}),
                                                    (arm, arm_raw, {"os": "linux", "architecture": "arm64"})])
    by_digest = base.with_digest(index_digest)
    by_digest = parse_reference(f"{by_digest.name}@{index_digest}")
    for image in (base, by_digest):
        with RegistryClient(quick(auth_file=no_files(tmp_path))) as client:
            runtime_sends(client, {str(image): {"username": "bob", "password": reg.users["bob"]}})
            assert client.get_manifest(image, "linux/arm64").digest == arm
