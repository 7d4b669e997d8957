"""config.toml for the daemon: the stargz-store keys that apply (stargz-store-config.md §2), plus ours.

The Go store ignores unknown keys silently; we accept the same files but warn about keys we do not
know (a typo otherwise goes unnoticed) and about known keys that have no effect here. Every key
with its default is documented in `config/config.toml`.
"""
from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..fs.fuse_adapter import MountOptions
from ..layer.config import LayerConfig
from ..registry.config import RegistryConfig
from .pool import PoolConfig

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/stargz-store/config.toml"

# Keys per table: "used" ones change behaviour; "accepted" ones are valid stargz-store keys without
# an effect in this implementation (logged once at start-up when set).
_TOP_USED = {
    "resolve_result_entry_ttl_sec", "prefetch_size", "prefetch_timeout_sec", "noprefetch",
    "no_background_fetch", "debug", "disable_verification", "max_concurrency", "log_file_access",
}
_TOP_ACCEPTED = {
    "http_cache_type", "filesystem_cache_type", "prefetch_async_size", "allow_no_verification",
    "no_prometheus", "resolve_result_entry", "metadata_store",
}
_TABLES: dict[str, tuple[set[str], set[str]]] = {
    "blob": (
        {"fetching_timeout_sec", "max_retries", "min_wait_msec", "max_wait_msec", "valid_interval",
         "check_always", "force_single_range_mode"},
        {"chunk_size", "prefetch_chunk_size"},
    ),
    "directory_cache": (set(), {"max_lru_cache_entry", "max_cache_fds", "sync_add", "direct", "fadv_dontneed"}),
    "fuse": ({"attr_timeout", "entry_timeout"}, {"passthrough", "merge_buffer_size", "merge_worker_count"}),
    "kubeconfig_keychain": (set(), {"enable_keychain", "kubeconfig_path"}),
    "resolver": ({"request_timeout_sec", "host", "connect_timeout_sec", "auth_file", "ca_file"}, set()),
    "store": (
        {"negative_cache_ttl_sec", "resolve_timeout_sec", "resolve_workers", "memory_cache_size_mb",
         "max_toc_size_mb", "max_toc_entries", "max_path_depth", "platform", "kernel_cache", "negative_timeout", "read_ahead_kb",
         "sequential_readahead_kb", "wait_for_prefetch", "neighbour_fetch_kb",
         "executable_fetch_limit_mb", "library_readahead", "fuse_no_open", "small_layer_fetch_kb"},
        set(),
    ),
}


# `sequential_readahead_kb`: a read that continues where the previous read of the same file ended also starts fetching the
# file's next chunks, this many KiB of compressed data ahead (random reads fetch only their chunks).
DAEMON_READAHEAD_KB = 0
# `neighbour_fetch_kb`: see LayerConfig.neighbour_fetch_size.
DAEMON_NEIGHBOUR_FETCH_KB = 64
# `executable_fetch_limit_mb`: see LayerConfig.executable_fetch_limit.
DAEMON_EXECUTABLE_FETCH_MB = 64
# `small_layer_fetch_kb`: see LayerConfig.small_layer_fetch_size.
DAEMON_SMALL_LAYER_FETCH_KB = 2048


class ConfigError(Exception):
    """The config file is missing (when explicitly given), unreadable or invalid."""


