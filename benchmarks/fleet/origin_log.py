"""Where a fleet run's origin bytes went: the counting relay's per-request log, by kind and node.

    python -m benchmarks.fleet.origin_log /var/tmp/stargz-fleet/run/logs/app-bgoff-n16-cold/origin.jsonl [-v]

Kinds: `fill` (the pull-through mirror's own requests: no X-Fleet-Node header), `manifest`,
`blob range` (a store's ranged blob read: raced, or after the mirror failed it), `blob whole`
(a store's GET without a range, e.g. background fetch from the origin), `other` (/v2/, tokens).
Body bytes are what the relay wrote (the link's count adds headers and TCP/IP; for an answer cut
short, what it wrote into its socket, more than what crossed the link before the hang-up reached
it); `cut` counts the answers the client hung up on before their end (a mirror's copy for a miss
that its client abandoned, a lost race).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def kind(record: dict) -> str:
    path = record.get("path", "")
    if "node" not in record:
        return "fill" if "/blobs/" in path else "mirror other"
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob range" if record.get("range") else "blob whole"
    return "other"


def summary(records: list[dict]) -> dict[str, dict[str, float]]:
    """{kind: {"requests", "bytes", "cut", "cut_bytes"}} over the records."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "bytes": 0, "cut": 0, "cut_bytes": 0})
    for r in records:
        row = out[kind(r)]
        row["requests"] += 1
        row["bytes"] += r.get("sent", 0)
        if not r.get("complete"):
            row["cut"] += 1
            row["cut_bytes"] += r.get("sent", 0)
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path)
    p.add_argument("-v", "--verbose", action="store_true", help="every request, in time order")
    args = p.parse_args(argv)
    records = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    if not records:
        print("no records")
        return 1
    t0 = min(r["t"] for r in records)
    print(f"{'kind':<14}{'req':>6}{'MB':>9}{'cut':>6}{'cut MB':>9}")
    for name, row in sorted(summary(records).items()):
        print(f"{name:<14}{row['requests']:>6}{row['bytes'] / 1e6:>9.2f}{row['cut']:>6}{row['cut_bytes'] / 1e6:>9.2f}")
    per_node: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if kind(r) in ("blob range", "blob whole"):
            per_node[r["node"]].append(r)
    print("\nper node (blob reads): requests, MB, cut")
    for node, rs in sorted(per_node.items()):
        print(f"  {node}: {len(rs)} req, {sum(r.get('sent', 0) for r in rs) / 1e6:.2f} MB, "
              f"{sum(1 for r in rs if not r.get('complete'))} cut")
    if args.verbose:
        for r in sorted(records, key=lambda r: r["t"]):
            digest = r["path"].rsplit("/", 1)[-1][7:19]
            print(f"{r['t'] - t0:8.3f} +{r.get('dur', 0):6.3f} {kind(r):<11} {r.get('node', '-'):<7} {r['method']} "
                  f"{digest} {r.get('range') or '':<28} {r['status']} sent {r.get('sent', 0):>9} "
                  f"{'' if r.get('complete') else 'CUT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
