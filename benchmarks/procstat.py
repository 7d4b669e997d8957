"""CPU time and memory of a process from /proc, for the benchmarks' figures (one reader for all of them)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessUsage:
    cpu_seconds: float
    peak_rss_bytes: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far; ticks are usually 10 ms."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_bytes(pid: int, key: str) -> int | None:
    """A size line of /proc/PID/status (`VmRSS`, `VmHWM`, ...) in bytes; None when gone or absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_usage(pid: int) -> ProcessUsage:
    """CPU so far and peak resident set (VmHWM) of a process."""
    return ProcessUsage(cpu_seconds(pid), status_bytes(pid, "VmHWM") or 0)
