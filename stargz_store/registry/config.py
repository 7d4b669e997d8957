"""Client configuration and the host -> endpoint mapping (mirrors, scheme, TLS, extra headers).

Mirrors of a host are tried in order, then the host itself (config §2.6). Loopback hosts and hosts
marked insecure may use plain HTTP; everything else is HTTPS with verification.

`[resolver]` and `[blob]` of config.toml are read here, strictly: a value of the wrong type or out
of range is a `ConfigValueError` naming its full path (`resolver.host."r:5000".mirrors[0].insecure`),
never a guess (`insecure = "no"` must not turn TLS verification off). An unknown key inside
`[resolver]` (hosts, mirrors, credentials, CAs) is an error too, as a misspelt key there silently
drops a security setting; elsewhere it is a warning.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NoReturn

from .reference import DOCKER_HUB, is_registry_host, normalize_registry

log = logging.getLogger(__name__)

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

# Longest duration a key may ask for: a year is beyond any sensible timeout, and far below what
# makes a thread wait overflow (`inf` or 1e300 seconds would, at the first wait).
MAX_SECONDS = 365 * 24 * 3600
# Largest integer a key of an unspecified range may hold (sizes, counts): far above any useful
# value, far below what C-level conversions overflow on.
MAX_INTEGER = 1 << 40
MAX_RETRIES = 100
MAX_WHOLE_BLOB_MB = 4096  # a blob held whole in memory: far beyond any sensible setting

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110 §5.6.2)


class ConfigValueError(ValueError):
    """A config.toml key or value that cannot be used as written; the message starts with its full
    path and never holds a secret's value."""


def key_path(parent: str, key: str) -> str:
    """`parent.key` as TOML writes it: a key that is not bare is quoted (`host."r:5000"`)."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{parent}.{part}" if parent else part


def describe(value: Any, *, secret: bool = False) -> str:
    """What a wrong value is, for a one-line message: its type, and the value itself when it is
    short and not a secret."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a number"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        return "an array"
    elif isinstance(value, Mapping):
        return "a table"
    else:
        kind = "a date or time"
    text = repr(value)
    return kind if secret or len(text) > 40 else f"{kind} ({text})"


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class ConfigTable(Mapping[str, Any]):
    """One table of a parsed config.toml with its path, read key by key.

    Every reader checks the value's type and range and raises ConfigValueError naming the key's
    full path; an absent key reads as None, so each caller keeps its own "absent or 0 means the
    default" rule. `check_keys` reports the keys that no reader of this table knows.
    """

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ConfigValueError(f"{path or 'the config file'} must be a table, not {describe(data)}")
        self._data = data
        self.path = path

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def key_path(self, key: str) -> str:
        return key_path(self.path, key)

    def _wrong(self, key: str, expected: str, value: Any, *, secret: bool = False) -> NoReturn:
        raise ConfigValueError(f"{self.key_path(key)} must be {expected}, not {describe(value, secret=secret)}")

    def boolean(self, key: str) -> bool | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, bool):
            self._wrong(key, "true or false", value)
        return value

    def string(self, key: str, *, secret: bool = False) -> str | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, str):
            self._wrong(key, "a string", value, secret=secret)
        if value is not None and "\0" in value:
            raise ConfigValueError(f"{self.key_path(key)} must not hold a NUL character")
        return value

    def number(self, key: str, *, minimum: float, maximum: float, integer: bool = False) -> int | float | None:
        """An integer (`integer`) or any number within [minimum, maximum]; nan and inf never are."""
        value = self._data.get(key)
        if value is None:
            return None
        expected = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self._wrong(key, expected, value)
        if (isinstance(value, float) and not math.isfinite(value)) or not minimum <= value <= maximum:
            self._wrong(key, f"{expected} from {_number_text(minimum)} to {_number_text(maximum)}", value)
        return value

    def table(self, key: str) -> ConfigTable:
        """The sub-table `key` (empty when absent)."""
        value = self._data.get(key)
        return ConfigTable({} if value is None else value, self.key_path(key))

    def table_array(self, key: str) -> list[ConfigTable]:
        """The array of tables `key` (`[[key]]`; empty when absent)."""
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self._wrong(key, "an array of tables", value)
        return [ConfigTable(item, f"{self.key_path(key)}[{i}]") for i, item in enumerate(value)]

    def check_keys(self, used: Iterable[str], no_effect: Mapping[str, Any] | None = None, *, strict: bool) -> None:
        """Report keys outside `used`: one of `no_effect` (key -> "bool", "int", "str" or a tuple of
        the allowed strings; checked like any value) is a warning, as is an unknown key, unless the
        table is `strict` (security-relevant), where an unknown key is an error."""
        used, no_effect = set(used), no_effect or {}
        for key in self._data:
            if key in used:
                continue
            if key in no_effect:
                self._check_kind(key, no_effect[key])
                log.warning("config key %s has no effect in this implementation (ignored)", self.key_path(key))
            elif strict:
                raise ConfigValueError(f"{self.key_path(key)} is not a known key (misspelt?)")
            else:
                log.warning("unknown config key %s (ignored)", self.key_path(key))

    def _check_kind(self, key: str, kind: Any) -> None:
        if kind == "bool":
            self.boolean(key)
        elif kind == "int":
            self.number(key, minimum=-MAX_INTEGER, maximum=MAX_INTEGER, integer=True)
        elif kind == "str":
            self.string(key)
        elif self._data[key] not in kind:
            self._wrong(key, " or ".join(json.dumps(k) for k in kind), self._data[key])


