"""`make bench`: every benchmark of the project, one after another, figures printed (never asserted).

    python -m benchmarks                 # all of them
    python -m benchmarks convert layer   # only some (names below)
    python -m benchmarks startup --runs 1  # arguments after a single name go to that benchmark
"""
from __future__ import annotations

import importlib
import logging
import sys
import time

BENCHMARKS = {
    "convert": ("benchmarks.convert_bench", "converter throughput vs gzip -6 (issue: foundation)"),
    "registry": ("benchmarks.registry_bench", "ranged-read throughput and latency (issue: registry)"),
    "layer": ("benchmarks.layer_bench", "layer data path: cold and warm reads through the chunk cache"),
    "store": ("benchmarks.store_bench", "mounted store: first lookup, RSS, cold/warm reads vs local disk (issue: store)"),
    "startup": ("benchmarks.startup_bench", "container start time, lazy vs full pull (issue: benchmark)"),
    "hostile": ("benchmarks.hostile_bench", "daemon memory on refused hostile TOCs and on images at the caps (issue 11)"),
    "fleet": ("benchmarks.fleet_bench", "N stores through a pull-through mirror: origin egress, time-to-ready (issue 18)"),
}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [a for a in argv if a in BENCHMARKS] or list(BENCHMARKS)
    extra = [a for a in argv if a not in BENCHMARKS]
    failed = []
    for name in names:
        module_name, title = BENCHMARKS[name]
        print(f"\n=== {name}: {title} ===", flush=True)
        start = time.monotonic()
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            print(f"(not available: {e})")
            continue
        try:
            rc = module.main(extra if len(names) == 1 else [])
        except Exception:  # a broken benchmark must not hide the others' figures
            logging.exception("benchmark %s failed", name)
            rc = 1
        if rc:
            failed.append(name)
        print(f"--- {name} done in {time.monotonic() - start:.1f} s", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
