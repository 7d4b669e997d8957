"""Container start time, lazy against full pull, on a shaped link (HelloBench method; issues 6 and 13).

    python -m benchmarks startup                      # 5 runs, 100 Mbit/s, 20 ms RTT, whole corpus
    python -m benchmarks startup --runs 1 --images held-out --modes legacy,estargz
    python -m benchmarks startup --images java,node --configs default
    python -m benchmarks.startup_bench --link both --rate-mbit 50 --rtt-ms 40

For each image of the corpus (benchmarks/startup/corpus.py: the tuning set python,
toolchain, bigdata and the held-out workloads) and mode (legacy, estargz-noopt,
estargz made by `stargz-store optimize`, estargz-strace made with a strace record,
warm) it measures pull, create and run-to-first-output seconds, the bytes that
came from the registry, and the store's CPU seconds and peak RSS; the
lazy modes run once per store variant (--configs: our defaults and a Go-like
baseline, side by side in the table).
The registry runs in a network namespace behind a user-space link emulator
(benchmarks/startup/linkemu.py); everything it sets up is removed at the end,
on failure and on SIGINT/SIGTERM, and a crashed run's leftovers are swept at the
next start. Needs root, podman, runc, skopeo, docker-registry, strace, and
Debian package lists (the images are built from .debs, cached in --cache-dir).
Results: a Markdown table on stdout and in benchmarks/results/startup-*.md,
the raw runs in startup-*.json, the chart in startup-*.png (needs matplotlib).
STARGZ_BENCH_EXTRA_CONFIG (TOML text) is merged into the store's config.toml of
every variant (a variant's own keys win), e.g. $'[store]\nneighbour_fetch_kb = 0\n'.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from benchmarks.startup import corpus, images as images_mod
from benchmarks.startup import leftovers, link as link_mod, podman, report, runner, variants
from benchmarks.startup.fill import PROBE_REPO, fill
from benchmarks.startup.needed import manifest_from_storage, needed_bytes, registry_blob_path
from benchmarks.startup.registry import Registry, free_port
from benchmarks.startup.store import Store

log = logging.getLogger("benchmarks.startup")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("/var/tmp/stargz-bench")
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
REGISTRY_PORT = 5000
CALIBRATION_THRESHOLD_MS = 0.3
REQUIRED_TOOLS = {  # tool: Debian package
    "podman": "podman", "runc": "runc", "conmon": "conmon", "skopeo": "skopeo", "docker-registry": "docker-registry",
    "strace": "strace", "ip": "iproute2", "unshare": "util-linux", "apt-get": "apt", "dpkg-deb": "dpkg",
    "gzip": "gzip",
}


class Cleanup:
    """Undo steps, run once, newest first: from `finally`, from atexit and after SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, step: Callable[[], None]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except Exception as e:  # keep undoing the rest
                log.warning("cleanup: %s failed: %s", what, e)


