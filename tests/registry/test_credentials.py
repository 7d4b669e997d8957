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


def _gated_helper(tmp_path, name: str) -> tuple[str, object, object]:
    """A docker-credential helper that logs each run and answers only once `gate` exists (bounded),
    so lookups of the tests below overlap for as long as the test wants."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls, gate = tmp_path / f"{name}.calls", tmp_path / f"{name}.gate"
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text(
        "#!/bin/sh\n"
        "read host\n"
        f"echo \"$host\" >> {calls}\n"
        f"i=0; while [ ! -e {gate} ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done\n"
        "printf '{\"Username\": \"user-%s\", \"Secret\": \"pw\"}' \"$host\"\n"
    )
    helper.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin", calls, gate


def test_concurrent_lookups_run_the_helper_once_per_host(env, tmp_path):
    """Fetch threads of many layers ask at once: one helper run per host, every thread the answer."""
    import threading

    hosts = [f"r{i}.example" for i in range(6)]
    path, calls, gate = _gated_helper(tmp_path, "gated")
    write(tmp_path / "run/containers/auth.json", {"credHelpers": {h: "gated" for h in hosts}})
    store = CredentialStore(env={**env, "PATH": path})
    per_host = 8
    asked = threading.Semaphore(0)
    results: list[tuple[str, object]] = []

    def ask(host: str) -> None:
        asked.release()
        results.append((host, store.lookup(host, "team/app")))

    threads = [threading.Thread(target=ask, args=(h,)) for h in hosts for _ in range(per_host)]
    for t in threads:
        t.start()
    for _ in threads:  # every thread is about to ask before the first helper may answer
        assert asked.acquire(timeout=30)
    gate.touch()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    runs = calls.read_text().split()
    assert sorted(runs) == sorted(hosts), f"helper runs per host: {[runs.count(h) for h in hosts]}"
    assert sorted(results, key=lambda r: r[0]) == sorted(
        ((h, Credentials(f"user-{h}", "pw")) for h in hosts for _ in range(per_host)), key=lambda r: r[0])
    assert store.lookup(hosts[0], "team/app") == Credentials(f"user-{hosts[0]}", "pw")  # cached: no new run
    assert len(calls.read_text().split()) == len(hosts)


def test_forget_during_a_lookup_does_not_cache_its_answer(env, tmp_path):
    import threading

    path, calls, gate = _gated_helper(tmp_path, "slow")
    write(tmp_path / "run/containers/auth.json", {"credHelpers": {"a.example": "slow"}})
    store = CredentialStore(env={**env, "PATH": path})
    first = threading.Thread(target=store.lookup, args=("a.example",))
    first.start()
    while not calls.exists():  # the helper runs: the lookup is in flight
        assert first.is_alive()
        threading.Event().wait(0.01)
    store.forget("a.example")  # e.g. a 401 for what it is reading
    gate.touch()
    first.join(60)
    assert store.lookup("a.example") == Credentials("user-a.example", "pw")
    assert calls.read_text().split() == ["a.example", "a.example"]  # asked again after forget


def test_a_failed_lookup_reaches_every_waiter_and_is_not_cached(env, tmp_path):
    import threading

    from stargz_store.registry.errors import CredentialHelperError

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gate, calls = tmp_path / "gate", tmp_path / "calls"
    helper = bin_dir / "docker-credential-broken"
    helper.write_text(f"#!/bin/sh\necho run >> {calls}\n"
                      f"i=0; while [ ! -e {gate} ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done\nexit 3\n")
    helper.chmod(0o755)
    write(tmp_path / "run/containers/auth.json", {"credHelpers": {"a.example": "broken"}})
    store = CredentialStore(env={**env, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    errors: list[BaseException] = []
    asked = threading.Semaphore(0)

    def ask() -> None:
        asked.release()
        try:
            store.lookup("a.example")
        except CredentialHelperError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert asked.acquire(timeout=30)
    gate.touch()
    for t in threads:
        t.join(60)
    assert len(errors) == 4  # a waiter gets the error, not "no credentials"
    runs = len(calls.read_text().split())
    with pytest.raises(CredentialHelperError):
        store.lookup("a.example")  # not cached: the helper runs again
    assert len(calls.read_text().split()) == runs + 1
