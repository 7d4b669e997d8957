"""Merge fleet benchmark result files into one (the README's table and chart).

    python -m benchmarks.fleet.merge OUT.json IN.json [IN.json ...]   # also writes OUT.md, OUT.png

A run (image, background fetch, N, mode) of a later file replaces the same run of an earlier one,
so a pass that re-measured some rows updates them and keeps the rest. OUT.json lists the passes
it came from (file, load average at its end) and, per run, the pass it came from.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import chart, table
from .run import RunResult
from .site import Egress


def _result(doc: dict) -> RunResult:
    fields = {k: v for k, v in doc.items() if k in RunResult.__dataclass_fields__}
    fields["origin"] = Egress(**doc["origin"])
    fields["mirror"] = Egress(**doc["mirror"]) if doc.get("mirror") else None
    return RunResult(**fields)


def _key(doc: dict) -> tuple:
    return doc["image"], doc["background"], doc["nodes"], doc["mode"]


def merge(out: Path, inputs: list[Path]) -> list[RunResult]:
    runs: dict[tuple, dict] = {}
    passes = []
    link = ""
    for path in inputs:
        doc = json.loads(path.read_text())
        link = doc.get("link", link)
        for p in doc.get("passes") or [{"file": path.name, "load_at_end": doc.get("load"), "link": doc.get("link")}]:
            passes.append(p)
        for run in doc["runs"]:
            run.setdefault("pass", path.name)
            runs[_key(run)] = run
    ordered = [runs[k] for k in sorted(runs)]
    out.write_text(json.dumps({"link": link, "passes": passes, "runs": ordered}, indent=1))
    results = [_result(r) for r in ordered]
    out.with_suffix(".md").write_text(f"link: {link}\n\n{table(results)}\n")
    chart(results, out.with_suffix(".png"))
    return results


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    results = merge(Path(argv[0]), [Path(a) for a in argv[1:]])
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
