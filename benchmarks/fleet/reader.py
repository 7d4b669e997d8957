"""One node's workload: read the image's files through its store's mount, starting at a barrier.

    python -m benchmarks.fleet.reader PLAN.json

PLAN: {"mount": ..., "ref": ..., "files": [[layer digest, path], ...]}. The reader prints
`ready` once it is set up, then waits for a line on stdin (the barrier: the benchmark writes
one to every node at once), reads every file whole in order, and prints one JSON line:
{"seconds": time from the barrier to the last byte, "bytes": ..., "errors": [...], "files":
[[path, seconds from the barrier to its open, to its last byte], ...]} (the first open includes the
image's lookup).
"""
from __future__ import annotations

import base64
import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    plan = json.loads(open(argv[0]).read())
    ref_dir = os.path.join(plan["mount"], base64.b64encode(plan["ref"].encode()).decode())
    files = [os.path.join(ref_dir, digest, "diff", path) for digest, path in plan["files"]]
    buf = bytearray(1 << 20)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    total, errors, timeline = 0, [], []
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
            opened = time.monotonic() - start
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
            timeline.append([path[len(ref_dir):], round(opened, 3), round(time.monotonic() - start, 3)])
        except OSError as e:
            errors.append(f"{path[len(ref_dir):]}: {e.strerror}")
    print(json.dumps({"seconds": time.monotonic() - start, "bytes": total, "errors": errors, "files": timeline}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
