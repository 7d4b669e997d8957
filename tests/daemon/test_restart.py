"""Restarts and crashes of the serving process under readers, at the filesystem level (no Podman).

The store is the real daemon (holder + serving process), the image a real eStargz image in the
session registry behind a slow link (`FaultProxy` "slow": the large file is still being fetched
while the server is replaced or killed). Readers run in threads of this process: one loops over
small files, one reads a 24 MiB file in 128 KiB pieces. Every read must succeed with the right
bytes through 10 planned restarts and 3 kill -9 of the serving process; the longest stall of a
read is printed (`-s` shows it; the README quotes these figures).
"""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time

import pytest

from tests.daemon.conftest import RESTART_LINK_RATE as LINK_RATE
from tests.fixtures.restart_load import (BIG_FILE, BIG_SIZE, KILLS, PLANNED_RESTARTS, SMALL_FILES, FileLoop, SlowRead,
                                         big_file_data, small_file_data, small_file_name, stop_readers,
                                         wait_for_reads)
from tests.fixtures.restart_load import RESTART_CONFIG as CONFIG
from tests.fixtures.store import REPO_ROOT, is_mounted
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

def _diff(store, proxy, image):
    ref = f"{proxy.host}/restart/files:esgz"
    return store.layer_dir(ref, image.layers[0]["digest"]) / "diff"


def _start_readers(diff):
    small = {diff / small_file_name(i): small_file_data(i) for i in range(0, SMALL_FILES, 7)}
    loop = FileLoop(small).start()
    big = SlowRead(diff / BIG_FILE, paced=True).start()
    return loop, big


def test_readers_see_no_failure_through_planned_restarts_and_kills_of_the_server(
        store_daemon_factory, restart_image, slow_link):
    store = store_daemon_factory(CONFIG)
    diff = _diff(store, slow_link, restart_image)
    os.stat(diff)  # resolve through an honest link first
    slow_link.mode = "slow"
    loop, big = _start_readers(diff)
    try:
        step = BIG_SIZE // (PLANNED_RESTARTS + KILLS + 2)
        big.allow(step)
        assert wait_for(lambda: big.reads >= 4 and loop.reads >= 20, timeout=300), (loop.failures, big.failures)
        first = store.server_state()
        pids = {first["server_pid"]}
        restart_seconds = []
        for i in range(PLANNED_RESTARTS):
            started = time.monotonic()
            big.allow(step)  # a slow read under way while the server is replaced
            if i == 0:  # once the way an operator (or systemd's ExecReload) does it
                result = subprocess.run([sys.executable, "-m", "stargz_store.cli", "restart", "--root", str(store.root)],
                                        capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT))
                assert result.returncode == 0, result.stderr
                assert "serves after" in result.stdout
                state = store.server_state()
            else:
                state = store.restart()
            restart_seconds.append(time.monotonic() - started)
            assert state["server_pid"] not in pids
            pids.add(state["server_pid"])
            assert wait_for_reads(loop, 5), loop.failures
        assert big.done < BIG_SIZE, "the large file was read before the restarts ended: make the link slower"
        restarts_ended = time.monotonic()
        for _ in range(KILLS):
            generation = store.wait_standby()["generation"]  # crashes are rare: the spare is ready
            reads = big.reads
            big.allow(step)
            assert wait_for(lambda: big.reads > reads, timeout=300), big.failures  # the next reads are under way
            killed = store.kill_server()
            state = store.wait_generation(generation)
            assert state["server_pid"] != killed
            assert wait_for_reads(loop, 5), loop.failures
        kills_ended = time.monotonic()
        assert big.read_to_end(), "the large file's read did not end"
    finally:
        stop_readers(loop, big)
    state = store.server_state()
    print(f"\nrestart test (filesystem): {PLANNED_RESTARTS} planned restarts, {KILLS} kill -9; "
          f"small-file reads {loop.reads}, large-file reads {big.reads} (128 KiB, link {LINK_RATE >> 20} MiB/s); "
          f"longest read during restarts: small {loop.longest_between(0, restarts_ended):.2f} s, "
          f"large {big.longest_between(0, restarts_ended):.2f} s; during kills: small "
          f"{loop.longest_between(restarts_ended, kills_ended):.2f} s, large "
          f"{big.longest_between(restarts_ended, kills_ended):.2f} s; restart command took "
          f"{min(restart_seconds):.1f}-{max(restart_seconds):.1f} s; holder state {state}")
    assert loop.failures == [] and big.failures == []
    assert big.sha256 == hashlib.sha256(big_file_data()).hexdigest()
    holder_log = [line for line in store.log_path.read_text(errors="replace").splitlines() if ".holder:" in line]
    assert (state["restarts"], state["crashes"]) == (PLANNED_RESTARTS, KILLS), "\n".join(holder_log)
    assert store.stop() == 0
    assert not is_mounted(store.mountpoint)


