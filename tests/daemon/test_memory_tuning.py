"""The daemon's malloc tuning: arenas capped, free heap handed back after busy periods only."""
from __future__ import annotations

import os
import subprocess
import sys
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


_MAPPED_BYTES = """
import ctypes, sys
from stargz_store.daemon import cli

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
cli.tune_malloc()
mapped = []
for mib in (4, 8, 4):  # a chunk, a streamed request's buffer, a chunk after that buffer was freed
    before = libc.mallinfo2().hblkhd
    buffer = bytearray(mib << 20)
    mapped.append(libc.mallinfo2().hblkhd - before)
    del buffer
print(*mapped)
"""


def test_buffers_larger_than_a_chunk_get_their_own_mapping():
    """After `tune_malloc`, a buffer larger than a 4 MiB chunk is mapped (and unmapped when freed),
    also after a larger one was freed; a chunk-sized one comes from the heap, reused without page
    faults. Run in a fresh interpreter: the threshold is process state, and MALLOC_* variables
    (which glibc reads at start) are left out."""
    out = subprocess.run([sys.executable, "-c", _MAPPED_BYTES], capture_output=True, text=True, check=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    chunk, larger, chunk_after = map(int, out.stdout.split())
    assert larger >= 8 << 20
    assert chunk == 0 and chunk_after == 0
