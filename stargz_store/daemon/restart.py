"""`stargz-store restart [--root DIR] [--timeout SECONDS]`: replace the serving process, keep the mount.

Sends SIGHUP to the holder (its pid is in `<root>/stargz-store.lock`) and waits until a new
serving process has taken over (`<root>/server.json` shows a higher `generation`). Use it after
installing a newer version of the package (the new process runs the installed code) and as
systemd's `ExecReload=`. Running containers keep reading: requests wait in the kernel for the
moment of the hand-over. Exit 0 once the new process serves, 1 if it did not within the timeout
(the old one then serves on, see the daemon's log), 2 if no store runs on that root.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

DEFAULT_ROOT = "/var/lib/stargz-store"  # daemon.cli.DEFAULT_ROOT (not imported: keep this command light)
LOCK_NAME = "stargz-store.lock"
STATE_FILE = "server.json"


def read_state(root: Path) -> dict:
    """`<root>/server.json` (empty before the first server serves, or after a stop)."""
    try:
        doc = json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def holder_pid(root: Path) -> int | None:
    try:
        text = (root / LOCK_NAME).read_text().strip()
        pid = int(text)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stargz-store restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", "-root", default=DEFAULT_ROOT, help=f"the daemon's data root (default {DEFAULT_ROOT})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the new process (default 120)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    pid = holder_pid(root)
    if pid is None:
        print(f"stargz-store restart: no store is running on {root}", file=sys.stderr)
        return 2
    before = read_state(root)
    generation = int(before.get("generation", 0))
    started = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    deadline = started + args.timeout
    while time.monotonic() < deadline:
        now = read_state(root)
        if int(now.get("generation", 0)) > generation:
            print(f"stargz-store restart: server pid {now.get('server_pid')} (version {now.get('version')}) serves "
                  f"after {time.monotonic() - started:.2f} s (was pid {before.get('server_pid')})")
            return 0
        time.sleep(0.05)
    print(f"stargz-store restart: no new server took over within {args.timeout:g} s (see the daemon's log)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
