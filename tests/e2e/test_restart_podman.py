"""Running containers keep reading through 10 planned restarts and 3 kill -9 of the store's server.

Real parts only: the registry behind a slow link (`FaultProxy` "slow" on blobs, so the large file
is still arriving while the server is replaced), the store daemon (holder + serving process) and
podman with runc. Two containers run the whole time:
- one checks the sha256 of 400 small files one after the other, in a loop, one line per file
  (the test drops their page cache from the host between passes, so every pass asks the store);
- one reads a 24 MiB lazily fetched file 1 MiB at a time, paced over the whole test, and prints
  its sha256 at the end.
Every line the containers print is timestamped here: the longest gap is the stall a reader saw.
0 failed reads and the right bytes are required; the stalls are printed (`-s`).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.images import write_oci_image
from tests.fixtures.podman import podman, podman_cleanup, podman_command
from tests.fixtures.registry_images import fetch_image
from tests.fixtures.restart_load import (BIG_FILE, BIG_SIZE, KILLS, PLANNED_RESTARTS, SMALL_FILES, big_file_data,
                                         restart_layer, small_file_name)
from tests.fixtures.restart_load import RESTART_CONFIG as CONFIG
from tests.fixtures.waiting import wait_for

from .app_images import convert_and_push

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.slow]

LINK_RATE = 2 << 20
MIB = 1 << 20
SMALL_LOOP = ('while true; do while read sum path; do '
              'if [ "$(sha256sum < "$path")" = "$sum  -" ]; then echo "ok $path"; else echo "FAIL $path"; fi; '
              'done < /small.sha256; echo pass; done')
# Piece i is read once the test allows it (creates /ctl/i): one piece is under way at every
# restart and kill, and the read spans them all however slow the machine is.
BIG_READ = (f'i=0; while [ $i -lt {BIG_SIZE // MIB} ]; do '
            'while [ ! -e /ctl/$i ]; do sleep 0.05; done; '
            'dd if=/' + BIG_FILE + ' bs=1M skip=$i count=1 2>/dev/null || echo "FAIL piece $i" >&2; '
            'echo "piece $i" >&2; i=$((i+1)); done | sha256sum')


class Lines:
    """The lines of one stream of a process, each with the monotonic time it arrived."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def count(self, prefix: str) -> int:
        return sum(1 for _, line in self.lines if line.startswith(prefix))

    def longest_gap(self, prefix: str, start: float = 0.0, end: float = float("inf")) -> float:
        times = [t for t, line in self.lines if line.startswith(prefix)]
        gaps = [b - a for a, b in zip(times, times[1:]) if start <= a < end]
        return max(gaps, default=0.0)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.fixture(scope="module")
