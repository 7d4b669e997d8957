"""The daemon's malloc tuning: arenas capped, free heap handed back after busy periods only."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

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


_MAPPED_BYTES = """
import ctypes, sys
from stargz_store.daemon import cli

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = bytearray(8 << 20)  # mapped, and freeing it raises glibc's default threshold to 8 MiB
del big
if sys.argv[1] == "tuned":
    cli.tune_malloc()
before = libc.mallinfo2().hblkhd
buffer = bytearray(1 << 20)  # an inflated chunk's size
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize("tuned", [True, False])
def test_large_buffers_get_their_own_mapping_after_tuning(tuned):
    """A fetch-sized buffer is mapped (and unmapped when freed), even after a larger one was freed.

    glibc raises its mmap threshold to each freed mapped block's size, after which such buffers
    come from the heap and stay resident until a trim; `tune_malloc` fixes the threshold. Run in a
    fresh interpreter: the threshold is process state. The untuned run shows the rise this avoids.
    """
    out = subprocess.run([sys.executable, "-c", _MAPPED_BYTES, "tuned" if tuned else "default"],
                         capture_output=True, text=True, check=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    mapped = int(out.stdout)
    if tuned:
        assert mapped >= 1 << 20
    else:
        assert mapped == 0
