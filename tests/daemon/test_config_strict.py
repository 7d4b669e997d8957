"""Strict config.toml: every key checked and named with its full path; no file gives a traceback.

Security-relevant keys (everything under `[resolver]`: hosts, mirrors, `insecure`, `ca_file`,
credentials, headers) and any value of the wrong type stop the start; unknown keys elsewhere and
keys without effect here are warnings, once each.
"""
from __future__ import annotations

import logging
import math
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.fixtures.store import lazy_unmount

from stargz_store.daemon.config import ConfigError, config_from_toml, load_config
from tests.fixtures.store import REPO_ROOT

SHIPPED = REPO_ROOT / "config" / "config.toml"

# (file text, the path the error must name). Each is refused at start.
REFUSED = [
    # the cases: a truthy string must not turn TLS verification off, a string for a table
    ('[resolver.host."r:5000"]\ninsecure = "no"', 'resolver.host."r:5000".insecure'),
    ('[resolver]\nhost = "x"', "resolver.host"),
    # security-relevant values of the wrong type
    ('[resolver.host."r:5000"]\ninsecure = 0', 'resolver.host."r:5000".insecure'),
    ('[[resolver.host."r:5000".mirrors]]\nhost = "m:1"\ninsecure = "yes"', 'resolver.host."r:5000".mirrors[0].insecure'),
    ('[[resolver.host."docker.io".mirrors]]\nhost = "m:1"\n[[resolver.host."docker.io".mirrors]]\nhost = 5',
     'resolver.host."docker.io".mirrors[1].host'),
    ('[resolver.host."r:5000"]\nca_file = true', 'resolver.host."r:5000".ca_file'),
    ("[resolver]\nca_file = 1", "resolver.ca_file"),
    ("[resolver]\nauth_file = []", "resolver.auth_file"),
    ('[resolver.host."r:5000"]\nusername = 7\npassword = "pw"', 'resolver.host."r:5000".username'),
    ('[resolver.host."r:5000"]\nusername = "u"\npassword = 123456', 'resolver.host."r:5000".password'),
    ('[resolver.host."r:5000"]\npassword = "pw"', 'resolver.host."r:5000".password'),
    ('[resolver.host."r:5000"]\nheader = "X-A: 1"', 'resolver.host."r:5000".header'),
    ('[resolver.host."r:5000".header]\n"X-A" = 1', 'resolver.host."r:5000".header.X-A'),
    ('[resolver.host."r:5000".header]\n"X-A" = []', 'resolver.host."r:5000".header.X-A'),
    ('[resolver.host."r:5000".header]\n"X-A" = "a\\r\\nInjected: 1"', 'resolver.host."r:5000".header.X-A'),
    ('[resolver.host."r:5000".header]\n"Bad Name" = "x"', 'resolver.host."r:5000".header."Bad Name"'),
    # unknown (misspelt) keys where they would silently drop a security setting
    ('[resolver.host."r:5000"]\ninsecur = true', 'resolver.host."r:5000".insecur'),
    ('[resolver.host."r:5000"]\npasword = "pw"\nusername = "u"', 'resolver.host."r:5000".pasword'),
    ('[[resolver.host."r:5000".mirrors]]\nhost = "m:1"\ninsecure_skip_verify = true',
     'resolver.host."r:5000".mirrors[0].insecure_skip_verify'),
    ('[resolver]\nhosts = {}', "resolver.hosts"),
    ('[resolver]\nca_fiel = "/etc/ca.pem"', "resolver.ca_fiel"),
    # host tables and mirrors that could never apply
    ('[resolver.host."https://r:5000/v2"]\ninsecure = true', 'resolver.host."https://r:5000/v2"'),
    ('[resolver.host."docker.io"]\ninsecure = true\n[resolver.host."index.docker.io"]\ninsecure = false',
     'resolver.host."index.docker.io"'),
    ('[resolver.host]\n"r:5000" = 3', 'resolver.host."r:5000"'),
    ('[resolver.host."r:5000"]\nmirrors = "m:1"', 'resolver.host."r:5000".mirrors'),
    ('[resolver.host."r:5000"]\nmirrors = ["m:1"]', 'resolver.host."r:5000".mirrors[0]'),
    ('[[resolver.host."r:5000".mirrors]]\ninsecure = true', 'resolver.host."r:5000".mirrors[0].host'),
    ('[[resolver.host."r:5000".mirrors]]\nhost = "m:1/path"', 'resolver.host."r:5000".mirrors[0].host'),
    ('[[resolver.host."r:5000".mirrors]]\nhost = "m:1"\nrequest_timeout_sec = "10"',
     'resolver.host."r:5000".mirrors[0].request_timeout_sec'),
    # wrong top-level types: strings, numbers or arrays where tables are expected
    ("resolver = 3", "resolver"),
    ('blob = "x"', "blob"),
    ("[[store]]\nplatform = 'linux/amd64'", "store"),
    ("fuse = [1, 2]", "fuse"),
    ("directory_cache = true", "directory_cache"),
    # wrong types, huge, negative, infinite and NaN numbers elsewhere
    ('noprefetch = "false"', "noprefetch"),
    ("[blob]\nmax_retries = -1", "blob.max_retries"),
    ("[blob]\nmax_retries = 99999999999999999999999999999", "blob.max_retries"),
    ("[blob]\nmax_retries = 2.5", "blob.max_retries"),
    ("[blob]\nfetching_timeout_sec = inf", "blob.fetching_timeout_sec"),
    ("[blob]\nfetching_timeout_sec = nan", "blob.fetching_timeout_sec"),
    ("[blob]\nmin_wait_msec = -30", "blob.min_wait_msec"),
    ("[blob]\nvalid_interval = 1e300", "blob.valid_interval"),
    ("[blob]\ncheck_always = 1", "blob.check_always"),
    ("[resolver]\nrequest_timeout_sec = 1e400", "resolver.request_timeout_sec"),
    ("[resolver]\nconnect_timeout_sec = -1", "resolver.connect_timeout_sec"),
    ("prefetch_size = 999999999999999999999999", "prefetch_size"),
    ("max_concurrency = 100000", "max_concurrency"),
    ("resolve_result_entry_ttl_sec = 1979-05-27T07:32:00Z", "resolve_result_entry_ttl_sec"),
    ("[fuse]\nattr_timeout = 1e300", "fuse.attr_timeout"),
    ("[store]\nread_ahead_kb = -5", "store.read_ahead_kb"),
    ("[store]\nresolve_workers = 10000", "store.resolve_workers"),
    ("[store]\nneighbour_fetch_kb = -1", "store.neighbour_fetch_kb"),
    ("[store]\nplatform = 3", "store.platform"),
    ('[store]\nplatform = "linux"', "store.platform"),
    # keys without effect still need a value of their type (Go refuses the file otherwise too)
    ('metadata_store = "sql"', "metadata_store"),
    ('metrics_address = "localhost"', "metrics_address"),  # host:port
    ("metrics_address = 8234", "metrics_address"),
    ("[store]\ncache_max_size_gb = -1", "store.cache_max_size_gb"),
    ('[blob]\nchunk_size = "big"', "blob.chunk_size"),
    ('[kubeconfig_keychain]\nenable_keychain = "yes"', "kubeconfig_keychain.enable_keychain"),
]