def restart_image(registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("restart-podman-image")
    write_oci_image(work / "src", [restart_layer(busybox=True).gzip()], tag="src", config_extra={"Cmd": ["/bin/sh"]})
    convert_and_push(work / "src", "src", f"{registry.host}/restart/podman:esgz")
    return fetch_image(registry.host, "restart/podman", "esgz")


def test_containers_read_on_through_planned_restarts_and_kills_of_the_server(
        restart_image, registry, store_daemon_factory, podman_lane):
    proxy = FaultProxy(registry.host).start()
    store = store_daemon_factory(CONFIG, mountpoint=podman_lane.store_mountpoint())
    procs: list[subprocess.Popen] = []
    try:
        with podman_lane.private_dir("e2e-restart-") as pod_dir:
            env = podman_lane.env(pod_dir, additional_layer_store=store.mountpoint)
            ctl = pod_dir / "ctl"
            ctl.mkdir()
            try:
                _run(proxy, store, env, restart_image, procs, podman_lane, ctl)
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
                podman_cleanup(env)
    finally:
        proxy.stop()


def _run(proxy, store, env, image, procs, lane, ctl: Path) -> None:
    ref = f"{proxy.host}/restart/podman:esgz"
    podman("pull", "--tls-verify=false", ref, env=env, timeout=600)
    diff = store.layer_dir(ref, lane.layer_key(image.layers[0])) / "diff"  # the inodes this podman reads
    small = [diff / small_file_name(i) for i in range(SMALL_FILES)]
    proxy.mode_path_contains = "/blobs/"
    proxy.mode_options = {"rate": LINK_RATE}
    proxy.mode = "slow"

    def start(script: str) -> tuple[subprocess.Popen, Lines, Lines]:
        cmd = podman_command(env, "run", "--rm", "--net=none", "--pull=never", "-v", f"{lane.seen(ctl)}:/ctl:ro",
                             ref, "/bin/sh", "-c", script)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc, Lines(proc.stdout), Lines(proc.stderr)

    loop, loop_out, loop_err = start(SMALL_LOOP)
    big, big_out, big_err = start(BIG_READ)
    stop_dropping = threading.Event()
    dropper = threading.Thread(target=_drop_page_cache, args=(small, stop_dropping), daemon=True)
    dropper.start()

    def progressed(lines: Lines, prefix: str, more: int) -> bool:
        target = lines.count(prefix) + more
        return wait_for(lambda: lines.count(prefix) >= target or lines.count("FAIL") or loop.poll() is not None,
                        timeout=300, interval=0.02)

    try:
        allowed_at: list[float] = []

        def allow_piece() -> None:
            """Let the next 1 MiB of the large file be read: right before a restart or a kill, so
            that a read (and, unless readahead brought it in already, its fetch) is under way."""
            (ctl / str(len(allowed_at))).touch()
            allowed_at.append(time.monotonic())

        allow_piece()
        assert progressed(loop_out, "ok", 50) and progressed(big_err, "piece", 1), _tail(loop_out, loop_err, store)
        for _ in range(PLANNED_RESTARTS):
            allow_piece()
            store.restart()
            assert progressed(loop_out, "ok", 20), _tail(loop_out, loop_err, store)
        restarts_ended = time.monotonic()
        for _ in range(KILLS):
            generation = store.wait_standby()["generation"]
            allow_piece()
            store.kill_server()
            store.wait_generation(generation)
            assert progressed(loop_out, "ok", 20), _tail(loop_out, loop_err, store)
        kills_ended = time.monotonic()
        while len(allowed_at) < BIG_SIZE // MIB:
            allow_piece()
        big.wait(timeout=600)
    finally:
        stop_dropping.set()
        dropper.join(60)
    big_out.join(60)
    big_err.join(60)
    loop.kill()
    loop.wait()
    loop_out.join(60)
    state = store.server_state()
    print(f"\nrestart test ({lane.name}): {PLANNED_RESTARTS} planned restarts, "
          f"{KILLS} kill -9; small files checked {loop_out.count('ok')}, longest gap between two: during restarts "
          f"{loop_out.longest_gap('ok', end=restarts_ended):.2f} s, during kills "
          f"{loop_out.longest_gap('ok', restarts_ended, kills_ended):.2f} s; large file: longest 1 MiB piece "
          f"(over {LINK_RATE >> 20} MiB/s, from its go to its end) {_longest_piece(big_err, allowed_at):.2f} s; "
          f"holder state {state}")
    failures = [line for _, line in loop_out.lines + loop_err.lines + big_err.lines if "FAIL" in line
                or "rror" in line or "not connected" in line]
    assert failures == []
    assert big.returncode == 0
    assert big_err.count("piece") == BIG_SIZE // MIB
    assert [line for _, line in big_out.lines] == [f"{hashlib.sha256(big_file_data()).hexdigest()}  -"]
    assert (state["restarts"], state["crashes"]) == (PLANNED_RESTARTS, KILLS)


def _drop_page_cache(paths: list[Path], stop: threading.Event) -> None:
    """Drop the small files' cached pages again and again (the containers' overlay reads the same
    inodes of our mount), so that every pass of the loop asks the store."""
    while not stop.wait(0.5):
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _tail(out: Lines, err: Lines, store) -> str:
    return (f"container stdout: {[line for _, line in out.lines[-5:]]}\nstderr: {[line for _, line in err.lines[-5:]]}"
            f"\nstore log:\n{store.log_tail()}")


def _longest_piece(err: Lines, allowed_at: list[float]) -> float:
    """The longest read of a piece: from when it could start (allowed, and the one before done)
    to its end."""
    done = [t for t, line in err.lines if line.startswith("piece")]
    starts = [max(allowed, done[i - 1] if i else 0.0) for i, allowed in enumerate(allowed_at[:len(done)])]
    return max((end - start for start, end in zip(starts, done)), default=0.0)
