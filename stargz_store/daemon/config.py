"""config.toml for the daemon: the stargz-store keys that apply (stargz-store-config.md §2), plus ours.

Every key of the file is checked, with its full table path in the message: a value of the wrong
type or out of range is an error at start (so is any unknown key under `[resolver]`, where hosts,
mirrors, CAs and credentials live: see `registry.config`); an unknown key elsewhere and a valid
stargz-store key without effect here are warnings, once each. The Go store ignores unknown keys
silently; we accept the same files but a typo must not go unnoticed. A file that cannot be used
is a ConfigError with one line of text, whatever it holds. Every key with its default is
documented in `config/config.toml`.
"""
from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..fs.fuse_adapter import MountOptions
from ..fs.idmap import ROOTFUL, Ownership
from ..layer.config import FETCH_POLICIES, LayerConfig
from ..registry.config import (
    MAX_INTEGER, MAX_SECONDS, ConfigTable, ConfigValueError, RegistryConfig, describe,
)
from ..registry.errors import InvalidReferenceError
from ..registry.platforms import parse_platform
from .pool_config import PoolConfig

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/stargz-store/config.toml"
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; this bounds what a wrong path (a device) costs
MAX_WORKERS = 256  # max_concurrency, resolve_workers: threads

# Keys per table: "used" ones change behaviour; the others are valid stargz-store keys without an
# effect in this implementation (warned about when set), with their kind ("bool", "int", "str" or
# the allowed strings), checked like any value. `[resolver]` and `[blob]` are RegistryConfig's.
_TOP_USED = {
    "resolve_result_entry_ttl_sec", "prefetch_size", "prefetch_timeout_sec", "noprefetch",
    "no_background_fetch", "debug", "disable_verification", "max_concurrency", "log_file_access",
    "metrics_address", "no_prometheus",
}
_TOP_NO_EFFECT: dict[str, Any] = {
    "http_cache_type": "str", "filesystem_cache_type": "str", "prefetch_async_size": "int",
    "allow_no_verification": "bool", "resolve_result_entry": "int",
    "metadata_store": ("memory", "db"),
}
_REGISTRY_TABLES = {"resolver", "blob"}
_TABLES: dict[str, tuple[set[str], dict[str, Any]]] = {
    "directory_cache": (set(), {"max_lru_cache_entry": "int", "max_cache_fds": "int", "sync_add": "bool",
                                "direct": "bool", "fadv_dontneed": "bool"}),
    "fuse": ({"attr_timeout", "entry_timeout"}, {"passthrough": "bool", "merge_buffer_size": "int",
                                                 "merge_worker_count": "int"}),
    "kubeconfig_keychain": (set(), {"enable_keychain": "bool", "kubeconfig_path": "str"}),
    "store": (
        {"negative_cache_ttl_sec", "resolve_timeout_sec", "resolve_workers", "memory_cache_size_mb",
         "max_toc_size_mb", "max_toc_entries", "max_path_depth", "max_chunk_size_mb", "platform", "kernel_cache", "negative_timeout", "read_ahead_kb",
         "sequential_readahead_kb", "wait_for_prefetch", "prefetch_piece_kb", "neighbour_fetch_kb",
         "executable_fetch_limit_mb", "library_readahead", "import_readahead", "start_fetch_mb", "fuse_no_open", "small_layer_fetch_kb",
         "background_waits_for_reads", "fetch_policy", "idle_layers", "max_images", "max_use_counts", "cache_max_size_gb", "spare_server",
         "passthrough", "passthrough_min_kb", "passthrough_keep_files", "passthrough_copy_wait_sec"},
        {},
    ),
    "record": ({"images", "max_entries"}, {}),
}



class ConfigError(Exception):
    """The config file is missing (when explicitly given), unreadable or invalid."""


