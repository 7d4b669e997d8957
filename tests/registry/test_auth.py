"""Authentication against real registries: TLS + htpasswd Basic, and the Bearer token flow."""
from __future__ import annotations

import base64
import json
import logging
import os

import pytest

from stargz_store.registry import AuthError, RegistryClient, RegistryConfig, UnreachableError, parse_reference
from stargz_store.registry.auth import Challenge, parse_www_authenticate, pick_challenge
from stargz_store.registry.client import sha256_digest
from stargz_store.registry.config import HostConfig

from .imagetools import push_image, random_blob


def write_auth_file(path, entries: dict[str, tuple[str, str]]):
    path.write_text(json.dumps({"auths": {
        host: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()} for host, (user, pw) in entries.items()}}))
    return str(path)


def quick(**kwargs) -> RegistryConfig:
    return RegistryConfig(max_retries=1, min_wait=0.01, **kwargs)


# ---- challenge parsing ---------------------------------------------------------------------

def test_parse_bearer_challenge():
    [ch] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"')
    assert ch == Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                      "scope": "repository:samalba/my-app:pull,push"})


def test_parse_several_challenges_quotes_and_escapes():
    chs = parse_www_authenticate(['Basic realm="a \\"quoted\\", realm"', 'bearer realm=https://x/t , error=invalid_token,'
                                  ' Negotiate abc==, Basic realm=z'])
    assert [c.scheme for c in chs] == ["basic", "bearer", "negotiate", "basic"]
    assert chs[0].realm == 'a "quoted", realm'
    assert chs[1].params == {"realm": "https://x/t", "error": "invalid_token"}
    assert pick_challenge(chs).scheme == "bearer"
    assert pick_challenge(parse_www_authenticate("Digest realm=x")) is None
    assert parse_www_authenticate("") == []


# ---- TLS + Basic ---------------------------------------------------------------------------

def test_tls_basic_push_and_pull(tls_basic_registry, tmp_path):
    reg = tls_basic_registry
    auth = write_auth_file(tmp_path / "auth.json", {reg.host: ("alice", reg.users["alice"])})
    config = quick(auth_file=auth, hosts={reg.host: HostConfig(ca_bundle=str(reg.ca_cert))})
    ref = parse_reference(f"{reg.host}/tls/app:v1")
    layer = random_blob(50_000)
    with RegistryClient(config) as client:
        digest, _ = push_image(client, ref, [layer])
        assert client.get_manifest(ref).digest == digest
        assert client.read_blob_range(ref, sha256_digest(layer), 10, 100) == layer[10:110]
        assert client.read_blob_ranges(ref, sha256_digest(layer), [(0, 5), (40_000, 5)]) == [layer[:5], layer[40_000:40_005]]
    # A loopback host with no TLS configured is tried over HTTP first and switches on the registry's 400.
    with RegistryClient(quick(auth_file=auth, ca_bundle=str(reg.ca_cert))) as client:
        assert client.get_manifest(ref).digest == digest


def test_tls_needs_the_ca_unless_insecure(tls_basic_registry, tmp_path):
    reg = tls_basic_registry
    auth = write_auth_file(tmp_path / "auth.json", {reg.host: ("bob", reg.users["bob"])})
    ref = parse_reference(f"{reg.host}/tls/none:v1")
    with RegistryClient(quick(auth_file=auth, hosts={reg.host: HostConfig(tls=True)})) as client:
        with pytest.raises(UnreachableError, match="TLS"):
            client.blob_exists(ref, sha256_digest(b"x"))
    with RegistryClient(quick(auth_file=auth, insecure_hosts=(reg.host,), hosts={reg.host: HostConfig(tls=True)})) as client:
        assert client.blob_exists(ref, sha256_digest(b"x")) is False


def test_basic_wrong_or_missing_credentials(tls_basic_registry, tmp_path, caplog):
    reg = tls_basic_registry
    secret = "not-the-password-S3CRET"
    hosts = {reg.host: HostConfig(ca_bundle=str(reg.ca_cert))}
    ref = parse_reference(f"{reg.host}/tls/denied:v1")
    caplog.set_level(logging.DEBUG)
    with RegistryClient(quick(auth_file=write_auth_file(tmp_path / "a.json", {reg.host: ("alice", secret)}),
                              hosts=hosts)) as client:
        with pytest.raises(AuthError) as info:
            client.get_manifest(ref)
    assert secret not in str(info.value)
    assert secret not in caplog.text
    assert base64.b64encode(f"alice:{secret}".encode()).decode() not in caplog.text
    with RegistryClient(quick(auth_file=str(tmp_path / "missing.json"), hosts=hosts)) as client:
        with pytest.raises(AuthError, match="no credentials"):
            client.get_manifest(ref)


