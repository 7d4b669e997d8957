"""The daemon's malloc tuning: arenas capped, free heap handed back after busy periods only."""
from __future__ import annotations

import threading
import time

from stargz_store.daemon import cli


def test_tune_malloc_returns_a_working_trim():
    trim = cli.tune_malloc()
    assert trim is not None  # glibc (Debian)
    assert trim() in (0, 1)


def test_trimmer_trims_only_after_work(monkeypatch):
    calls: list[float] = []
    cpu = [0.0]
    monkeypatch.setattr(cli, "_cpu_seconds", lambda: cpu[0])
    done = threading.Event()

    def trim() -> int:
        calls.append(cpu[0])
        done.set()
        return 1

    trimmer = cli.MemoryTrimmer(trim, interval=0.01)
    trimmer.start()
    try:
        time.sleep(0.1)
        assert calls == []  # idle: no CPU used, no trim
        cpu[0] = 1.0
        assert done.wait(5)
        assert calls[0] == 1.0
    finally:
        trimmer.stop()