# (file text, the path the warning must name). Each starts, with exactly one warning naming it.
WARNED = [
    ('metrics_adress = "127.0.0.1:8234"', "metrics_adress"),
    ("[blob]\nchunk_sise = 1", "blob.chunk_sise"),
    ("[store]\nneighbor_fetch_kb = 1", "store.neighbor_fetch_kb"),
    ('[fuse]\n"odd key" = 1', 'fuse."odd key"'),
    ("[unknown_table]\nx = 1", "unknown_table"),
    ("[blob]\nchunk_size = 50000", "blob.chunk_size"),
    ("[fuse]\npassthrough = true", "fuse.passthrough"),
    ("[kubeconfig_keychain]\nenable_keychain = true", "kubeconfig_keychain.enable_keychain"),
    ("[directory_cache]\nmax_cache_fds = 10", "directory_cache.max_cache_fds"),
    ('metadata_store = "db"', "metadata_store"),
    ('metrics_address = "127.0.0.1:8234"\nno_prometheus = true', "no_prometheus"),  # it wins: no endpoint
    ("[resolver]\nrequest_timeout_sec = -1", "resolver.request_timeout_sec"),  # Go: no timeout; here: the default
    ('[[resolver.host."r:5000".mirrors]]\nhost = "m:1"\nrequest_timeout_sec = -1',
     'resolver.host."r:5000".mirrors[0].request_timeout_sec'),
]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("text,key", REFUSED, ids=[k for _, k in REFUSED])
def test_bad_values_and_security_relevant_keys_are_refused_naming_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, explicit=True)
    message = str(info.value)
    assert f"config {path}: {key}" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text,key", WARNED, ids=[k for _, k in WARNED])
def test_unknown_keys_and_keys_without_effect_are_one_warning_naming_the_key(tmp_path, caplog, text, key):
    with caplog.at_level(logging.DEBUG):
        load_config(write(tmp_path, text), explicit=True)
    naming = [r for r in caplog.records if key in r.getMessage()]
    assert len(naming) == 1, [r.getMessage() for r in caplog.records]
    assert naming[0].levelno == logging.WARNING