def test_credentials_from_the_config_file(tls_basic_registry, tmp_path):
    """`[resolver.host."H"] username/password` in config.toml, over an auth file with wrong ones."""
    reg = tls_basic_registry
    config = RegistryConfig.from_toml({"resolver": {"auth_file": write_auth_file(tmp_path / "a.json", {reg.host: ("alice", "wrong")}),
                                                    "host": {reg.host: {"ca_file": str(reg.ca_cert), "username": "bob",
                                                                        "password": reg.users["bob"]}}}})
    assert "builder" not in repr(config)
    with RegistryClient(config) as client:
        assert client.blob_exists(parse_reference(f"{reg.host}/tls/cfg:v1"), sha256_digest(b"x")) is False


# ---- Bearer tokens ------------------------------------------------------------------------

@pytest.fixture
def alice_auth(token_registry, tmp_path):
    return write_auth_file(tmp_path / "alice.json", {token_registry.host: ("alice", token_registry.users["alice"])})


def test_token_flow_push_pull_and_cache(token_registry, alice_auth):
    issuer = token_registry.issuer
    ref = parse_reference(f"{token_registry.host}/private/app:v1")
    layer = random_blob(20_000)
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        digest, _ = push_image(client, ref, [layer])
        fetched_after_push = len(issuer.requests)
        for i in range(5):
            assert client.read_blob_range(ref, sha256_digest(layer), i, 10) == layer[i:i + 10]
        assert client.get_manifest(ref).digest == digest
        assert len(issuer.requests) == fetched_after_push, "cached tokens are reused"
    assert all(r["user"] == "alice" and r["service"] == ["test-registry"] for r in issuer.requests)
    scopes = sorted(s for r in issuer.requests for s in r["scopes"])
    assert scopes == ["repository:private/app:pull", "repository:private/app:pull,push"]


def test_anonymous_token_for_public_repository(token_registry, alice_auth, tmp_path):
    public = parse_reference(f"{token_registry.host}/public/tool:v1")
    private = parse_reference(f"{token_registry.host}/private/tool:v1")
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        digest, _ = push_image(client, public, [random_blob(100)])
        push_image(client, private, [random_blob(100)])
    with RegistryClient(quick(auth_file=str(tmp_path / "none.json"))) as anonymous:
        assert anonymous.get_manifest(public).digest == digest
        with pytest.raises(AuthError):
            anonymous.get_manifest(private)
    assert any(r["user"] is None for r in token_registry.issuer.requests)


def test_token_server_rejects_bad_password_without_leaking_it(token_registry, tmp_path, caplog):
    secret = "wrong-S3CRET-pw"
    auth = write_auth_file(tmp_path / "bad.json", {token_registry.host: ("alice", secret)})
    caplog.set_level(logging.DEBUG)
    with RegistryClient(quick(auth_file=auth)) as client:
        with pytest.raises(AuthError, match="refused the configured credentials") as info:
            client.get_manifest(parse_reference(f"{token_registry.host}/private/x:v1"))
    assert secret not in str(info.value) and secret not in caplog.text
    assert token_registry.issuer.requests[-1] == {"user": "alice", "rejected": True}


def test_expired_token_is_refreshed(token_registry, alice_auth):
    """The issuer hands out a token already past its expiry (beyond any leeway): the registry
    answers 401, and the client must fetch a fresh token and retry."""
    ref = parse_reference(f"{token_registry.host}/private/expiry:v1")
    layer = random_blob(1000)
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        push_image(client, ref, [layer])
    issuer = token_registry.issuer
    issuer.next_lifetimes = [-7200]
    before = len(issuer.requests)
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        assert client.read_blob_range(ref, sha256_digest(layer), 0, 100) == layer[:100]
    assert len(issuer.requests) - before == 2


def test_token_refused_mid_pull_is_refreshed(token_registry, alice_auth):
    """A registry that starts refusing a cached token (expired or revoked) mid-pull."""
    from tests.fixtures.fault_proxy import FaultProxy

    ref0 = parse_reference(f"{token_registry.host}/private/mid:v1")
    layer = random_blob(5000)
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        push_image(client, ref0, [layer])
    proxy = FaultProxy(token_registry.host).start()
    try:
        auth = write_auth_file(token_registry.registry.workdir / "proxy-auth.json",
                               {proxy.host: ("alice", token_registry.users["alice"])})
        ref = parse_reference(f"{proxy.host}/private/mid:v1")
        issuer = token_registry.issuer
        with RegistryClient(quick(auth_file=auth)) as client:
            assert client.read_blob_range(ref, sha256_digest(layer), 0, 10) == layer[:10]
            before = len(issuer.requests)
            challenge = f'Bearer realm="{issuer.realm}",service="{issuer.service}",error="invalid_token"'
            proxy.add_rule("status", status=401, headers={"WWW-Authenticate": challenge}, path_contains="/blobs/")
            assert client.read_blob_range(ref, sha256_digest(layer), 10, 10) == layer[10:20]
            assert len(issuer.requests) == before + 1
            tokens = [h.get("Authorization") for _, p, h in proxy.requests_to("/blobs/")]
            assert tokens[-1] and tokens[-1] != tokens[-2]
    finally:
        proxy.stop()


