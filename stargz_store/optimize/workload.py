"""One run of the workload under Podman, stopped at its exit, at a timeout, or at a line of output.

    spec = WorkloadSpec(args=["python3", "-c", "print(1)"], timeout=60, wait_line=re.compile("ready"))
    ran = run_workload(ref, spec, podman_env)      # never raises for the workload's own failure
    ran.ended, ran.exit_code, ran.seconds

What must hold: the container is gone when this returns, whatever happened (it ran under a name
of ours: `podman rm -f NAME`); a workload that fails, hangs or floods its output still ends the
run (its output is read on a thread, only its tail kept); timing covers `podman run` only (the
image was pulled before).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..localenv.podman import podman_command, run_podman

log = logging.getLogger(__name__)

ENDED_EXIT = "exit"
ENDED_TIMEOUT = "timeout"
ENDED_WAIT_LINE = "wait-line"
TAIL_LINES = 20
STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class WorkloadSpec:
    """What to run: `podman run [--entrypoint JSON] [-e K=V].. [--mount M].. IMAGE ARGS..`."""

    entrypoint: list[str] | None = None
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    network: str = "none"
    timeout: float = 60.0
    wait_line: re.Pattern[str] | None = None

    def run_args(self, name: str, image: str) -> list[str]:
        argv = ["run", "--name", name, "--pull=never", f"--network={self.network}"]
        if self.entrypoint is not None:
            argv.append("--entrypoint=" + json.dumps(self.entrypoint))
        for item in self.env:
            argv += ["--env", item]
        for item in self.mounts:
            argv += ["--mount", item]
        return argv + [image, *self.args]


@dataclass(frozen=True)
class WorkloadRun:
    """How the run ended (`ended`: exit, timeout or wait-line), its exit code when it exited by
    itself, how long `podman run` took until then, and the last lines of its output."""

    ended: str
    exit_code: int | None
    seconds: float
    output_tail: list[str]


def run_workload(image: str, spec: WorkloadSpec, env: dict[str, str]) -> WorkloadRun:
    """Run `image` once (already pulled into the Podman of `env`) and stop it as `spec` says."""
    name = "stargz-optimize-" + secrets.token_hex(4)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    matched = threading.Event()
    cmd = podman_command(env, *spec.run_args(name, image))
    log.info("running %s", " ".join(cmd))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    reader = threading.Thread(target=_read_output, args=(proc, spec.wait_line, tail, matched),
                              name="workload-output", daemon=True)
    reader.start()
    try:
        ended = _wait(proc, matched, started + spec.timeout)
        seconds = time.monotonic() - started
        exit_code = proc.returncode if ended == ENDED_EXIT else None
    finally:
        if proc.poll() is None:
            run_podman("rm", "--force", "--time", "0", name, env=env, check=False, timeout=STOP_TIMEOUT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        run_podman("rm", "--force", "--ignore", name, env=env, check=False, timeout=STOP_TIMEOUT)
        reader.join(5.0)
    return WorkloadRun(ended, exit_code, seconds, list(tail))


def _wait(proc: subprocess.Popen, matched: threading.Event, deadline: float) -> str:
    """Whichever comes first: the exit, the wanted line, the deadline."""
    while True:
        if matched.is_set():
            return ENDED_WAIT_LINE
        if proc.poll() is not None:
            return ENDED_WAIT_LINE if matched.is_set() else ENDED_EXIT
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ENDED_TIMEOUT
        matched.wait(min(0.1, remaining))


def _read_output(proc: subprocess.Popen, wait_line: re.Pattern[str] | None, tail: deque[str],
                 matched: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        log.debug("workload: %s", line)
        if wait_line is not None and not matched.is_set() and wait_line.search(line):
            matched.set()
