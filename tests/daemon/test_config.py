"""config.toml and command line parsing (no mount needed)."""
from __future__ import annotations

import logging

import pytest

from stargz_store.daemon.cli import parse_args
from stargz_store.daemon.config import DEFAULT_CONFIG_PATH, ConfigError, config_from_toml, load_config


def test_shipped_config_file_loads_with_its_documented_defaults(caplog):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "config.toml"
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path, explicit=True)
    assert not [r for r in caplog.records if "unknown config key" in r.getMessage()]
    defaults = config_from_toml({})
    assert cfg.layer == defaults.layer
    assert cfg.pool == defaults.pool
    assert cfg.mount == defaults.mount
    assert cfg.memory_cache_bytes == defaults.memory_cache_bytes


def test_keys_reach_the_components():
    cfg = config_from_toml({
        "noprefetch": True, "no_background_fetch": True, "prefetch_size": 1234, "prefetch_timeout_sec": 3,
        "resolve_result_entry_ttl_sec": 7, "max_concurrency": 3, "debug": True,
        "blob": {"fetching_timeout_sec": 4, "max_retries": 1},
        "resolver": {"request_timeout_sec": 9},
        "fuse": {"attr_timeout": 5, "entry_timeout": 6},
        "store": {"negative_cache_ttl_sec": 2, "resolve_timeout_sec": 11, "memory_cache_size_mb": 8,
                  "platform": "linux/arm64", "read_ahead_kb": 512, "wait_for_prefetch": True,
                  "neighbour_fetch_kb": 32, "executable_fetch_limit_mb": 5,
                  "fuse_no_open": False, "small_layer_fetch_kb": 512},
    })
    assert cfg.layer.no_prefetch and cfg.layer.no_background_fetch and cfg.layer.prefetch_wait
    assert (cfg.layer.neighbour_fetch_size, cfg.layer.executable_fetch_limit) == (32 << 10, 5 << 20)
    assert cfg.layer.small_layer_fetch_size == 512 << 10
    assert (cfg.layer.prefetch_size, cfg.layer.prefetch_timeout, cfg.layer.max_concurrency) == (1234, 3, 3)
    assert cfg.layer.fetch_timeout == 4 and cfg.registry.max_retries == 1 and cfg.registry.read_timeout == 9
    assert (cfg.pool.release_grace, cfg.pool.negative_ttl, cfg.pool.resolve_timeout) == (7, 2, 11)
    assert cfg.pool.platform == "linux/arm64"
    assert (cfg.mount.attr_timeout, cfg.mount.entry_timeout, cfg.mount.debug) == (5, 6, True)
    assert cfg.mount.read_ahead_kb == 512 and cfg.memory_cache_bytes == 8 << 20
    assert not cfg.mount.no_open and config_from_toml({}).mount.no_open


def test_daemon_defaults_of_the_latency_features():
    layer = config_from_toml({}).layer
    assert not layer.prefetch_wait
    assert (layer.neighbour_fetch_size, layer.executable_fetch_limit) == (64 << 10, 64 << 20)
    assert layer.small_layer_fetch_size == 2 << 20 and layer.prefetch_piece_size == 4 << 20
    off = config_from_toml({"store": {"neighbour_fetch_kb": 0, "executable_fetch_limit_mb": 0,
                                      "small_layer_fetch_kb": 0, "prefetch_piece_kb": 0}}).layer
    assert (off.neighbour_fetch_size, off.executable_fetch_limit, off.small_layer_fetch_size) == (0, 0, 0)
    assert off.prefetch_piece_size == 0 and not off.policy_enabled("reads_overtake_prefetch")
    assert config_from_toml({"store": {"prefetch_piece_kb": 1024}}).layer.prefetch_piece_size == 1 << 20
    assert config_from_toml({"store": {"fetch_policy": "baseline"}}).layer.prefetch_piece_size == 0


def test_pool_bounds_reach_the_pool_and_idle_layers_0_is_off():
    pool = config_from_toml({"store": {"idle_layers": 3, "max_images": 5, "max_use_counts": 7}}).pool
    assert (pool.idle_layers, pool.max_images, pool.max_use_counts) == (3, 5, 7)
    assert config_from_toml({"store": {"idle_layers": 0}}).pool.idle_layers == 0
    defaults = config_from_toml({}).pool
    assert (defaults.idle_layers, defaults.max_images, defaults.max_use_counts) == (64, 256, 65536)
    for key in ("max_images", "max_use_counts"):  # a bound of 0 would keep nothing: refused, not "the default"
        with pytest.raises(ConfigError, match=f"store.{key}"):
            config_from_toml({"store": {key: 0}})


def test_unknown_keys_are_warned_not_fatal(caplog):
    with caplog.at_level(logging.WARNING):
        config_from_toml({"metrics_adress": "127.0.0.1:8234", "blob": {"chunk_sise": 1}})
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "metrics_adress" in messages and "blob.chunk_sise" in messages


@pytest.mark.parametrize("doc", [
    {"noprefetch": "yes"}, {"prefetch_size": -1}, {"blob": {"fetching_timeout_sec": "10"}},
    {"metadata_store": "sql"}, {"fuse": 3},
])
def test_invalid_values_are_refused(doc):
    with pytest.raises(ConfigError):
        config_from_toml(doc)


def test_missing_default_config_is_fine_but_missing_explicit_one_is_not(tmp_path):
    from pathlib import Path

    if not Path(DEFAULT_CONFIG_PATH).exists():
        assert load_config(DEFAULT_CONFIG_PATH, explicit=False) == config_from_toml({})
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.toml", explicit=True)


def test_go_style_flags_are_accepted():
    args = parse_args(["-config=/c.toml", "-root", "/r", "-log-level=debug", "/mnt"])
    assert (args.config, args.root, args.log_level, args.mountpoint) == ("/c.toml", "/r", "debug", "/mnt")
    args = parse_args(["--config", "/c.toml", "--log-level", "warn", "/mnt"])
    assert args.root == "/var/lib/stargz-store" and args.log_level == "warn"


def test_sizes_documented_zero_off_are_off_at_zero():
    """`read_ahead_kb` and `memory_cache_size_mb` say "0 = off" in config.toml: 0 is not "the default"."""
    cfg = config_from_toml({"store": {"read_ahead_kb": 0, "memory_cache_size_mb": 0, "sequential_readahead_kb": 0,
                                      "neighbour_fetch_kb": 0}})
    assert cfg.mount.read_ahead_kb == 0 and cfg.memory_cache_bytes == 0
    assert cfg.layer.readahead_size == 0 and cfg.layer.neighbour_fetch_size == 0
    defaults = config_from_toml({})
    assert defaults.mount.read_ahead_kb == 4096 and defaults.memory_cache_bytes == 16 << 20


def test_record_images_are_canonical_references_or_all():
    cfg = config_from_toml({"record": {"images": ["*", "docker.io/library/alpine", "127.0.0.1:5000/app:1"],
                                       "max_entries": 10}})
    assert cfg.record_images == ("*", "docker.io/library/alpine:latest", "127.0.0.1:5000/app:1")
    assert cfg.record_max_entries == 10
    assert config_from_toml({}).record_images == ()
    for bad in ("*", ["UPPER:case"], [3], [""]):
        with pytest.raises(ConfigError, match=r"record\.images"):
            config_from_toml({"record": {"images": bad}})