@dataclass
class StoreConfig:
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    layer: LayerConfig = field(default_factory=LayerConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    spare_server: bool = False  # the holder keeps a second serving process ready for a crash (daemon.holder)
    passthrough_min_bytes: int = 0  # smallest file given a backing file for passthrough (`layer.backing`)
    mount: MountOptions = field(default_factory=MountOptions)
    memory_cache_bytes: int = 16 << 20  # see config.toml: the kernel's page cache keeps what was read
    log_file_access: bool = False
    ownership: Ownership = ROOTFUL  # from the flags (--rootless, --uidmap/--gidmap), not from the file
    metrics_address: str | None = None  # host:port of the Prometheus endpoint; None = off
    cache_max_bytes: int | None = None  # the disk cache's limit; None = none
    record_images: tuple[str, ...] = ()  # [record] images: recorded from the start ("*": all)
    record_max_entries: int = 1_000_000


def load_config(path: str | Path, *, explicit: bool) -> StoreConfig:
    """Read `path`; a missing file is fine only when it is the default path (as in stargz-store)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if explicit and str(p) != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"config file {p} does not exist") from None
        log.info("no config file at %s; using defaults", p)
        return config_from_toml({})
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {p} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from None
    except RecursionError:
        raise ConfigError(f"cannot read config {p}: arrays or tables nested too deeply") from None
    try:
        return config_from_toml(doc)
    except ConfigError as e:
        raise ConfigError(f"config {p}: {e}") from None


def config_from_toml(doc: Mapping[str, Any]) -> StoreConfig:
    """Check every key of the parsed file (see the module docstring) and build the config."""
    try:
        root = ConfigTable(doc)
        _check_keys(root)
        return _build(root)
    except ConfigValueError as e:
        raise ConfigError(str(e)) from None


def _check_keys(root: ConfigTable) -> None:
    root.check_keys(_TOP_USED | _REGISTRY_TABLES | set(_TABLES), _TOP_NO_EFFECT, strict=False)
    for name, (used, no_effect) in _TABLES.items():
        root.table(name).check_keys(used, no_effect, strict=False)


def _build(doc: ConfigTable) -> StoreConfig:
    cfg = StoreConfig()
    cfg.registry = RegistryConfig.from_toml(doc)
    blob = doc.table("blob")
    fuse = doc.table("fuse")
    store = doc.table("store")

    layer = cfg.layer
    layer.prefetch_size = _int(doc, "prefetch_size", layer.prefetch_size, minimum=0)
    layer.prefetch_timeout = float(_num(doc, "prefetch_timeout_sec", layer.prefetch_timeout))
    layer.no_prefetch = _bool(doc, "noprefetch", layer.no_prefetch)
    layer.prefetch_wait = _bool(store, "wait_for_prefetch", layer.prefetch_wait)
    layer.prefetch_piece_size = _int_or_off(store, "prefetch_piece_kb", layer.prefetch_piece_size >> 10) << 10
    # The fetch policies' defaults are LayerConfig's (the one table, layer/config.py); 0 = off.
    layer.executable_fetch_limit = _int_or_off(store, "executable_fetch_limit_mb", layer.executable_fetch_limit >> 20) << 20
    layer.neighbour_fetch_size = _int_or_off(store, "neighbour_fetch_kb", layer.neighbour_fetch_size >> 10) << 10
    layer.small_layer_fetch_size = _int_or_off(store, "small_layer_fetch_kb", layer.small_layer_fetch_size >> 10) << 10
    layer.readahead_size = _int_or_off(store, "sequential_readahead_kb", layer.readahead_size >> 10) << 10
    layer.library_readahead = _bool(store, "library_readahead", layer.library_readahead)
    layer.import_readahead = _bool(store, "import_readahead", layer.import_readahead)
    layer.start_fetch_limit = _int_or_off(store, "start_fetch_mb", layer.start_fetch_limit >> 20) << 20
    layer.background_waits_for_reads = _bool(store, "background_waits_for_reads", layer.background_waits_for_reads)
    layer.no_background_fetch = _bool(doc, "no_background_fetch", layer.no_background_fetch)
    layer.disable_verification = _bool(doc, "disable_verification", layer.disable_verification)
    layer.max_concurrency = _int(doc, "max_concurrency", layer.max_concurrency, minimum=1, maximum=MAX_WORKERS)
    layer.fetch_timeout = float(_num(blob, "fetching_timeout_sec", layer.fetch_timeout))
    layer.max_toc_size = _int(store, "max_toc_size_mb", layer.max_toc_size >> 20, minimum=1) << 20
    layer.max_toc_entries = _int(store, "max_toc_entries", layer.max_toc_entries, minimum=1)
    layer.max_path_depth = _int(store, "max_path_depth", layer.max_path_depth, minimum=1)
    layer.max_chunk_size = _int(store, "max_chunk_size_mb", layer.max_chunk_size >> 20, minimum=1) << 20
    if layer.disable_verification:
        log.warning("disable_verification = true: chunk digests are still checked when chunks are decoded")
    layer.fetch_policy = _choice(store, "fetch_policy", FETCH_POLICIES, layer.fetch_policy)
    if layer.fetch_policy == "baseline":  # the Go store's way: the heuristics' keys no longer apply
        cfg.layer = layer = layer.baseline()

    pool = cfg.pool
    pool.release_grace = float(_num(doc, "resolve_result_entry_ttl_sec", pool.release_grace))
    pool.negative_ttl = float(_num(store, "negative_cache_ttl_sec", pool.negative_ttl))
    pool.resolve_timeout = float(_num(store, "resolve_timeout_sec", pool.resolve_timeout))
    pool.resolve_workers = _int(store, "resolve_workers", pool.resolve_workers, minimum=1, maximum=MAX_WORKERS)
    pool.idle_layers = _int_or_off(store, "idle_layers", pool.idle_layers)
    pool.max_images = _positive(store, "max_images", pool.max_images)
    pool.max_use_counts = _positive(store, "max_use_counts", pool.max_use_counts)
    cfg.spare_server = _bool(store, "spare_server", cfg.spare_server)
    pool.platform = _platform(store, "platform")

    cfg.mount = MountOptions(
        attr_timeout=float(_num(fuse, "attr_timeout", cfg.mount.attr_timeout)),
        entry_timeout=float(_num(fuse, "entry_timeout", cfg.mount.entry_timeout)),
        negative_timeout=float(_num(store, "negative_timeout", cfg.mount.negative_timeout)),
        kernel_cache=_bool(store, "kernel_cache", cfg.mount.kernel_cache),
        read_ahead_kb=_int_or_off(store, "read_ahead_kb", cfg.mount.read_ahead_kb),
        no_open=_bool(store, "fuse_no_open", cfg.mount.no_open),
        passthrough=_bool(store, "passthrough", cfg.mount.passthrough),
        passthrough_keep=_int_or_off(store, "passthrough_keep_files", cfg.mount.passthrough_keep),
        debug=_bool(doc, "debug", False),
    )
    cfg.passthrough_min_bytes = _int_or_off(store, "passthrough_min_kb", cfg.passthrough_min_bytes >> 10) << 10
    copy_wait = store.number("passthrough_copy_wait_sec", minimum=0, maximum=3600)  # 0 = copy at once
    if copy_wait is not None:
        cfg.layer.backing_copy_wait = float(copy_wait)
    cfg.log_file_access = _bool(doc, "log_file_access", False)
    cfg.memory_cache_bytes = _int_or_off(store, "memory_cache_size_mb", cfg.memory_cache_bytes >> 20) << 20
    cfg.metrics_address = _metrics_address(doc)
    limit_gb = store.number("cache_max_size_gb", minimum=0, maximum=1 << 20)
    cfg.cache_max_bytes = int(limit_gb * (1 << 30)) if limit_gb else None
    record = doc.table("record")
    cfg.record_images = _record_images(record, "images")
    cfg.record_max_entries = _positive(record, "max_entries", cfg.record_max_entries)
    return cfg


def _metrics_address(doc: ConfigTable) -> str | None:
    """`metrics_address` ("host:port", "[v6]:port"; "" = off), unless `no_prometheus` turns it off."""
    address = doc.string("metrics_address") or None
    if address is not None:
        try:
            split_host_port(address)
        except ValueError as e:
            raise ConfigValueError(f"{doc.key_path('metrics_address')}: {e}") from None
    if doc.boolean("no_prometheus"):
        if address is not None:
            log.warning("no_prometheus = true: no metrics endpoint, although metrics_address = %r is set", address)
        return None
    return address


def split_host_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port" (an empty host: every address); ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (e.g. \"127.0.0.1:9110\")")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _record_images(table: ConfigTable, key: str) -> tuple[str, ...]:
    """Image references to record (canonical form, as the store names them) or `"*"` for all."""
    value = table[key] if key in table else None
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigValueError(f"{table.key_path(key)} must be an array of image references or \"*\", "
                               f"not {describe(value)}")
    from ..registry.reference import parse_reference

    images = []
    for text in value:
        if text == "*":
            images.append(text)
            continue
        try:
            images.append(str(parse_reference(text)))
        except InvalidReferenceError:
            raise ConfigValueError(f"{table.key_path(key)}: {describe(text)} is not an image reference") from None
    return tuple(images)


def _num(table: ConfigTable, key: str, default: float) -> float:
    """A duration in seconds; 0 or absent means the default, as the Go code falls back on zero values."""
    return table.number(key, minimum=0, maximum=MAX_SECONDS) or default


def _int(table: ConfigTable, key: str, default: int, *, minimum: int, maximum: int = MAX_INTEGER) -> int:
    """An integer; 0 or absent means the default."""
    value = table.number(key, minimum=0, maximum=maximum, integer=True)
    if not value:
        return default
    if value < minimum:
        raise ConfigValueError(f"{table.key_path(key)} must be an integer from {minimum} to {maximum}, "
                               f"not {describe(value)}")
    return value


def _int_or_off(table: ConfigTable, key: str, default: int) -> int:
    """An integer >= 0 of our own keys, where 0 turns the feature off (not "the default")."""
    value = table.number(key, minimum=0, maximum=MAX_INTEGER, integer=True)
    return default if value is None else value


def _choice(table: ConfigTable, key: str, allowed: tuple[str, ...], default: str) -> str:
    """One of `allowed`; absent means `default`."""
    value = table.string(key)
    if value is None:
        return default
    if value not in allowed:
        raise ConfigValueError(f"{table.key_path(key)} must be one of {', '.join(map(repr, allowed))}, "
                               f"not {describe(value)}")
    return value


def _positive(table: ConfigTable, key: str, default: int) -> int:
    """An integer >= 1 of our own keys (a bound: 0 would mean nothing can be kept)."""
    value = table.number(key, minimum=1, maximum=MAX_INTEGER, integer=True)
    return default if value is None else value


def _bool(table: ConfigTable, key: str, default: bool) -> bool:
    value = table.boolean(key)
    return default if value is None else value


def _platform(table: ConfigTable, key: str) -> str | None:
    """`os/arch[/variant]`, checked now rather than at the first pull; "" or absent = this host's."""
    value = table.string(key)
    if not value:
        return None
    try:
        parse_platform(value)
    except InvalidReferenceError:
        raise ConfigValueError(f"{table.key_path(key)} must be \"os/arch[/variant]\", not {describe(value)}") from None
    return value
