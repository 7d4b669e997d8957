"""The daemon's malloc tuning: arenas capped, free heap handed back after busy periods only."""
from __future__ import annotations

import threading

from stargz_store.daemon import cli


def test_tune_malloc_returns_a_working_trim():
    trim = cli.tune_malloc()
    assert trim is not None  # glibc (Debian)
    assert trim() in (0, 1)


def test_trimmer_trims_only_after_work(monkeypatch):
    calls: list[float] = []
    cpu = [0.0]
    looks = threading.Semaphore(0)

    def cpu_seconds() -> float:
        looks.release()
        return cpu[0]

    monkeypatch.setattr(cli, "_cpu_seconds", cpu_seconds)
    done = threading.Event()

    def trim() -> int:
        calls.append(cpu[0])
        done.set()
        return 1

    trimmer = cli.MemoryTrimmer(trim, interval=0.01)
    trimmer.start()
    try:
        # The trimmer reads the CPU time at start and at each check, and a trim decided at a check
        # happens before the next read: after three reads an idle check was made and acted upon.
        for _ in range(3):
            assert looks.acquire(timeout=30)
        assert calls == []  # idle: no CPU used, no trim
        cpu[0] = 1.0
        assert done.wait(30)
        assert calls[0] == 1.0
    finally:
        trimmer.stop()