@dataclass
class MirrorConfig:
    """One mirror endpoint of a host (`[[resolver.host."H".mirrors]]`)."""

    host: str
    insecure: bool = False
    request_timeout: float | None = None  # None = the global read timeout
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class HostConfig:
    """Per-registry-host settings beyond the plain `mirrors`/`insecure_hosts` shortcuts."""

    mirrors: list[MirrorConfig] = field(default_factory=list)
    insecure: bool = False
    ca_bundle: str | None = None  # PEM file to verify this host's TLS certificate with
    headers: dict[str, str] = field(default_factory=dict)
    tls: bool | None = None  # force https (True) or http (False); None = automatic
    username: str | None = None  # credentials from config.toml win over auth files
    password: str | None = field(default=None, repr=False)


@dataclass
class RegistryConfig:
    """Everything the client needs from config.toml; the defaults are safe for production."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_retries: int = 3
    pool_size: int = 32
    insecure_hosts: tuple[str, ...] = ()  # plain HTTP or no TLS verification; loopback always may use HTTP
    mirrors: dict[str, list[str]] = field(default_factory=dict)  # host -> mirror hosts
    auth_file: str | None = None
    # Extensions beyond the shared surface.
    hosts: dict[str, HostConfig] = field(default_factory=dict)
    ca_bundle: str | None = None  # global extra CA bundle (None = system store / REQUESTS_CA_BUNDLE)
    min_wait: float = 0.03  # first back-off, seconds
    max_wait: float = 10.0  # cap of one back-off, seconds
    max_retry_time: float = 120.0  # total time budget of one operation's retries, seconds
    redirect_valid_interval: float = 60.0  # reuse a blob's redirect target this long
    force_single_range: bool = False
    # A 200 with the whole blob to a range request (a pull-through mirror still filling, a server
    # without ranges): blobs up to `whole_blob_limit` bytes are read whole and held in memory
    # (at most `whole_blob_memory` bytes in all); see registry/ranged.py. 0 = never.
    whole_blob_limit: int = 4 << 20
    whole_blob_memory: int = 32 << 20
    mirror_retry: float = 0.5  # first per-blob back-off of a mirror that could not serve a range, seconds
    mirror_fill_wait: float = 0.0  # a read waits this long at most for a filling mirror (0: the origin meanwhile)
    mirror_race: float = 0.1  # a mirror not known to hold a blob answers within this, or the origin is asked too
    background_mirror_wait: float = 30.0  # background fetch waits this long at most for a filling mirror
    push_chunk_size: int = 16 * 1024 * 1024
    monolithic_push_limit: int = 64 * 1024 * 1024
    user_agent: str = "stargz-store-python/0.1"

    @classmethod
    def from_toml(cls, doc: Mapping[str, Any]) -> RegistryConfig:
        """Build from a parsed config.toml: `[resolver]` (hosts, mirrors) and `[blob]` (retries, ranges).

        Extension keys under `[resolver.host."H"]`: `insecure`, `ca_file`, `header`, `username`,
        `password`; `[resolver]` also accepts `auth_file`, `connect_timeout_sec`, `ca_file`.
        Raises ConfigValueError (see the module docstring); warns about keys without effect.
        """
        root = doc if isinstance(doc, ConfigTable) else ConfigTable(doc)
        resolver, blob = root.table("resolver"), root.table("blob")
        resolver.check_keys(RESOLVER_KEYS, strict=True)
        blob.check_keys(BLOB_KEYS, BLOB_NO_EFFECT, strict=False)
        cfg = cls()
        cfg.read_timeout = _timeout(resolver, "request_timeout_sec") or cfg.read_timeout
        cfg.connect_timeout = float(_seconds(resolver, "connect_timeout_sec") or cfg.connect_timeout)
        cfg.auth_file = resolver.string("auth_file") or None
        cfg.ca_bundle = resolver.string("ca_file") or None
        retries = blob.number("max_retries", minimum=0, maximum=MAX_RETRIES, integer=True)
        cfg.max_retries = cfg.max_retries if retries is None else retries
        cfg.min_wait = (_msec(blob, "min_wait_msec") or cfg.min_wait * 1000) / 1000
        cfg.max_wait = (_msec(blob, "max_wait_msec") or cfg.max_wait * 1000) / 1000
        # retries never outlast a fetch's budget
        cfg.max_retry_time = float(_seconds(blob, "fetching_timeout_sec") or cfg.max_retry_time)
        cfg.redirect_valid_interval = float(_seconds(blob, "valid_interval") or cfg.redirect_valid_interval)
        if blob.boolean("check_always"):
            cfg.redirect_valid_interval = 0.0
        cfg.force_single_range = bool(blob.boolean("force_single_range_mode"))
        limit = blob.number("whole_blob_limit_mb", minimum=0, maximum=MAX_WHOLE_BLOB_MB, integer=True)
        cfg.whole_blob_limit = cfg.whole_blob_limit if limit is None else limit << 20
        memory = blob.number("whole_blob_memory_mb", minimum=0, maximum=MAX_WHOLE_BLOB_MB, integer=True)
        cfg.whole_blob_memory = cfg.whole_blob_memory if memory is None else memory << 20
        cfg.mirror_retry = (_msec(blob, "mirror_retry_msec") or cfg.mirror_retry * 1000) / 1000
        fill_wait = _msec(blob, "mirror_fill_wait_msec")
        cfg.mirror_fill_wait = cfg.mirror_fill_wait if fill_wait is None else fill_wait / 1000
        race = _msec(blob, "mirror_race_msec")
        cfg.mirror_race = cfg.mirror_race if race is None else race / 1000
        background_wait = _msec(blob, "background_mirror_wait_msec")
        cfg.background_mirror_wait = cfg.background_mirror_wait if background_wait is None else background_wait / 1000
        hosts = resolver.table("host")
        for name in hosts:
            table = hosts.table(name)
            registry = normalize_registry(name)
            if not is_registry_host(name):
                raise ConfigValueError(f"{table.path}: {name!r} is not a registry host[:port]")
            if registry in cfg.hosts:
                raise ConfigValueError(f"{table.path} names the same registry ({registry}) as another host table")
            cfg.hosts[registry] = _host_config(table)
        return cfg

    def host_config(self, host: str) -> HostConfig:
        return self.hosts.get(host) or HostConfig()

    def is_insecure(self, host: str) -> bool:
        return host in self.insecure_hosts or self.host_config(host).insecure


# Keys of `[resolver]`, `[resolver.host."H"]`, its `[[...mirrors]]`, and of `[blob]`.
RESOLVER_KEYS = frozenset({"request_timeout_sec", "connect_timeout_sec", "auth_file", "ca_file", "host"})
HOST_KEYS = frozenset({"mirrors", "insecure", "ca_file", "header", "username", "password"})
MIRROR_KEYS = frozenset({"host", "insecure", "request_timeout_sec", "header"})
BLOB_KEYS = frozenset({"fetching_timeout_sec", "max_retries", "min_wait_msec", "max_wait_msec", "valid_interval",
                       "check_always", "force_single_range_mode", "whole_blob_limit_mb", "whole_blob_memory_mb",
                       "mirror_retry_msec", "mirror_fill_wait_msec", "mirror_race_msec",
                       "background_mirror_wait_msec"})
BLOB_NO_EFFECT = {"chunk_size": "int", "prefetch_chunk_size": "int"}


def _seconds(table: ConfigTable, key: str) -> float | None:
    return table.number(key, minimum=0, maximum=MAX_SECONDS)


def _msec(table: ConfigTable, key: str) -> float | None:
    return table.number(key, minimum=0, maximum=MAX_SECONDS * 1000)


def _timeout(table: ConfigTable, key: str) -> float | None:
    """A request timeout: 0 or absent is the default (None). Go reads < 0 as "no timeout"; a request
    here always has one, so a negative value is the default too, with a warning."""
    value = table.number(key, minimum=-MAX_SECONDS, maximum=MAX_SECONDS)
    if value is not None and value < 0:
        log.warning("config key %s < 0 (no timeout) is not supported: requests keep the default timeout",
                    table.key_path(key))
    return float(value) if value is not None and value > 0 else None


def _host_config(table: ConfigTable) -> HostConfig:
    table.check_keys(HOST_KEYS, strict=True)
    host_cfg = HostConfig(
        insecure=bool(table.boolean("insecure")),
        ca_bundle=table.string("ca_file") or None,
        headers=_headers(table.table("header")),
        username=table.string("username") or None,
        password=table.string("password", secret=True) or None,
    )
    if host_cfg.password and not host_cfg.username:
        raise ConfigValueError(f"{table.key_path('password')} is set without {table.key_path('username')}")
    for mirror in table.table_array("mirrors"):
        mirror.check_keys(MIRROR_KEYS, strict=True)
        host = mirror.string("host")
        if host is None:
            raise ConfigValueError(f"{mirror.key_path('host')} is missing")
        if not is_registry_host(_without_scheme(host)):
            raise ConfigValueError(f"{mirror.key_path('host')}: {host!r} is not host[:port] (no path)")
        host_cfg.mirrors.append(MirrorConfig(
            host=host,
            insecure=bool(mirror.boolean("insecure")),
            request_timeout=_timeout(mirror, "request_timeout_sec"),
            headers=_headers(mirror.table("header")),
        ))
    return host_cfg


def _without_scheme(host: str) -> str:
    """A mirror may be written `http://h:p` or `https://h:p/` (endpoints_for reads the scheme)."""
    if host.startswith(("http://", "https://")):
        return host.partition("://")[2].rstrip("/")
    return host


def _headers(table: ConfigTable) -> dict[str, str]:
    """TOML header tables allow a string or a list of strings; join lists the HTTP way. Values may
    hold tokens: never shown in a message. A line break would inject a header: refused."""
    out: dict[str, str] = {}
    for name, value in table.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigValueError(f"{table.key_path(name)}: not a valid HTTP header name")
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise ConfigValueError(f"{table.key_path(name)} must be a string or a non-empty array of strings, "
                                   f"not {describe(value, secret=True)}")
        if any(c in v for v in values for c in "\r\n\0"):
            raise ConfigValueError(f"{table.key_path(name)} must not hold a line break or NUL character")
        out[name] = ", ".join(values)
    return out


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1, with or without a port (containerd MatchLocalhost)."""
    name = host
    if name.startswith("["):
        name = name[1:name.index("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests for a registry host: a mirror or the origin itself."""

    host: str  # host[:port] the requests go to
    registry: str  # the reference's registry this endpoint serves
    is_mirror: bool
    insecure: bool  # plain HTTP allowed / TLS verification off
    tls: bool | None  # configured scheme, None = automatic
    verify: bool | str  # requests' verify argument
    headers: tuple[tuple[str, str], ...]
    read_timeout: float | None

    def default_scheme(self) -> str:
        if self.tls is not None:
            return "https" if self.tls else "http"
        # Insecure remote hosts start with unverified HTTPS and fall back to HTTP (containers/image).
        return "http" if is_loopback(self.host) else "https"


def endpoints_for(config: RegistryConfig, registry: str, *, pull: bool = True) -> list[Endpoint]:
    """Mirrors (pull only) in order, then the origin; docker.io is served by registry-1.docker.io."""
    result: list[Endpoint] = []
    host_cfg = config.host_config(registry)
    if pull:
        mirrors = [MirrorConfig(host=h) for h in config.mirrors.get(registry, [])] + list(host_cfg.mirrors)
        for m in mirrors:
            if m.host.startswith(("http://", "https://")):
                scheme, _, rest = m.host.partition("://")
                m = MirrorConfig(rest.rstrip("/"), m.insecure or scheme == "http", m.request_timeout, m.headers)
            if "/" in m.host or not m.host:
                log.warning("ignoring mirror %r of %s: expected host[:port]", m.host, registry)
                continue
            host = DOCKER_HUB_ENDPOINT if normalize_registry(m.host) == DOCKER_HUB else m.host
            m_cfg = config.host_config(m.host)
            insecure = m.insecure or config.is_insecure(m.host)
            result.append(Endpoint(
                host=host,
                registry=registry,
                is_mirror=True,
                insecure=insecure,
                tls=False if m.insecure else m_cfg.tls,
                verify=_verify(config, m_cfg, insecure),
                headers=tuple({**m_cfg.headers, **m.headers}.items()),
                read_timeout=m.request_timeout or config.read_timeout,
            ))
    insecure = config.is_insecure(registry)
    result.append(Endpoint(
        host=DOCKER_HUB_ENDPOINT if registry == DOCKER_HUB else registry,
        registry=registry,
        is_mirror=False,
        insecure=insecure,
        tls=host_cfg.tls if host_cfg.tls is not None else (True if host_cfg.ca_bundle else None),
        verify=_verify(config, host_cfg, insecure),
        headers=tuple(host_cfg.headers.items()),
        read_timeout=config.read_timeout,
    ))
    return result


def _verify(config: RegistryConfig, host_cfg: HostConfig, insecure: bool) -> bool | str:
    if insecure:
        return False
    return host_cfg.ca_bundle or config.ca_bundle or True
