"""Replay a corpus image's recorded opens against its layers with the real `Layer`: round trips,
bytes and a link-time estimate of a fetch policy, without podman, the link or timing noise.

    python -m benchmarks.startup.replay                      # every image, both lazy modes, default and baseline
    python -m benchmarks.startup.replay --images node,cxx --modes estargz-noopt --configs default,baseline,dir=/tmp/x.toml

Each recorded path (first-open order, `record.jsonl` of the image) is read whole from the topmost
layer that has it, and the fetches it starts are waited for before the next open, so every open
that misses costs at least one round trip on a real link. The layers are the mode's variant in
the benchmark registry's storage (the same blobs the startup benchmark pulls), served from a
local file: `estargz-noopt` (nothing prioritized: the read path's policies do all the work) and
`estargz` (`optimize`d: the layers' prioritized regions are prefetched first, as one step, then
the opens run). Background fetch is off (it needs time); everything else is the store variant's
config (`--configs`, as for the startup benchmark), library readahead included: when an open
reads an ELF program or library, the libraries it loads (found in the image's layers, as the
store does) are fetched as a step of their own right after the open's (the loader opens them once
it has the program; one dependent round trip for all of them, however many there are). Without
it (as this tool did first) every library the loader opened was a miss of its own and brought
neighbours, which the store never fetches: pynopyc 1.225x the needed bytes replayed against 1.207x
with it; the timed run's store fetched 11.03 MB, the replay with it 11.01 MB, without it 11.18.

What is counted, per open (a *step*):
- `calls`: `read_ranges` and `stream_range` calls of the layers' sources;
- `round trips`: the calls a step must wait for one after another. A step's calls to one layer
  run `max_concurrency` at a time (a read's requests go out together, over that many
  connections), so a step costs ceil(calls / max_concurrency) round trips of its busiest layer.
  (Counting calls instead, as this tool did first, charged the default's parallel requests, at
  8 connections, as if they were sequential, and the baseline's 2 connections nothing for their
  queueing);
- `link s`: round trips x RTT + bytes / rate per step, summed (defaults: the startup benchmark's
  20 ms and 100 Mbit/s): the time the link costs the start if the container did nothing else.
  Slow start and the kernel's own read sizes are not modelled; a big file is read whole here,
  which favours the baseline (on a real start its blocks come one page fault at a time, the
  default's executable fetch streams the file in one request);
- `fetched ÷ needed`: bytes read from the sources against the compressed size of the recorded
  files' chunks (the `needed` of the startup benchmark, without TOCs and footers).

It answers "does a fetch-policy change cut round trips and link time on images nobody tuned for,
and at what bytes", on a machine where the timed benchmark is too noisy to tell 10% apart. Timing
still needs the startup benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import HELD_OUT, TUNING
from .needed import registry_blob_path
from .variants import StoreVariant, VariantError, parse

DEFAULT_CACHE_DIR = Path("/var/tmp/stargz-bench")
MODES = ("estargz-noopt", "estargz")
# Off in a replay: what runs in time rather than in step with the reads (the start fetch works
# during podman's pull, which the replay does not model; import readahead follows modules as
# they arrive, on a worker of its own, which the replay's steps cannot pace: the replay of the
# default is the default without it).
_OFF = {"noprefetch": True, "no_background_fetch": True, "store": {"start_fetch_mb": 0, "import_readahead": False}}


@dataclass(frozen=True)
class Link:
    """What a round trip and a byte cost on the modelled link."""

    rtt_s: float = 0.020
    rate_bytes_per_s: float = 100e6 / 8

    def step_seconds(self, round_trips: int, nbytes: int) -> float:
        return round_trips * self.rtt_s + nbytes / self.rate_bytes_per_s


def layer_config(variant: StoreVariant) -> Any:
    """The layer config of `variant` as replayed: background fetch and prefetch at open off
    (`replay` runs the prefetch itself, as its own step, in `estargz`)."""
    from stargz_store.daemon.config import config_from_toml

    from .variants import merged

    return config_from_toml(merged(variant.settings, _OFF)).layer


class _Steps:
    """Round trips, bytes and link time of the steps of one replay."""

    def __init__(self, sources: list, concurrency: int, link: Link) -> None:
        self.sources = sources
        self.concurrency = max(1, concurrency)
        self.link = link
        self.round_trips = 0
        self.seconds = 0.0
        self._mark = self._counts()

    def _counts(self) -> list[tuple[int, int]]:
        return [(s.calls, s.bytes_read) for s in self.sources]

    def end_step(self) -> None:
        now = self._counts()
        trips = max((math.ceil((c - c0) / self.concurrency) for (c, _), (c0, _) in zip(now, self._mark)), default=0)
        nbytes = sum(b - b0 for (_, b), (_, b0) in zip(now, self._mark))
        self.round_trips += trips
        self.seconds += self.link.step_seconds(trips, nbytes)
        self._mark = now


class _StepLibraries:
    """Library readahead in step with the replay: the worker's hints are kept (`program_read`,
    called by the layers' policy as the store's worker is) and run when the replay says (`run`),
    so their fetches are counted in a step of their own, not raced by the next open."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Any, Any]] = []

    def program_read(self, image_layers: Any, layer: Any, entry: Any) -> None:
        self.pending.append((image_layers, layer, entry))

    def run(self) -> bool:
        """Start the pending hints' fetches; True if there were any hints."""
        from stargz_store.layer.policies import fetch_libraries

        hints, self.pending = self.pending, []
        for image_layers, layer, entry in hints:
            fetch_libraries(image_layers, layer, entry)
        return bool(hints)


