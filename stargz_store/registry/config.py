"""Client configuration and the host -> endpoint mapping (mirrors, scheme, TLS, extra headers).

Mirrors of a host are tried in order, then the host itself (config §2.6). Loopback hosts and hosts
marked insecure may use plain HTTP; everything else is HTTPS with verification.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from .reference import DOCKER_HUB, normalize_registry

log = logging.getLogger(__name__)

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"


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
    push_chunk_size: int = 16 * 1024 * 1024
    monolithic_push_limit: int = 64 * 1024 * 1024
    user_agent: str = "stargz-store-python/0.1"

    @classmethod
    def from_toml(cls, doc: Mapping[str, Any]) -> RegistryConfig:
        """Build from a parsed config.toml: `[resolver]` (hosts, mirrors) and `[blob]` (retries, ranges).

        Extension keys under `[resolver.host."H"]`: `insecure`, `ca_file`, `header`, `username`,
        `password`; `[resolver]`
        also accepts `auth_file`, `connect_timeout_sec`, `ca_file`.
        """
        resolver = doc.get("resolver") or {}
        blob = doc.get("blob") or {}
        cfg = cls()
        timeout = resolver.get("request_timeout_sec")
        if isinstance(timeout, (int, float)) and timeout > 0:
            cfg.read_timeout = float(timeout)
        if resolver.get("connect_timeout_sec"):
            cfg.connect_timeout = float(resolver["connect_timeout_sec"])
        cfg.auth_file = resolver.get("auth_file") or None
        cfg.ca_bundle = resolver.get("ca_file") or None
        if isinstance(blob.get("max_retries"), int) and blob["max_retries"] >= 0:
            cfg.max_retries = blob["max_retries"]
        if blob.get("min_wait_msec"):
            cfg.min_wait = blob["min_wait_msec"] / 1000.0
        if blob.get("max_wait_msec"):
            cfg.max_wait = blob["max_wait_msec"] / 1000.0
        if isinstance(blob.get("fetching_timeout_sec"), (int, float)) and blob["fetching_timeout_sec"] > 0:
            cfg.max_retry_time = float(blob["fetching_timeout_sec"])  # retries never outlast a fetch's budget
        if blob.get("valid_interval"):
            cfg.redirect_valid_interval = float(blob["valid_interval"])
        if blob.get("check_always"):
            cfg.redirect_valid_interval = 0.0
        cfg.force_single_range = bool(blob.get("force_single_range_mode", False))
        for name, table in (resolver.get("host") or {}).items():
            host_cfg = HostConfig(
                insecure=bool(table.get("insecure", False)),
                ca_bundle=table.get("ca_file") or None,
                headers=_headers(table.get("header")),
                username=table.get("username") or None,
                password=table.get("password") or None,
            )
            for m in table.get("mirrors") or []:
                t = m.get("request_timeout_sec", 0) or 0
                host_cfg.mirrors.append(MirrorConfig(
                    host=m["host"],
                    insecure=bool(m.get("insecure", False)),
                    request_timeout=None if t == 0 else (None if t < 0 else float(t)),
                    headers=_headers(m.get("header")),
                ))
            cfg.hosts[normalize_registry(name)] = host_cfg
        return cfg

    def host_config(self, host: str) -> HostConfig:
        return self.hosts.get(host) or HostConfig()

    def is_insecure(self, host: str) -> bool:
        return host in self.insecure_hosts or self.host_config(host).insecure


def _headers(value: Any) -> dict[str, str]:
    """TOML header tables allow a string or a list of strings; join lists the HTTP way."""
    out: dict[str, str] = {}
    for k, v in (value or {}).items():
        out[str(k)] = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
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