def test_insecure_must_be_a_boolean_and_false_keeps_verification():
    """`insecure = "no"` used to be read as true (bool("no")): TLS verification was off."""
    from stargz_store.registry.config import ConfigValueError, RegistryConfig, endpoints_for

    for value in ('"no"', '"false"', "0", '""'):
        with pytest.raises(ConfigValueError, match=r'resolver\.host\."r:5000"\.insecure must be true or false'):
            RegistryConfig.from_toml(tomllib.loads(f'[resolver.host."r:5000"]\ninsecure = {value}'))
    cfg = RegistryConfig.from_toml(tomllib.loads('[resolver.host."r:5000"]\ninsecure = false'))
    [origin] = endpoints_for(cfg, "r:5000")
    assert origin.verify is True and not origin.insecure


def test_secrets_are_never_in_the_message(tmp_path):
    for text in ('[resolver.host."r:5000"]\nusername = "u"\npassword = ["s3cr3t-value"]',
                 '[resolver.host."r:5000".header]\nAuthorization = ["Bearer s3cr3t-value", 1]'):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text), explicit=True)
        assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00garbage\x80",  # not UTF-8
    b"noprefetch = [unterminated\n",  # not TOML
    b"a = " + b"[" * 5000 + b"]" * 5000,  # nested past the parser's recursion limit
    b"x = 1\n" * 200_000,  # larger than any config file (and a duplicate key)
    bytes(range(256)) * 10,
], ids=["binary", "bad-toml", "deep-nesting", "huge-file", "all-bytes"])
def test_garbage_files_are_a_config_error(tmp_path, content):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(write(tmp_path, content), explicit=True)


def test_a_directory_as_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path, explicit=True)


def _random_value(rnd: random.Random, depth: int = 0):
    choices = [
        lambda: rnd.choice([True, False]),
        lambda: rnd.choice([0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 10**30]),
        lambda: rnd.choice([0.5, -2.5, 1e300, -1e300, math.inf, -math.inf, math.nan]),
        lambda: rnd.choice(["", "no", "yes", "true", "r:5000", "a/b", "linux/amd64", "x\r\ny", "\0"]),
        lambda: [_random_value(rnd, depth + 1) for _ in range(rnd.randrange(3))],
        lambda: {rnd.choice(["host", "insecure", "mirrors", "x", "r:5000"]): _random_value(rnd, depth + 1)
                 for _ in range(rnd.randrange(3))},
    ]
    return rnd.choice(choices[:4] if depth > 3 else choices)()


def _paths(doc: dict, prefix: tuple = ()):
    for key, value in doc.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def test_no_mutation_of_the_shipped_file_escapes_as_anything_but_a_config_error():
    """Seeded mutations of the documented file (every key, plus the [resolver] examples): each
    value replaced by one of another type or an extreme, or a random key added. Loading either
    works or is a ConfigError: never another exception (a traceback at start)."""
    base = tomllib.loads(SHIPPED.read_text())
    base["resolver"]["host"] = {
        "docker.io": {"mirrors": [{"host": "mirror.example.com:5000", "insecure": False, "request_timeout_sec": 0,
                                   "header": {"X-Foo": "bar"}}]},
        "registry.example.com:5000": {"insecure": True, "ca_file": "/etc/ca.pem", "username": "u", "password": "p",
                                      "header": {"X-Team": "storage"}},
    }
    rnd = random.Random(11)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(1500):
        doc = tomllib.loads(SHIPPED.read_text()) if rnd.random() < 0.1 else _deep_copy(base)
        for _ in range(rnd.randrange(1, 4)):
            path = rnd.choice(list(_paths(doc)))
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if rnd.random() < 0.8:
                parent[path[-1]] = _random_value(rnd)
            else:
                parent[f"{path[-1]}_x"] = _random_value(rnd)
        try:
            config_from_toml(doc)
            outcomes["ok"] += 1
        except ConfigError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["ok"] > 50 and outcomes["refused"] > 500, outcomes


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _stargz_store_command() -> list[str]:
    script = Path(sys.executable).parent / "stargz-store"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stargz_store.cli"]


@pytest.mark.parametrize("content", [
    '[resolver.host."r:5000"]\ninsecure = "no"\n',
    '[resolver]\nhost = "x"\n',
    "[blob]\nmax_retries = 99999999999999999999999999999\n",
    "\xff\xfe garbage",
    "a = " + "[" * 5000 + "]" * 5000,
], ids=["insecure-no", "host-string", "huge-number", "binary", "deep-nesting"])
def test_the_stargz_store_command_exits_2_with_one_line_and_no_traceback(tmp_path, content):
    config = tmp_path / "config.toml"
    config.write_bytes(content.encode("latin-1") if content.startswith("\xff") else content.encode())
    # A store that wrongly accepted the config would mount here and keep running: the timeout then
    # fails the test, and the mount is detached so nothing is left behind.
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        result = subprocess.run([*_stargz_store_command(), "--root", str(tmp_path / "root"), "--config", str(config),
                                 str(mountpoint)], capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        lazy_unmount(mountpoint)
        pytest.fail(f"the store accepted {content[:40]!r} and kept running")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and str(config) in errors[0], result.stderr
    assert not (tmp_path / "root").exists()  # refused before anything was created