@dataclass
class StoreConfig:
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    layer: LayerConfig = field(default_factory=LayerConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    mount: MountOptions = field(default_factory=MountOptions)
    memory_cache_bytes: int = 64 << 20
    log_file_access: bool = False


def load_config(path: str | Path, *, explicit: bool) -> StoreConfig:
    """Read `path`; a missing file is fine only when it is the default path (as in stargz-store)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit and str(p) != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"config file {p} does not exist") from None
        log.info("no config file at %s; using defaults", p)
        doc = {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {p}: {e}") from None
    return config_from_toml(doc)


def config_from_toml(doc: Mapping[str, Any]) -> StoreConfig:
    _warn_unknown(doc)
    try:
        return _build(doc)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"invalid config value: {e}") from None


def _build(doc: Mapping[str, Any]) -> StoreConfig:
    cfg = StoreConfig()
    cfg.registry = RegistryConfig.from_toml(doc)
    blob = doc.get("blob") or {}
    fuse = doc.get("fuse") or {}
    store = doc.get("store") or {}

    layer = cfg.layer
    layer.prefetch_size = _int(doc, "prefetch_size", layer.prefetch_size, minimum=0)
    layer.prefetch_timeout = float(_num(doc, "prefetch_timeout_sec", layer.prefetch_timeout))
    layer.no_prefetch = _bool(doc, "noprefetch", layer.no_prefetch)
    layer.prefetch_wait = _bool(store, "wait_for_prefetch", layer.prefetch_wait)
    layer.executable_fetch_limit = _int_or_off(store, "executable_fetch_limit_mb", DAEMON_EXECUTABLE_FETCH_MB) << 20
    layer.neighbour_fetch_size = _int_or_off(store, "neighbour_fetch_kb", DAEMON_NEIGHBOUR_FETCH_KB) << 10
    layer.small_layer_fetch_size = _int_or_off(store, "small_layer_fetch_kb", DAEMON_SMALL_LAYER_FETCH_KB) << 10
    layer.no_background_fetch = _bool(doc, "no_background_fetch", layer.no_background_fetch)
    layer.disable_verification = _bool(doc, "disable_verification", layer.disable_verification)
    layer.max_concurrency = _int(doc, "max_concurrency", layer.max_concurrency, minimum=1)
    layer.fetch_timeout = float(_num(blob, "fetching_timeout_sec", layer.fetch_timeout))
    layer.max_toc_size = _int(store, "max_toc_size_mb", layer.max_toc_size >> 20, minimum=1) << 20
    layer.max_toc_entries = _int(store, "max_toc_entries", layer.max_toc_entries, minimum=1)
    layer.max_path_depth = _int(store, "max_path_depth", layer.max_path_depth, minimum=1)
    layer.readahead_size = _int(store, "sequential_readahead_kb", DAEMON_READAHEAD_KB, minimum=0) << 10
    if layer.disable_verification:
        log.warning("disable_verification = true: chunk digests are still checked when chunks are decoded")

    pool = cfg.pool
    pool.release_grace = float(_num(doc, "resolve_result_entry_ttl_sec", pool.release_grace))
    pool.negative_ttl = float(_num(store, "negative_cache_ttl_sec", pool.negative_ttl))
    pool.resolve_timeout = float(_num(store, "resolve_timeout_sec", pool.resolve_timeout))
    pool.resolve_workers = _int(store, "resolve_workers", pool.resolve_workers, minimum=1)
    pool.library_readahead = _bool(store, "library_readahead", pool.library_readahead)
    platform = store.get("platform")
    pool.platform = str(platform) if platform else None

    cfg.mount = MountOptions(
        attr_timeout=float(_num(fuse, "attr_timeout", cfg.mount.attr_timeout)),
        entry_timeout=float(_num(fuse, "entry_timeout", cfg.mount.entry_timeout)),
        negative_timeout=float(_num(store, "negative_timeout", cfg.mount.negative_timeout)),
        kernel_cache=_bool(store, "kernel_cache", cfg.mount.kernel_cache),
        read_ahead_kb=_int(store, "read_ahead_kb", cfg.mount.read_ahead_kb, minimum=0),
        no_open=_bool(store, "fuse_no_open", cfg.mount.no_open),
        debug=_bool(doc, "debug", False),
    )
    cfg.log_file_access = _bool(doc, "log_file_access", False)
    cfg.memory_cache_bytes = _int(store, "memory_cache_size_mb", cfg.memory_cache_bytes >> 20, minimum=0) << 20
    return cfg


def _warn_unknown(doc: Mapping[str, Any]) -> None:
    for key, value in doc.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            used, accepted = _TABLES[key]
            for sub in value:
                if sub in accepted:
                    log.debug("config key %s.%s has no effect in this implementation", key, sub)
                elif sub not in used:
                    log.warning("unknown config key %s.%s (ignored)", key, sub)
        elif key in _TOP_ACCEPTED:
            if key == "metadata_store" and value not in ("memory", "db"):
                raise ConfigError(f"metadata_store must be \"memory\" or \"db\", not {value!r}")
            log.debug("config key %s has no effect in this implementation", key)
        elif key not in _TOP_USED:
            log.warning("unknown config key %s (ignored)", key)
    if (doc.get("fuse") or {}).get("passthrough"):
        log.warning("fuse.passthrough is not supported; reads go through the daemon")
    if (doc.get("kubeconfig_keychain") or {}).get("enable_keychain"):
        log.warning("kubeconfig_keychain is not supported; credentials come from resolver.auth_file")


def _num(table: Mapping[str, Any], key: str, default: float) -> float:
    """A number; 0 or absent means the default, as the Go code falls back on zero values."""
    value = table.get(key)
    if value is None or value == 0:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{key} must not be negative, got {value!r}")
    return value


def _int(table: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = _num(table, key, default)
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _int_or_off(table: Mapping[str, Any], key: str, default: int) -> int:
    """An integer >= 0 of our own keys, where 0 turns the feature off (not "the default")."""
    value = table.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
    return value


def _bool(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value