def _raise_exit(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks startup", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="measured runs per image and mode (default 5)")
    p.add_argument("--images", default="all",
                   help="comma-separated image names or groups: tuning, held-out, all (default: all)")
    p.add_argument("--modes", default=",".join(runner.MODES), help="comma-separated (default: all)")
    p.add_argument("--configs", default=f"{variants.DEFAULT},{variants.BASELINE}",
                   help="store variants of the lazy modes, one column each, the first the one compared: "
                        f"{variants.DEFAULT}, {variants.BASELINE}, {variants.BASELINE_KNOBS} or NAME=FILE.toml "
                        f"(default: {variants.DEFAULT},{variants.BASELINE})")
    p.add_argument("--link", choices=("shaped", "unshaped", "both"), default="shaped")
    p.add_argument("--rate-mbit", type=float, default=100.0, help="shaped link rate per direction (default 100)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="shaped link round-trip time (default 20)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"built images, .debs, registry (default {DEFAULT_CACHE})")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only redraw the table and chart of an earlier startup-*.json (no root needed)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    groups = {"all": tuple(corpus.RECIPES), "tuning": corpus.TUNING, "held-out": corpus.HELD_OUT}
    wanted = [name for item in args.images.split(",") if item for name in groups.get(item, (item,))]
    args.images = list(dict.fromkeys(wanted))
    args.modes = [m for m in args.modes.split(",") if m]
    for name in args.images:
        if name not in corpus.RECIPES:
            p.error(f"unknown image {name!r}; known: {', '.join(corpus.RECIPES)} or {', '.join(groups)}")
    try:
        args.variants = [variants.parse(spec) for spec in args.configs.split(",") if spec]
        variants.extra_settings()
    except variants.VariantError as e:
        p.error(str(e))
    if not args.variants:
        p.error("--configs names no store variant")
    if len({v.name for v in args.variants}) < len(args.variants):
        p.error("--configs names a variant twice")
    for mode in args.modes:
        if mode not in runner.MODES:
            p.error(f"unknown mode {mode!r}; known: {', '.join(runner.MODES)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def machine_description() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    podman_version = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 1048576, 1),
            "kernel": platform.release(), "debian": debian, "podman": podman_version,
            "python": platform.python_version()}


def needed_for(built: list[images_mod.BuiltImage], registry_data: Path) -> dict[str, int | None]:
    """Per lazy variant, the compressed bytes its workload cannot avoid fetching (see needed.py)."""
    needed: dict[str, int | None] = {}
    for image in built:
        for mode in runner.LAZY_MODES:
            repo, tag = runner.repo_tag(image.name, mode)
            try:
                manifest = manifest_from_storage(registry_data, repo, tag)
                needed[f"{image.name}:{mode}"] = needed_bytes(partial(registry_blob_path, registry_data), manifest,
                                                              image.record)
            except (OSError, ValueError, KeyError) as e:
                log.warning("cannot size what %s:%s needs: %s", image.name, mode, e)
                needed[f"{image.name}:{mode}"] = None
    return needed


def save_logs(run_dir: Path, out: Path, max_bytes: int = 4 << 20) -> None:
    """Keep the tail of every log of the run (store, registry, emulator, pushes) before the run dir goes."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for path in [*run_dir.glob("*.log"), *run_dir.glob("*.stderr"), run_dir / "store" / "store.log"]:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - max_bytes))
                (out / path.name).write_bytes(f.read())


def sweep(run_dir: Path) -> None:
    """Whatever a crashed run left: processes, the namespace, podman's and the store's mounts, the run dir."""
    link_mod.remove_leftovers()
    if run_dir.exists():
        for sub in ("podman-plain", "podman-lazy"):
            if (run_dir / sub / "storage.conf").exists():
                podman.cleanup(podman.podman_env(run_dir / sub))
        leftovers.unmount_all_under(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def run_link(kind: str, args: argparse.Namespace, built: list[images_mod.BuiltImage], probe: str,
             run_dir: Path, cleanup: Cleanup) -> tuple[list[dict], dict]:
    """All runs over one link; returns (run results, link description)."""
    spec = link_mod.LinkSpec(shaped=(kind == "shaped"), rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms, mtu=args.mtu)

    def bring_up(emulated_rtt_ms: float | None) -> tuple[link_mod.Link, Registry]:
        link = link_mod.Link(spec, run_dir, emulated_rtt_ms)
        link.up()
        cleanup.push("link down", link.down)
        registry = Registry(args.cache_dir / "registry", run_dir, link_mod.REGISTRY_ADDRESS, REGISTRY_PORT,
                            link_mod.Link.netns_command())
        registry.start()
        cleanup.push("registry stop", registry.stop)
        return link, registry

    link, registry = bring_up(None)
    if spec.shaped:
        # the emulator's own latency (a Python loop woken by poll) comes on top of the delay it adds:
        # measure it once and take it off, so the round trip is the one asked for
        overhead = statistics.median(link_mod.measure_rtt(link_mod.REGISTRY_ADDRESS, REGISTRY_PORT, samples=20)) \
            - spec.rtt_ms
        if overhead > CALIBRATION_THRESHOLD_MS:
            registry.stop()
            link.down()
            link, registry = bring_up(max(0.0, spec.rtt_ms - overhead))
    measured = link_mod.measure(link_mod.REGISTRY_ADDRESS, REGISTRY_PORT,
                                f"http://{registry.host}/v2/{PROBE_REPO}/blobs/{probe}")
    label = spec.describe()
    print(f"link: {label}; {measured.describe()}"
          + (f" (emulator delay {link.emulated_rtt_ms:.2f} ms)" if spec.shaped else ""), flush=True)
    plain_env = podman.podman_env(run_dir / "podman-plain")
    store = Store(run_dir / "store")
    lazy_env = podman.podman_env(run_dir / "podman-lazy", additional_layer_store=store.mountpoint)
    cleanup.push("podman cleanup", lambda: (podman.cleanup(plain_env), podman.cleanup(lazy_env)))
    cleanup.push("store stop", store.stop)
    envs = runner.Environment(link, registry, plain_env, lazy_env, store, kind)
    results = []
    markers = {b.name: b.marker for b in built}
    for run in range(1, args.runs + 1):
        for image in args.images:
            for mode in args.modes:
                for variant in (args.variants if mode in runner.LAZY_MODES else [None]):
                    r = runner.measure(envs, image, mode, run, markers[image], run_dir, variant)
                    status = "ok" if r.ok else f"FAILED: {r.error[:300]}"
                    rss = f"  RSS {r.daemon_peak_rss_bytes / 1e6:4.0f} MB" if r.daemon_peak_rss_bytes else ""
                    if r.store_background_bytes:
                        rss += f"  background {r.store_background_bytes / 1e6:.1f} MB"
                    print(f"  [{kind}] {image:9} {mode:13} {r.config:14} run {run}: pull {r.pull_s:6.2f}  "
                          f"create {r.create_s:5.2f}  run {r.run_s:5.2f}  total {r.total_s:6.2f} s  "
                          f"{r.link_bytes_first_output / 1e6:7.1f} MB, {r.registry_blob_gets_first_output:4d} GETs "
                          f"@1st output{rss}  (prepared in {r.prepare_s:.1f} s)  {status}", flush=True)
                    results.append(r.to_json())
    emulator_cpu = link.emulator_cpu_seconds()
    store.stop()
    podman.cleanup(plain_env)
    podman.cleanup(lazy_env)
    registry.stop()
    link.down()
    return results, {"kind": kind, "label": label, "spec": spec.__dict__, "measured": measured.__dict__,
                     "emulator_cpu_s": emulator_cpu, "emulated_rtt_ms": link.emulated_rtt_ms if spec.shaped else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.render:
        render(json.loads(args.render.read_text()), args.results_dir)
        return 0
    if os.geteuid() != 0:
        print("the startup benchmark needs root (network namespace, FUSE, podman storage, drop_caches)")
        return 1
    missing = sorted({package for tool, package in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        print(f"missing Debian packages: {' '.join(missing)} (make deps, or apt-get install them)")
        return 1
    try:
        with leftovers.exclusive():
            return run_all(args)
    except leftovers.BenchmarkBusy as e:
        print(e)
        return 1


def run_all(args: argparse.Namespace) -> int:
    run_dir = args.cache_dir / "run"
    cleanup = Cleanup()
    atexit.register(cleanup.run)
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        sweep(run_dir)
        cleanup.push("sweep", lambda: sweep(run_dir))
        cleanup.push("save logs", lambda: save_logs(run_dir, args.results_dir / "logs-startup-latest"))
        run_dir.mkdir(parents=True)
        built = []
        for name in args.images:
            image = images_mod.build(corpus.RECIPES[name], args.cache_dir, corpus.HOOKS)
            print(f"image {name} ({image.group}): {image.uncompressed_bytes / 1e6:.0f} MB uncompressed, "
                  f"{image.compressed_bytes / 1e6:.0f} MB gzip, {len(image.layers)} layers, "
                  f"{image.record_paths} recorded paths", flush=True)
            built.append(image)
        loopback = Registry(args.cache_dir / "registry", run_dir, "127.0.0.1", free_port())
        loopback.garbage_collect()  # what earlier runs orphaned; the probe blob is pushed again below
        loopback.start()
        cleanup.push("loopback registry stop", loopback.stop)
        filled = fill(built, loopback, args.cache_dir / "registry-state.json")
        loopback.stop()
        filled["needed_bytes"] = needed_for(built, args.cache_dir / "registry")
        kinds = ["shaped", "unshaped"] if args.link == "both" else [args.link]
        all_results, links = [], []
        for kind in kinds:
            results, described = run_link(kind, args, built, filled["probe"], run_dir, cleanup)
            all_results += results
            links.append(described)
        return write_results(args, started, built, filled, links, all_results)
    finally:
        cleanup.run()
        leftovers.PID_FILE.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_results(args, started: str, built, filled: dict, links: list[dict], results: list[dict]) -> int:
    doc = {"started": started, "args": {k: str(v) for k, v in vars(args).items() if k != "variants"},
           "machine": machine_description(), "links": links, "images": [b.to_json() for b in built],
           "groups": {group: [b.name for b in built if b.group == group] for group in images_mod.GROUPS},
           "store_configs": [v.to_json() for v in args.variants],
           "extra_config": os.environ.get(variants.EXTRA_CONFIG_ENV, ""),
           "registry": filled, "runs": results}
    render(doc, args.results_dir)
    return 1 if any(not r["ok"] for r in results) else 0


def render(doc: dict, results_dir: Path) -> None:
    """Table (stdout and .md), JSON and chart of one benchmark document, as `startup-<time>` and `startup-latest`."""
    results = doc["runs"]
    # a document from before the corpus had no groups: take them from today's recipes
    groups = {image: group for group, names in doc.get("groups", {}).items() for image in names} or \
        {name: recipe.group for name, recipe in corpus.RECIPES.items()}
    summaries = report.summarize(results, doc["registry"].get("needed_bytes"), groups)
    doc["summary"] = [s.to_json() for s in summaries]
    doc["group_verdicts"] = {link["kind"]: {group: report.group_verdicts(summaries, link["kind"], group)
                                            for group in images_mod.GROUPS} for link in doc["links"]}
    shaped = next((l for l in doc["links"] if l["kind"] == "shaped"), None)
    # the Go reference was taken at 100 Mbit/s, 20 ms only
    reference_link = "shaped" if shaped and (shaped["spec"]["rate_mbit"], shaped["spec"]["rtt_ms"]) == (100, 20) else ""
    table = report.table(summaries, reference_link)
    machine = doc["machine"]
    runs = max((r["run"] for r in results), default=0)
    link_lines = "\n".join(f"- link: {l['label']}; measured RTT {l['measured']['rtt_ms_median']:.1f} ms, "
                           f"throughput {l['measured']['throughput_mbit']:.1f} Mbit/s" for l in doc["links"])
    image_lines = "\n".join(
        f"- {b['name']}: {sum(x['tar_size'] for x in b['layers']) / 1e6:.0f} MB uncompressed, "
        f"{sum(x['size'] for x in b['layers']) / 1e6:.0f} MB gzip ({len(b['layers'])} layers), "
        f"{b['record_paths']} recorded paths ({groups.get(b['name'], 'held-out')})" for b in doc["images"])
    variant_lines = "".join(f"\n- store variant {v['name']}: {v['description']}" for v in doc.get("store_configs", []))
    if doc.get("extra_config"):
        variant_lines += f"\n- {variants.EXTRA_CONFIG_ENV} (every variant): {doc['extra_config']!r}"
    header = (f"Startup benchmark {doc['started']}: {runs} run(s) per cell, the median run shown; "
              f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
              f"kernel {machine['kernel']}, Debian {machine['debian']}, {machine['podman']}.")
    text = f"{header}\n\n{link_lines}\n{image_lines}{variant_lines}\n\n{table}"
    print("\n" + text, flush=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["started"].replace(":", "").replace("-", "")
    for name in (f"startup-{stamp}", "startup-latest"):
        (results_dir / f"{name}.json").write_text(json.dumps(doc, indent=1))
        (results_dir / f"{name}.md").write_text(text)
    png = results_dir / f"startup-{stamp}.png"
    title = "; ".join(l["label"] for l in doc["links"]) + f" — median of {runs}"
    if report.chart(summaries, png, title):
        shutil.copyfile(png, results_dir / "startup-latest.png")
        print(f"chart: {png}")
    print(f"results: {results_dir / f'startup-{stamp}.json'}")


if __name__ == "__main__":
    sys.exit(main())
