"""Store configurations the benchmark compares, one column each: our defaults against a Go-like baseline.

A variant is a set of config.toml settings laid over the benchmark's own (the registry host,
`noprefetch` per mode). `baseline` fetches the way the Go stargz-store 0.12.0 does: once the store
documents `[store] fetch_policy` in config/config.toml (fixed 50,000-byte blocks in blob order, no
heuristics), it is that policy with `max_concurrency = 2`; until then it is `baseline-knobs`, every
fetch heuristic the store has switched off and `max_concurrency = 2`, named so in every table.

STARGZ_BENCH_EXTRA_CONFIG (TOML text) applies to every variant, a variant's own keys taking
precedence, so a baseline stays the baseline whatever the extra config says.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED_CONFIG = REPO_ROOT / "config" / "config.toml"
EXTRA_CONFIG_ENV = "STARGZ_BENCH_EXTRA_CONFIG"

DEFAULT = "default"
BASELINE = "baseline"
BASELINE_KNOBS = "baseline-knobs"
BASELINE_CONCURRENCY = 2  # the Go store's max_concurrency in the comparison

# every read-path heuristic the store has, off (config/config.toml explains each)
_KNOBS_OFF = {"neighbour_fetch_kb": 0, "small_layer_fetch_kb": 0, "executable_fetch_limit_mb": 0,
              "library_readahead": False, "import_readahead": False, "sequential_readahead_kb": 0}


class VariantError(ValueError):
    """A store variant was asked for by a name nobody defined, or its TOML does not parse."""


@dataclass(frozen=True)
class StoreVariant:
    name: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)  # config.toml keys, tables as nested dicts

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "settings": self.settings}


def store_has_fetch_policy(documented: Path = DOCUMENTED_CONFIG) -> bool:
    """Whether the store has a `[store] fetch_policy` key: config/config.toml documents every key."""
    try:
        doc = tomllib.loads(documented.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return "fetch_policy" in (doc.get("store") or {})


def builtin(name: str, documented: Path = DOCUMENTED_CONFIG) -> StoreVariant:
    """`default`, `baseline` (the policy if the store has it, else the knobs) or `baseline-knobs`."""
    if name == DEFAULT:
        return StoreVariant(DEFAULT, "the store's defaults")
    knobs = StoreVariant(BASELINE_KNOBS, f"every fetch heuristic off, max_concurrency = {BASELINE_CONCURRENCY} "
                                         "(the store has no fetch_policy key yet)",
                         {"max_concurrency": BASELINE_CONCURRENCY, "store": dict(_KNOBS_OFF)})
    if name == BASELINE_KNOBS:
        return knobs
    if name == BASELINE:
        if not store_has_fetch_policy(documented):
            return knobs
        return StoreVariant(BASELINE, "fetch_policy = \"baseline\" (fixed 50,000-byte blocks in blob order, "
                                      f"no heuristics), max_concurrency = {BASELINE_CONCURRENCY}",
                            {"max_concurrency": BASELINE_CONCURRENCY, "store": {"fetch_policy": "baseline"}})
    raise VariantError(f"unknown store variant {name!r}; built in: {DEFAULT}, {BASELINE}, {BASELINE_KNOBS} "
                       "(or NAME=FILE.toml)")


def parse(spec: str) -> StoreVariant:
    """A built-in name, or `NAME=PATH` for a column whose settings are the TOML file at PATH."""
    name, sep, path = spec.partition("=")
    if not sep:
        return builtin(spec.strip())
    try:
        settings = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise VariantError(f"store variant {name}: cannot read {path}: {e}") from None
    return StoreVariant(name.strip(), f"settings of {path}", settings)


def merged(*docs: dict[str, Any]) -> dict[str, Any]:
    """Later documents override earlier ones key by key; tables merge recursively."""
    out: dict[str, Any] = {}
    for doc in docs:
        for key, value in doc.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def extra_settings() -> dict[str, Any]:
    text = os.environ.get(EXTRA_CONFIG_ENV, "")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise VariantError(f"{EXTRA_CONFIG_ENV} is not valid TOML: {e}") from None


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise VariantError(f"cannot write {value!r} as a TOML value")


def to_toml(doc: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """TOML text of `doc`: plain keys first, then each table under its dotted header."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    text = ""
    if lines:
        header = f"[{'.'.join(_key(p) for p in path)}]\n" if path else ""
        text = header + "\n".join(lines) + "\n"
    for key, value in doc.items():
        if isinstance(value, dict):
            text += to_toml(value, (*path, key))
    return text


def store_config(registry_host: str, noprefetch: bool, variant: StoreVariant) -> str:
    """config.toml of one run: plain HTTP to the benchmark registry, `noprefetch` for the unoptimized
    mode (as the Go benchmark), then STARGZ_BENCH_EXTRA_CONFIG, then the variant's settings."""
    own = {"noprefetch": noprefetch, "resolver": {"host": {registry_host: {"insecure": True}}}}
    return to_toml(merged(own, extra_settings(), variant.settings))
