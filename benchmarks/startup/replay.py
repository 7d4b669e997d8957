"""Replay a corpus image's recorded opens against its layers with the real `Layer`: round trips and
bytes of a fetch policy, without podman, the link or timing noise.

    python -m benchmarks.startup.replay                      # every image, default and baseline
    python -m benchmarks.startup.replay --images node,cxx --configs default,baseline,dir=/tmp/x.toml

Each recorded path (first-open order, `record.jsonl` of the image) is read whole from the topmost
layer that has it, and the fetches it starts are waited for before the next open, so every miss
is one round trip on a real link. The layers are the `estargz-noopt` variant in the benchmark
registry's storage (the same blobs the startup benchmark pulls; nothing is prioritized, so the
read path's policies do all the work), served from a local file. What is counted: `read_ranges`
and `stream_range` calls of the layers' sources (round trips; the baseline's block requests
included) and bytes read from them, against the compressed size of the recorded files' chunks.
Prefetch, background fetch and library readahead are off (they need a running image or time);
everything else is the store variant's config (`--configs`, as for the startup benchmark).

It answers "does a fetch-policy change cut round trips on images nobody tuned for, and at what
bytes", on a machine where the timed benchmark is too noisy to tell 10% apart. Timing still needs
the startup benchmark.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .corpus import HELD_OUT, TUNING
from .needed import registry_blob_path
from .variants import StoreVariant, VariantError, parse

DEFAULT_CACHE_DIR = Path("/var/tmp/stargz-bench")
_OFF = {"noprefetch": True, "no_background_fetch": True, "store": {"library_readahead": False}}


def layer_config(variant: StoreVariant) -> Any:
    from stargz_store.daemon.config import config_from_toml

    from .variants import merged

    return config_from_toml(merged(variant.settings, _OFF)).layer


def replay(cache_dir: Path, image: str, config: Any) -> dict:
    """Round trips, bytes fetched and bytes needed for `image`'s recorded opens under `config`."""
    from stargz_store.cache import ChunkCache
    from stargz_store.layer import FileBlobSource, LayerResolver

    registry = cache_dir / "registry"
    repo = registry / "docker/registry/v2/repositories/bench" / image
    link = repo / "_manifests/tags/estargz-noopt/current/link"
    manifest = json.loads(registry_blob_path(registry, link.read_text().strip()).read_text())
    record = cache_dir / "images" / image / "record.jsonl"
    paths = [json.loads(line)["path"].lstrip("/") for line in record.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="sgz-replay-") as tmp:
        resolver = LayerResolver(None, ChunkCache(Path(tmp)), config)
        sources = [FileBlobSource(registry_blob_path(registry, d["digest"])) for d in manifest["layers"]]
        layers = [resolver.open_layer_from_source(s, d) for s, d in zip(sources, manifest["layers"])]
        try:
            for s in sources:
                s.reset_counters()
            needed = 0
            for path in dict.fromkeys(paths):
                for layer in reversed(layers):
                    entry = layer.toc.lookup(path)
                    if entry is not None:
                        break
                else:
                    continue
                if entry.type != "reg" or not entry.chunks:
                    continue
                needed += sum(c.blob_end - c.blob_offset for c in entry.chunks)
                layer.read(entry, 0, entry.size)
                layer.drain(60)
            return {"round_trips": sum(s.calls for s in sources), "fetched": sum(s.bytes_read for s in sources),
                    "needed": needed}
        finally:
            for layer in layers:
                layer.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.startup.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="all", help="comma-separated names or groups: tuning, held-out, all")
    ap.add_argument("--configs", default="default,baseline", help="store variants, as for the startup benchmark")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = ap.parse_args(argv)
    groups = {"all": [*TUNING, *HELD_OUT], "tuning": list(TUNING), "held-out": list(HELD_OUT)}
    images = [n for part in args.images.split(",") for n in groups.get(part, [part])]
    try:
        variants = [parse(spec) for spec in args.configs.split(",")]
    except VariantError as e:
        print(e, file=sys.stderr)
        return 2
    configs = [(v.name, layer_config(v)) for v in variants]
    print("| image | MB needed | " + " | ".join(f"{name}: round trips / fetched ÷ needed" for name, _ in configs) + " |")
    print("|---|---|" + "---|" * len(configs))
    for image in images:
        cells = []
        needed = 0
        for _, config in configs:
            r = replay(args.cache_dir, image, config)
            needed = r["needed"]
            cells.append(f"{r['round_trips']} / {r['fetched'] / max(1, needed):.2f}x")
        print(f"| {image} | {needed / 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
