"""The holder runs in a small interpreter of its own (daemon/holder_main.py) once the mount is up.

Why it matters: the holder lives as long as the mount on every node; holding the server's modules
(registry, layer, cache, fs, requests, zstandard, prometheus_client) resident there cost ~20 MB
per node for nothing. These tests check what the holder imports and that the exec keeps what
the process was: the same pid (server.json, the root lock, systemd), the mount and a clean stop.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.store import REPO_ROOT, is_mounted

from .conftest import FAST_CONFIG

SERVER_ONLY = ("stargz_store.registry", "stargz_store.layer", "stargz_store.cache", "stargz_store.fs",
               "stargz_store.formats", "stargz_store.daemon.config", "requests", "urllib3", "zstandard",
               "prometheus_client",
               # the session (the servers' FUSE loop), and modules the holder's own code avoids:
               # dataclasses (with inspect and ast) and ctypes.util (with tempfile, shutil, random)
               "stargz_store.fuse.session", "stargz_store.fuse.journal", "dataclasses", "inspect", "ctypes.util",
               "tempfile")


def test_the_holder_module_imports_none_of_the_serving_code():
    out = subprocess.run([sys.executable, "-c", "import json, sys, stargz_store.daemon.holder_main; "
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=str(REPO_ROOT)).stdout
    modules = json.loads(out)
    assert "stargz_store.daemon.holder" in modules
    heavy = [m for m in modules if m.startswith(SERVER_ONLY)]
    assert heavy == []


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_mounting_process_becomes_the_small_holder_and_keeps_its_pid(store_daemon_factory):
    store = store_daemon_factory(FAST_CONFIG)
    pid = store.proc.pid
    state = store.server_state()
    assert state["holder_pid"] == pid
    assert "stargz_store.daemon.holder_main" in _cmdline(pid)
    assert (store.root / "stargz-store.lock").read_text().strip() == str(pid)
    # the lock is still held across the exec: a second store on the same root is refused
    other = store.mountpoint.parent / "other-mnt"
    other.mkdir()
    second = subprocess.run([sys.executable, "-m", "stargz_store.cli", "--root", str(store.root), str(other)],
                            capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT))
    assert second.returncode != 0 and f"pid {pid}" in second.stderr
    # no spare by default: one serving process, the holder's only child
    assert len(_children(pid)) == 1 and not state.get("standby")
    assert sorted(p.name for p in store.mountpoint.iterdir()) == ["pool"]
    assert store.stop() == 0
    assert not is_mounted(store.mountpoint)
    assert "unmounted" in store.log_path.read_text()
