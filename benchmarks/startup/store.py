"""Our stargz-store daemon as the benchmark runs it: fresh root per run, CPU time and peak RSS read from /proc.

The process itself is `stargz_store.localenv.store.StoreProcess`; this adds the benchmark's
layout under one base directory, pid recording for a later sweep, and the usage figures.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from stargz_store.localenv.store import PACKAGE_PARENT, StoreError, StoreProcess

from ..procstat import ProcessUsage, process_tree_usage, process_usage
from . import leftovers

__all__ = ["ProcessUsage", "Store", "StoreError", "process_usage"]


# A checkout whose `stargz_store` the benchmark's daemon runs instead of this one, for before/after
# comparisons of the store's code under one harness (e.g. a `git worktree` of an older commit).
STORE_TREE_ENV = "STARGZ_BENCH_STORE_TREE"


def store_package_parent() -> Path:
    """The directory holding the `stargz_store` package the daemon imports: $STARGZ_BENCH_STORE_TREE or ours."""
    tree = os.environ.get(STORE_TREE_ENV)
    if not tree:
        return PACKAGE_PARENT
    path = Path(tree).resolve()
    if not (path / "stargz_store" / "cli.py").is_file():
        raise StoreError(f"{STORE_TREE_ENV}={tree}: no stargz_store/cli.py there")
    return path


class Store(StoreProcess):
    """One daemon at a time on `base`/mnt with root `base`/root; `wipe()` then `start()` gives a cold store."""

    def __init__(self, base: Path):
        super().__init__(root=base / "root", mountpoint=base / "mnt", config_path=base / "config.toml",
                         log_path=base / "store.log",
                         log_level=os.environ.get("STARGZ_BENCH_STORE_LOG_LEVEL", "info"),
                         preexec_fn=leftovers.die_with_parent(), package_parent=store_package_parent())
        self.base = base

    def start(self, config_text: str, timeout: float = 60.0) -> None:  # type: ignore[override]
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text)
        super().start(timeout)

    def _spawned(self) -> None:
        assert self.proc is not None
        leftovers.record_pid(self.proc.pid, str(self.mountpoint))  # our mountpoint: never a test's daemon

    def usage(self) -> ProcessUsage:
        if not self.running:
            raise StoreError(f"stargz-store is not running: {self.log_tail(3000)}")
        assert self.proc is not None
        return process_tree_usage(self.proc.pid)  # the holder and its serving processes

    def stats(self, timeout: float = 5.0) -> dict | None:  # type: ignore[override]
        """The daemon's own counters, or None if it does not answer (a benchmark run records what it can)."""
        try:
            return super().stats(timeout)
        except StoreError:
            return None

    def stop(self, timeout: float = 30.0, unmount_leftover: bool = True) -> int | None:
        return super().stop(timeout, unmount_leftover)

    def wipe(self) -> None:
        """Stop and forget everything the store cached: the next start is cold."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
