"""Fleets: N stores on one machine start the same image through a pull-through mirror (issue 18).

    python -m benchmarks fleet                                  # the whole matrix (~30-60 min)
    python -m benchmarks.fleet_bench --images app --nodes 1,16 --modes direct,cold --bg off
    python -m benchmarks.fleet_bench --store-source /tmp/main   # the same with another checkout's store
    python -m benchmarks.fleet.proxy_probe                      # what one request to a cold mirror costs the origin

For each image (`app`: ~21 MB in 2 layers, `big`: ~107 MB in 1 layer, built locally by our
converter), background fetch off and on, N = 1, 4, 8, 16 and mode (`direct` to the origin,
`cold` through a fresh pull-through mirror, `warm` through a pre-warmed one), N stores (each its
own root and FUSE mount) read the workload's files at one barrier. Reported: origin egress
(bytes over the delayed link, requests, 200/206 blob answers), mirror egress, per-node
time-to-ready (p50, max), read errors and chunks rejected by verification. The origin is a
docker-registry in a network namespace behind the user-space link emulator (20 ms RTT, no rate
limit by default) and a counting relay (which answers the origin's `/v2/` with a challenge, as a
real registry's does: see benchmarks/fleet/site.py); the mirror is Debian's docker-registry in proxy mode,
configured as `[[resolver.host."ORIGIN".mirrors]]`. Needs root and docker-registry.
Results: a Markdown table on stdout, benchmarks/results/fleet-<time>.{md,json,png} and
fleet-latest.*. STARGZ_FLEET_EXTRA_CONFIG (TOML) is appended to every store's config.toml,
STARGZ_FLEET_BLOB_CONFIG (keys, one a line) goes into its [blob] table.
The machine running it is usually shared: figures are indicative.

Per run, under <cache-dir>/run/logs/<image>-bg<on|off>-n<N>-<mode>/: each node's store log, the
readers' per-file timeline (readers.json) and the origin relay's log of that run (origin.jsonl;
each store sends the relay an X-Fleet-Node header, so `python -m benchmarks.fleet.origin_log
FILE` tells the mirror's fills from each node's reads and the answers cut short). The per-run line
also gives the CPU seconds the stores, the mirror and the origin's side spent while the nodes
read. `python -m benchmarks.fleet.merge OUT.json IN.json...` merges passes (later runs replace the
same rows) into one table and chart.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

from benchmarks.fleet import images as images_mod
from benchmarks.fleet.link import LinkSpec
from benchmarks.fleet.report import chart, table
from benchmarks.fleet.run import RunResult, run_once
from benchmarks.fleet.site import Mirror, OriginSite
from stargz_store.localenv.procs import unmount_under
from stargz_store.localenv.store import StoreError

log = logging.getLogger("benchmarks.fleet")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("/var/tmp/stargz-fleet")
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
LOCK = Path("/run/stargz-fleet.lock")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="app,big")
    p.add_argument("--nodes", default="1,4,8,16")
    p.add_argument("--modes", default="direct,cold,warm")
    p.add_argument("--bg", default="off,on", help="background fetch: off, on or both")
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--rate-mbit", type=float, default=0.0, help="0: delay only")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--store-source", type=Path, default=None, help="run the stores from this checkout")
    p.add_argument("--label", default="", help="a name for this pass in the output files")
    return p.parse_args(argv)


def _raise_exit(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("the fleet benchmark needs root (network namespace, FUSE mounts)")
        return 1
    if shutil.which("docker-registry") is None:
        print("docker-registry is not installed: run `make deps`")
        return 1
    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another fleet benchmark is running ({LOCK} is held)")
        return 1
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    work = args.cache_dir / "run"
    unmount_under(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = LinkSpec(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit)
    built = {name: images_mod.build(name, args.cache_dir / "images") for name in _csv(args.images)}
    site = OriginSite(work, args.cache_dir / "origin-data", spec)
    warm: Mirror | None = None
    results: list[RunResult] = []
    try:
        site.up()
        refs = {name: images_mod.push(image, site.push_host, f"fleet/{name}").replace(site.push_host, site.host)
                for name, image in built.items()}
        modes = _csv(args.modes)
        if "warm" in modes:
            warm = Mirror(work, "mirror-warm", site.host)
            warm.start()
            for name, image in built.items():
                warm.warm(refs[name], [d["digest"] for d in image.descriptors()])
        print(f"link: {spec.describe()}; images: " + ", ".join(
            f"{n} {i.size / 1e6:.1f} MB / {len(i.layers)} layer(s), workload {i.needed / 1e6:.2f} MB"
            for n, i in built.items()), flush=True)
        for name, image in built.items():
            for bg in [b == "on" for b in _csv(args.bg)]:
                for n in [int(x) for x in _csv(args.nodes)]:
                    for mode in modes:
                        try:
                            r = run_once(work, site, image, refs[name], n, mode, bg, warm, args.store_source)
                        except StoreError as e:  # one run's stores did not start: the others still count
                            print(f"{name} bg={'on' if bg else 'off'} N={n} {mode}: not run ({e})", flush=True)
                            continue
                        results.append(r)
                        print(f"{name} bg={'on' if bg else 'off'} N={n} {mode}: origin {r.origin.link_bytes / 1e6:.1f} MB "
                              f"({r.origin.requests} req, blob {r.origin.statuses}), mirror "
                              f"{(r.mirror.body_bytes / 1e6) if r.mirror else 0:.1f} MB, TTR p50 {r.ttr_p50:.2f} s "
                              f"max {r.ttr_max:.2f} s, errors {len(r.errors)}, rejected chunks {r.verify_failures}, "
                              f"bg {r.background_states or '-'}, CPU s while reading "
                              + ", ".join(f"{k} {v:.1f}" for k, v in r.cpu_while_reading.items())
                              + f" ({r.wall_seconds:.0f} s)", flush=True)
    finally:
        if warm is not None:
            warm.stop()
        site.down()
        unmount_under(work)
    if not results:
        return 1
    text = table(results)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else "")
    md, js, png = (args.results / f"fleet-{stamp}.{ext}" for ext in ("md", "json", "png"))
    md.write_text(f"link: {spec.describe()}\n\n{text}\n")
    js.write_text(json.dumps({"link": spec.describe(), "machine": platform.uname()._asdict(), "cpus": os.cpu_count(),
                              "load": os.getloadavg(), "store_source": str(args.store_source or REPO_ROOT),
                              "runs": [r.to_json() for r in results]}, indent=1))
    chart(results, png)
    for path in (md, js, png):
        if path.exists():
            latest = args.results / f"fleet-latest{path.suffix}"
            latest.unlink(missing_ok=True)
            shutil.copy(path, latest)
    print(f"\nresults: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