# ---- credential helpers -------------------------------------------------------------------

def write_helper(bin_dir, name: str, users: dict[str, tuple[str, str]]):
    """A docker-credential-<name> script speaking the helper protocol (address on stdin)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    table = json.dumps({host: {"ServerURL": host, "Username": u, "Secret": s} for host, (u, s) in users.items()})
    script.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"table = json.loads({table!r})\n"
        "assert sys.argv[1] == 'get'\n"
        "address = sys.stdin.read().strip()\n"
        "open(__file__ + '.calls', 'a').write(address + '\\n')\n"
        "if address not in table:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "print(json.dumps(table[address]))\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_credential_helper(token_registry, tmp_path, monkeypatch, key):
    host = token_registry.host
    helper = write_helper(tmp_path / "bin", "testhelper", {host: ("alice", token_registry.users["alice"])})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    doc = {"credHelpers": {host: "testhelper"}} if key == "credHelpers" else {"credsStore": "testhelper", "auths": {}}
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(doc))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    ref = parse_reference(f"{host}/private/helped:v1")
    with RegistryClient(quick()) as client:
        digest, _ = push_image(client, ref, [random_blob(100)])
        assert client.get_manifest(ref).digest == digest
    assert (tmp_path / "bin" / "docker-credential-testhelper.calls").read_text().split() [0] == host
    assert helper.exists()


def test_identity_token_uses_the_oauth2_post_flow(token_registry, alice_auth, tmp_path):
    ref = parse_reference(f"{token_registry.host}/private/oauth:v1")
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        digest, _ = push_image(client, ref, [random_blob(100)])
    issuer = token_registry.issuer
    issuer.refresh_tokens["REFRESH-123"] = "alice"
    auth = tmp_path / "identity.json"
    auth.write_text(json.dumps({"auths": {token_registry.host: {
        "auth": base64.b64encode(b"<token>:").decode(), "identitytoken": "REFRESH-123"}}}))
    before = len(issuer.requests)
    with RegistryClient(quick(auth_file=str(auth))) as client:
        assert client.get_manifest(ref).digest == digest
    [request] = issuer.requests[before:]
    assert request["oauth"] and request["user"] == "alice"
    assert request["scopes"] == ["repository:private/oauth:pull"]


def test_token_server_hiccup_is_retried(token_registry, alice_auth):
    """The token endpoint answering 503 once (behind a FaultProxy) must not fail the pull."""
    from tests.fixtures.fault_proxy import FaultProxy

    issuer = token_registry.issuer
    ref = parse_reference(f"{token_registry.host}/private/hiccup:v1")
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        digest, _ = push_image(client, ref, [random_blob(100)])
    token_proxy = FaultProxy(issuer.realm.split("/")[2]).start()
    front = FaultProxy(token_registry.host).start()
    try:
        challenge = f'Bearer realm="{token_proxy.url}/token",service="{issuer.service}"'
        front.add_rule("status", status=401, headers={"WWW-Authenticate": challenge}, path_contains="/manifests/")
        token_proxy.add_rule("status", status=503, path_contains="/token")
        auth = write_auth_file(token_registry.registry.workdir / "front.json",
                               {front.host: ("alice", token_registry.users["alice"])})
        with RegistryClient(quick(auth_file=auth)) as client:
            assert client.get_manifest(parse_reference(f"{front.host}/private/hiccup:v1")).digest == digest
        assert len(token_proxy.requests_to("/token")) == 2
    finally:
        token_proxy.stop()
        front.stop()


def test_401_without_challenge_learns_it_from_the_ping_endpoint(token_registry, alice_auth):
    from tests.fixtures.fault_proxy import FaultProxy

    ref0 = parse_reference(f"{token_registry.host}/private/ping:v1")
    with RegistryClient(quick(auth_file=alice_auth)) as client:
        digest, _ = push_image(client, ref0, [random_blob(10)])
    with FaultProxy(token_registry.host) as proxy:
        proxy.add_rule("status", status=401, path_contains="/manifests/")  # no WWW-Authenticate
        auth = write_auth_file(token_registry.registry.workdir / "ping.json",
                               {proxy.host: ("alice", token_registry.users["alice"])})
        with RegistryClient(quick(auth_file=auth)) as client:
            assert client.get_manifest(parse_reference(f"{proxy.host}/private/ping:v1")).digest == digest
        assert [p for m, p, _ in proxy.seen if m == "GET"][:2] == ["/v2/private/ping/manifests/v1", "/v2/"]
