"""Running containers keep reading through 10 planned restarts and 3 kill -9 of the store's server,
and through 3 take-overs of the mount by new, independent stores (`--takeover`).

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

from stargz_store.fuse import passthrough_permitted
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.images import write_oci_image
from tests.fixtures.podman import podman, podman_cleanup, podman_command
from tests.fixtures.registry_images import fetch_image
from tests.fixtures.restart_load import (BIG_FILE, BIG_SIZE, KILLS, PLANNED_RESTARTS, SMALL_FILES, big_file_data,
                                         restart_layer, small_file_name)
from tests.fixtures.restart_load import RESTART_CONFIG
from tests.fixtures.store import is_mounted
from tests.fixtures.waiting import wait_for

from .app_images import convert_and_push

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.slow]

LINK_RATE = 2 << 20
TAKEOVERS = 3
# Passthrough on whatever the default: the containers execute and read files the kernel reads
# from backing files, across every restart, kill and take-over (it is off where not permitted).
CONFIG = RESTART_CONFIG.replace("[store]\n", "[store]\npassthrough = true\n")
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
    try:
        with ReadingContainers(proxy, store, restart_image, podman_lane) as readers:
            for _ in range(PLANNED_RESTARTS):
                readers.allow_piece()
                store.restart()
                readers.wait_checks(20)
            restarts_ended = time.monotonic()
            for _ in range(KILLS):
                generation = store.wait_standby()["generation"]
                readers.allow_piece()
                store.kill_server()
                store.wait_generation(generation)
                readers.wait_checks(20)
            kills_ended = time.monotonic()
            readers.finish()
    finally:
        proxy.stop()
    state = store.server_state()
    print(f"\nrestart test ({podman_lane.name}): {PLANNED_RESTARTS} planned restarts, "
          f"{KILLS} kill -9; small files checked {readers.loop_out.count('ok')}, longest gap between two: during "
          f"restarts {readers.loop_out.longest_gap('ok', end=restarts_ended):.2f} s, during kills "
          f"{readers.loop_out.longest_gap('ok', restarts_ended, kills_ended):.2f} s; large file: longest 1 MiB piece "
          f"(over {LINK_RATE >> 20} MiB/s, from its go to its end) {readers.longest_piece():.2f} s; "
          f"holder state {state}; passthrough {_passthrough_stats(store)}")
    readers.assert_read_right()
    assert (state["restarts"], state["crashes"]) == (PLANNED_RESTARTS, KILLS)
    assert _passthrough_stats(store)["passthrough_opens"] or not passthrough_permitted()


def test_containers_read_on_while_new_stores_take_the_mount_over(restart_image, registry, store_daemon_factory,
                                                                 podman_lane):
    """A DaemonSet's rolling update, without Kubernetes: each time a new, independent
    `stargz-store --takeover` on the same root and mountpoint takes the mount over, then the old
    one gets SIGTERM (the old pod deleted) and exits without unmounting."""
    proxy = FaultProxy(registry.host).start()
    store = store_daemon_factory(CONFIG, mountpoint=podman_lane.store_mountpoint())
    took: list[float] = []
    try:
        with ReadingContainers(proxy, store, restart_image, podman_lane) as readers:
            for _ in range(TAKEOVERS):
                readers.allow_piece()
                started = time.monotonic()
                new = store_daemon_factory(CONFIG, root=store.root, mountpoint=store.mountpoint,
                                           extra_args=["--takeover"], start=False)
                new.start()  # returns at once: the mount answers (the old store's)
                assert wait_for(lambda: new.server_state(timeout=0).get("holder_pid") == new.proc.pid
                                or not new.running, timeout=300, interval=0.02), new.log_tail()
                assert new.running, new.log_tail()
                took.append(time.monotonic() - started)
                assert store.stop(mount_stays=True) == 0  # the old pod deleted: SIGTERM
                assert "exiting; the mount stays" in store.log_path.read_text(errors="replace")
                store = readers.store = new
                readers.wait_checks(20)
            readers.finish()
    finally:
        proxy.stop()
    state = store.server_state()
    print(f"\ntake-over test ({podman_lane.name}): {TAKEOVERS} take-overs by new stores (each serving "
          f"{min(took):.1f}-{max(took):.1f} s after its start); small files checked {readers.loop_out.count('ok')}, "
          f"longest gap between two {readers.loop_out.longest_gap('ok'):.2f} s; large file: longest 1 MiB piece "
          f"(over {LINK_RATE >> 20} MiB/s) {readers.longest_piece():.2f} s; holder state {state}; "
          f"passthrough {_passthrough_stats(store)}")
    readers.assert_read_right()
    assert state["takeovers"] == TAKEOVERS
    assert _passthrough_stats(store)["passthrough_opens"] or not passthrough_permitted()
    assert store.stop() == 0  # the last one, with no successor: a real stop
    assert not is_mounted(store.mountpoint)


class ReadingContainers:
    """The two reading containers of these tests, on `image` pulled through `proxy` into `lane`'s
    podman with `store` as its additional layer store; the proxy turns slow once they are pulled.
    `store` may be replaced (a take-over): the log shown on a failure is the current one's."""

    def __init__(self, proxy, store, image, lane) -> None:
        self.proxy, self.store, self.image, self.lane = proxy, store, image, lane
        self.procs: list[subprocess.Popen] = []
        self.allowed_at: list[float] = []
        self._stop_dropping = threading.Event()
        self._private = lane.private_dir("e2e-restart-")

    def __enter__(self) -> ReadingContainers:
        pod_dir = self._private.__enter__()
        self.env = self.lane.env(pod_dir, additional_layer_store=self.store.mountpoint)
        self.ctl = pod_dir / "ctl"
        self.ctl.mkdir()
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_dropping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        try:
            podman_cleanup(self.env)
        finally:
            self._private.__exit__(None, None, None)

    def _start(self) -> None:
        ref = f"{self.proxy.host}/restart/podman:esgz"
        podman("pull", "--tls-verify=false", ref, env=self.env, timeout=600)
        diff = self.store.layer_dir(ref, self.lane.layer_key(self.image.layers[0])) / "diff"  # what podman reads
        small = [diff / small_file_name(i) for i in range(SMALL_FILES)]
        # The shell and its applets read whole once from the host: with passthrough on, the
        # containers then execute a file open by passthrough (its mode across every restart).
        (diff / "bin" / "busybox").read_bytes()
        if passthrough_permitted():
            assert wait_for(lambda: self.store.stats().get("backing_files", {}).get("made", 0) >= 1, timeout=120,
                            interval=0.05), self.store.stats()
        self.proxy.mode_path_contains = "/blobs/"
        self.proxy.mode_options = {"rate": LINK_RATE}
        self.proxy.mode = "slow"
        self.loop, self.loop_out, self.loop_err = self._container(ref, SMALL_LOOP)
        self.big, self.big_out, self.big_err = self._container(ref, BIG_READ)
        self._dropper = threading.Thread(target=_drop_page_cache, args=(small, self._stop_dropping), daemon=True)
        self._dropper.start()
        self.allow_piece()
        assert self._progressed(self.loop_out, "ok", 50) and self._progressed(self.big_err, "piece", 1), self._tail()

    def _container(self, ref: str, script: str) -> tuple[subprocess.Popen, Lines, Lines]:
        cmd = podman_command(self.env, "run", "--rm", "--net=none", "--pull=never", "-v",
                             f"{self.lane.seen(self.ctl)}:/ctl:ro", ref, "/bin/sh", "-c", script)
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc, Lines(proc.stdout), Lines(proc.stderr)

    def allow_piece(self) -> None:
        """Let the next 1 MiB of the large file be read: right before a restart, kill or take-over,
        so that a read (and, unless readahead brought it in already, its fetch) is under way."""
        (self.ctl / str(len(self.allowed_at))).touch()
        self.allowed_at.append(time.monotonic())

    def _progressed(self, lines: Lines, prefix: str, more: int) -> bool:
        target = lines.count(prefix) + more
        return wait_for(lambda: lines.count(prefix) >= target or lines.count("FAIL") or self.loop.poll() is not None,
                        timeout=300, interval=0.02)

    def wait_checks(self, more: int) -> None:
        """`more` small files checked (a FAIL or an ended loop ends the wait: asserted later)."""
        assert self._progressed(self.loop_out, "ok", more), self._tail()

    def finish(self) -> None:
        """Let the large file be read to its end; stop the loop."""
        while len(self.allowed_at) < BIG_SIZE // MIB:
            self.allow_piece()
        self.big.wait(timeout=600)
        self._stop_dropping.set()
        self._dropper.join(60)
        self.big_out.join(60)
        self.big_err.join(60)
        self.loop.kill()
        self.loop.wait()
        self.loop_out.join(60)

    def longest_piece(self) -> float:
        return _longest_piece(self.big_err, self.allowed_at)

    def assert_read_right(self) -> None:
        """No failed read, every piece of the large file read, its sha256 right."""
        failures = [line for _, line in self.loop_out.lines + self.loop_err.lines + self.big_err.lines
                    if "FAIL" in line or "rror" in line or "not connected" in line]
        assert failures == []
        assert self.big.returncode == 0
        assert self.big_err.count("piece") == BIG_SIZE // MIB
        assert [line for _, line in self.big_out.lines] == [f"{hashlib.sha256(big_file_data()).hexdigest()}  -"]

    def _tail(self) -> str:
        return _tail(self.loop_out, self.loop_err, self.store)


def _passthrough_stats(store) -> dict:
    fs = store.stats().get("fs", {})
    return {k: fs.get(k) for k in ("passthrough_opens", "read_requests", "passthrough_inodes", "cached_inodes")}


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