def test_use_counts_and_held_nodes_survive_a_restart_and_a_kill(store_daemon_factory, restart_image, registry):
    store = store_daemon_factory(CONFIG)
    ref = f"{registry.host}/restart/files:esgz"
    digest = restart_image.layers[0]["digest"]
    layer = store.layer_dir(ref, digest)
    with pytest.raises(FileNotFoundError):
        open(layer / "use", "w")  # the use notification (containers/storage's)
    fd = os.open(layer / "diff" / small_file_name(3), os.O_RDONLY)  # the kernel holds the layer directory
    try:
        key = f"{ref} {digest}"
        assert store.stats()["refcounts"] == {key: 1}
        store.restart()
        stats = store.stats()
        assert stats["refcounts"] == {key: 1}
        assert stats["fs"]["nodes"] >= 3  # the root, the ref and layer directories
        assert os.pread(fd, 100, 0) == small_file_data(3)[:100]
        generation = store.server_state()["generation"]
        store.kill_server()
        store.wait_generation(generation)
        assert store.stats()["refcounts"] == {key: 1}
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 100, 0) == small_file_data(3)[:100]
        assert sorted(os.listdir(layer)) == ["blob", "diff", "info"]
        # the release notification reaches the new process's count
        with pytest.raises(OSError) as info:
            os.rmdir(layer)
        assert info.value.errno == errno.ENOENT
        assert store.stats()["refcounts"] == {}
    finally:
        os.close(fd)
    assert store.stop() == 0


def test_a_server_that_cannot_start_leaves_the_old_one_serving(store_daemon_factory, restart_image, registry):
    """An upgrade to a broken package must not take the mount down: the new process fails, the
    old one serves on (its generation stays)."""
    store = store_daemon_factory(CONFIG)
    diff = store.layer_dir(f"{registry.host}/restart/files:esgz", restart_image.layers[0]["digest"]) / "diff"
    assert (diff / small_file_name(1)).read_bytes() == small_file_data(1)
    # The spare server's start rewrites server.json (`standby`): wait for it, so that what the
    # failed start must not write is the only writer left.
    assert wait_for(lambda: store.server_state(timeout=0).get("standby"), timeout=120, interval=0.05)
    before = store.server_state()
    (store.root / "server.json").unlink()
    store.config_path.write_text("this is = = not toml\n")  # the next process refuses its config
    os.kill(store.proc.pid, 1)  # SIGHUP
    assert _wait_log(store, "before taking over")
    store.config_path.write_text(CONFIG)
    assert (diff / small_file_name(2)).read_bytes() == small_file_data(2)
    assert store.running
    assert store.server_state(timeout=0) == {}  # no new generation was written
    os.kill(before["server_pid"], 0)  # the old server still runs
    assert store.stop() == 0


def _wait_log(store, text: str, timeout: float = 120.0) -> bool:
    return wait_for(lambda: text in store.log_path.read_text(errors="replace"), timeout=timeout, interval=0.05)


def test_without_a_spare_a_crashed_server_is_replaced_by_a_new_process(store_daemon_factory, restart_image, registry):
    store = store_daemon_factory(CONFIG.replace("spare_server = true", "spare_server = false"))
    diff = store.layer_dir(f"{registry.host}/restart/files:esgz", restart_image.layers[0]["digest"]) / "diff"
    assert (diff / small_file_name(5)).read_bytes() == small_file_data(5)
    state = store.server_state()
    assert len(_children(store.proc.pid)) == 1 and not state["standby"]
    killed = store.kill_server()
    assert store.wait_generation(state["generation"])["server_pid"] != killed
    fd = os.open(diff / small_file_name(5), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 1 << 16, 0) == small_file_data(5)
    finally:
        os.close(fd)
    assert store.stop() == 0


def _children(pid: int) -> list[int]:
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