def replay(cache_dir: Path, image: str, config: Any, mode: str = "estargz-noopt", link: Link = Link()) -> dict:
    """Round trips, calls, link seconds, bytes fetched and bytes needed for `image`'s recorded
    opens under `config`, against the layers of variant `mode`."""
    registry = cache_dir / "registry"
    repo = registry / "docker/registry/v2/repositories/bench" / image
    tag = repo / "_manifests/tags" / mode / "current/link"
    manifest = json.loads(registry_blob_path(registry, tag.read_text().strip()).read_text())
    record = cache_dir / "images" / image / "record.jsonl"
    paths = [json.loads(line)["path"].lstrip("/") for line in record.read_text().splitlines() if line.strip()]
    blobs = [(registry_blob_path(registry, d["digest"]), d) for d in manifest["layers"]]
    return replay_blobs(blobs, paths, config, prefetch_first=mode != "estargz-noopt", link=link)


def replay_blobs(
    blobs: list[tuple[Path, dict]], paths: list[str], config: Any, *, prefetch_first: bool = False, link: Link = Link()
) -> dict:
    """`replay` of the opens `paths` (first-open order) against the layers in `blobs` (blob file,
    descriptor; bottom first); `prefetch_first`: the prioritized regions come first, as one step."""
    from stargz_store.cache import ChunkCache
    from stargz_store.layer import FileBlobSource, LayerResolver

    libraries = _StepLibraries()
    with tempfile.TemporaryDirectory(prefix="sgz-replay-") as tmp:
        resolver = LayerResolver(None, ChunkCache(Path(tmp)), config, library_worker=libraries)
        sources = [FileBlobSource(path) for path, _ in blobs]
        layers = [resolver.open_layer_from_source(s, d) for s, (_, d) in zip(sources, blobs)]
        top_first = layers[::-1]
        for layer in layers:
            layer.attach_image(lambda: top_first)  # as the daemon does: library lookups see the image

        def drain_all() -> None:
            for layer in layers:
                layer.drain(120)

        try:
            for s in sources:
                s.reset_counters()
            steps = _Steps(sources, config.max_concurrency, link)
            if prefetch_first:  # the prioritized regions, all layers at once, as at layer open
                for layer in layers:
                    layer.prefetch(None)
                drain_all()
                steps.end_step()
            needed = 0
            for path in dict.fromkeys(paths):
                for layer in top_first:
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
                steps.end_step()
                if libraries.run():  # the libraries the program just read loads: the loader's next opens
                    drain_all()
                    steps.end_step()
            return {"round_trips": steps.round_trips, "calls": sum(s.calls for s in sources),
                    "link_s": steps.seconds, "fetched": sum(s.bytes_read for s in sources), "needed": needed}
        finally:
            for layer in layers:
                layer.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.startup.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="all", help="comma-separated names or groups: tuning, held-out, all")
    ap.add_argument("--modes", default=",".join(MODES), help="lazy modes (variants of the layers): " + ", ".join(MODES))
    ap.add_argument("--configs", default="default,baseline", help="store variants, as for the startup benchmark")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="modelled round trip (default 20)")
    ap.add_argument("--rate-mbit", type=float, default=100.0, help="modelled link rate (default 100)")
    args = ap.parse_args(argv)
    groups = {"all": [*TUNING, *HELD_OUT], "tuning": list(TUNING), "held-out": list(HELD_OUT)}
    images = [n for part in args.images.split(",") for n in groups.get(part, [part])]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := [m for m in modes if m not in MODES]:
        print(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}", file=sys.stderr)
        return 2
    try:
        variants = [parse(spec) for spec in args.configs.split(",")]
    except VariantError as e:
        print(e, file=sys.stderr)
        return 2
    link = Link(args.rtt_ms / 1000, args.rate_mbit * 1e6 / 8)
    names = [v.name for v in variants]
    print(f"round trips / link s / fetched ÷ needed; link {args.rtt_ms:g} ms, {args.rate_mbit:g} Mbit/s")
    for mode in modes:
        configs = [layer_config(v) for v in variants]
        print(f"\n{mode}\n")
        print("| image | MB needed | " + " | ".join(names) + (" | " + " ÷ ".join(names[:2]) + " link s" if len(names) > 1 else "")
              + " |")
        print("|---|---|" + "---|" * (len(names) + (len(names) > 1)))
        for image in images:
            results = [replay(args.cache_dir, image, config, mode, link) for config in configs]
            needed = results[0]["needed"]
            cells = [f"{r['round_trips']} / {r['link_s']:.2f} / {r['fetched'] / max(1, needed):.2f}x" for r in results]
            if len(results) > 1:
                cells.append(f"{results[0]['link_s'] / max(1e-9, results[1]['link_s']):.2f}")
            print(f"| {image} | {needed / 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
