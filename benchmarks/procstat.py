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


def descendants(pid: int) -> list[int]:
    """The living children of `pid`, their children and so on (from /proc/PID/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    todo.append(child)
    return found


def _cpu_of(pids: list[int]) -> float:
    total = 0.0
    for each in pids:
        try:
            total += cpu_seconds(each)
        except (OSError, ValueError, IndexError):
            pass  # exited meanwhile
    return total


def _status_of(pids: list[int], key: str) -> int | None:
    known = [v for v in (status_bytes(each, key) for each in pids) if v is not None]
    return sum(known) if known else None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its living descendants (the store: holder + serving processes)."""
    return _cpu_of([pid, *descendants(pid)])


def tree_context_switches(pid: int) -> int:
    """Context switches (voluntary and not) of every thread of a process and its living
    descendants so far: each wake-up of a sleeping thread is one, so for a FUSE server it counts
    the wake-ups a request costs, whatever the load."""
    total = 0
    for each in [pid, *descendants(pid)]:
        try:
            tasks = os.listdir(f"/proc/{each}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{each}/task/{task}/status") as f:
                    total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
            except (OSError, ValueError, IndexError):
                pass  # exited meanwhile
    return total


def tree_status_bytes(pid: int, key: str) -> int | None:
    """A /proc status size (`VmRSS`, `VmHWM`) summed over a process and its living descendants."""
    return _status_of([pid, *descendants(pid)], key)


def process_tree_usage(pid: int) -> ProcessUsage:
    """CPU and peak RSS of a process and its living descendants, summed: the whole store.

    The store is a holder process (owns the mount) and its serving processes (the server and a
    ready spare): what a node pays is all of them, as the Go store's one process is all of it.
    The sum of each process's peak is an upper bound of the peak of the sum; CPU of a child that
    has exited (a replaced server) is not counted.
    """
    pids = [pid, *descendants(pid)]  # one walk of /proc for both figures
    return ProcessUsage(_cpu_of(pids), _status_of(pids, "VmHWM") or 0)
