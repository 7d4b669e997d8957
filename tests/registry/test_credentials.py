"""Credential sources and their lookup order (registry.md §9)."""
from __future__ import annotations

import base64
import json

import pytest

from stargz_store.registry.credentials import CredentialStore, Credentials, default_auth_files


def auth_entry(user: str, pw: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}


def write(path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


@pytest.fixture
def env(tmp_path):
    return {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"}


def test_default_file_order(env, tmp_path):
    files = default_auth_files(env)
    assert files == [tmp_path / "run/containers/auth.json", tmp_path / "home/.config/containers/auth.json",
                     tmp_path / "home/.docker/config.json", tmp_path / "home/.dockercfg"]
    no_runtime = {k: v for k, v in env.items() if k != "XDG_RUNTIME_DIR"}
    assert str(default_auth_files(no_runtime)[0]).startswith("/run/containers/")


def test_first_file_with_credentials_wins(env, tmp_path):
    write(tmp_path / "run/containers/auth.json", {"auths": {"other.example": auth_entry("x", "y")}})
    write(tmp_path / "home/.docker/config.json", {"auths": {"quay.io": auth_entry("docker", "pw")}})
    write(tmp_path / "home/.config/containers/auth.json", {"auths": {"quay.io": auth_entry("podman", "pw2")}})
    store = CredentialStore(env=env)
    assert store.lookup("quay.io") == Credentials("podman", "pw2")
    assert store.lookup("other.example") == Credentials("x", "y")
    assert store.lookup("nothing.example") is None


def test_registry_auth_file_is_used_alone(env, tmp_path):
    write(tmp_path / "home/.docker/config.json", {"auths": {"quay.io": auth_entry("docker", "pw")}})
    write(tmp_path / "explicit.json", {"auths": {"ghcr.io": auth_entry("gh", "tok")}})
    store = CredentialStore(env={**env, "REGISTRY_AUTH_FILE": str(tmp_path / "explicit.json")})
    assert store.lookup("ghcr.io") == Credentials("gh", "tok")
    assert store.lookup("quay.io") is None
    configured = CredentialStore(auth_file=str(tmp_path / "explicit.json"), env=env)
    assert configured.files == [tmp_path / "explicit.json"]


def test_key_matching_rules(env, tmp_path):
    write(tmp_path / "run/containers/auth.json", {"auths": {
        "https://index.docker.io/v1/": auth_entry("hub", "1"),
        "quay.io/org/repo": auth_entry("repo", "2"),
        "quay.io/org": auth_entry("org", "3"),
        "quay.io": auth_entry("host", "4:with:colons\x00\x00"),
        "http://legacy.example/v1/": auth_entry("legacy", "5"),
        "marker.example": {},
    }})
    store = CredentialStore(env=env)
    assert store.lookup("docker.io", "library/ubuntu").username == "hub"
    assert store.lookup("registry-1.docker.io").username == "hub"
    assert store.lookup("quay.io", "org/repo").username == "repo"
    assert store.lookup("quay.io", "org/other").username == "org"
    assert store.lookup("quay.io", "else/x") == Credentials("host", "4:with:colons")
    assert store.lookup("legacy.example").username == "legacy"
    assert store.lookup("marker.example") is None


def test_identity_token_and_repr_hides_secrets(env, tmp_path):
    write(tmp_path / "run/containers/auth.json", {"auths": {"acr.example": {
        "auth": base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode(), "identitytoken": "REFRESH-SECRET"}}})
    creds = CredentialStore(env=env).lookup("acr.example")
    assert creds.identity_token == "REFRESH-SECRET"
    assert "REFRESH-SECRET" not in repr(creds) and "password" not in repr(creds)


def test_legacy_dockercfg(env, tmp_path):
    write(tmp_path / "home/.dockercfg", {"https://old.example": auth_entry("old", "pw")})
    assert CredentialStore(env=env).lookup("old.example") == Credentials("old", "pw")


def test_helper_not_found_and_failing(env, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-broken"
    helper.write_text("#!/bin/sh\necho 'SECRET-IN-OUTPUT' >&2\nexit 3\n")
    helper.chmod(0o755)
    write(tmp_path / "run/containers/auth.json", {"credHelpers": {"a.example": "broken", "b.example": "absent"}})
    store = CredentialStore(env={**env, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    from stargz_store.registry.errors import CredentialHelperError
    with pytest.raises(CredentialHelperError) as info:
        store.lookup("a.example")
    assert "SECRET" not in str(info.value)
    assert store.lookup("b.example") is None  # helper missing from PATH: warn, no credentials
