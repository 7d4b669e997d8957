"""Daemon start/stop, restarts, a dead registry and a lying network, with real processes."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.store import REPO_ROOT, is_mounted
from tests.fixtures.waiting import wait_for

from .conftest import FAST_CONFIG, push_reference


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_sha(image, rel: str) -> str:
    return image.expected["source_layers"][0]["overlay_diff"][rel]["sha256"]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stargz_store.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT))


def test_sigterm_unmounts_and_exits_zero(store_daemon_factory):
    store = store_daemon_factory(FAST_CONFIG)
    assert is_mounted(store.mountpoint)
    assert store.stop() == 0
    assert not is_mounted(store.mountpoint)


def test_second_daemon_on_the_same_root_is_refused(store_daemon_factory, tmp_path):
    first = store_daemon_factory(FAST_CONFIG)
    other_mnt = tmp_path / "other-mnt"
    other_mnt.mkdir()
    result = run_cli("--root", str(first.root), "--config", str(first.config_path), str(other_mnt))
    assert result.returncode == 2
    assert "already using root" in result.stderr
    assert not is_mounted(other_mnt)
    assert first.running and is_mounted(first.mountpoint)


def test_bad_config_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("noprefetch = [unterminated\n")
    (tmp_path / "mnt").mkdir()
    for config in (bad, tmp_path / "missing.toml"):
        result = run_cli("--root", str(tmp_path / "root"), "--config", str(config), str(tmp_path / "mnt"))
        assert result.returncode == 2, result.stderr
        assert str(config) in result.stderr


def test_stale_mount_of_a_crashed_daemon_is_cleaned_up(store_daemon_factory):
    store = store_daemon_factory(FAST_CONFIG)
    store.kill()  # SIGKILL: the FUSE mount stays behind, dead
    assert is_mounted(store.mountpoint)
    with pytest.raises(OSError) as info:
        os.listdir(store.mountpoint)
    assert info.value.errno == errno.ENOTCONN
    store.start()
    os.stat(store.mountpoint)
    assert store.stop() == 0


def test_registry_gone_after_resolve(store_daemon_factory, private_registry, testdata):
    image = push_reference(testdata, private_registry.host, "tricky-esgz")
    store = store_daemon_factory(FAST_CONFIG)
    diff = store.layer_dir(image.ref, image.layers[0]["digest"]) / "diff"
    assert sha256_of(diff / "files/hello.txt") == expected_sha(image, "files/hello.txt")
    private_registry.stop()
    # Already fetched: served from the cache (drop the kernel's page cache first, it would hide us).
    subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=False)
    assert sha256_of(diff / "files/hello.txt") == expected_sha(image, "files/hello.txt")
    # Metadata is all in memory: listing and stat still work.
    assert "random.bin" in os.listdir(diff / "files")
    assert os.stat(diff / "files/random.bin").st_size == 16789561
    # Never fetched: EIO (within the configured fetch timeout), not a hang, not garbage.
    with pytest.raises(OSError) as info:
        (diff / "files/random.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert store.running


def test_restart_on_the_same_root_reads_from_the_disk_cache(store_daemon_factory, private_registry, testdata):
    image = push_reference(testdata, private_registry.host, "tricky-zstdchunked")
    store = store_daemon_factory(FAST_CONFIG)
    diff = store.layer_dir(image.ref, image.layers[0]["digest"]) / "diff"
    names = ["files/hello.txt", "files/chunk-plus1.bin", "hard/h1"]
    for rel in names:
        assert sha256_of(diff / rel) == expected_sha(image, rel)
    assert store.stop() == 0

    store.start()
    os.stat(diff)  # resolving again (TOC) may talk to the registry; reading must not
    before = private_registry.blob_get_count()
    manifest_gets = _manifest_get_count(private_registry)
    for rel in names:
        assert sha256_of(diff / rel) == expected_sha(image, rel)
    assert private_registry.blob_get_count() == before
    assert _manifest_get_count(private_registry) == manifest_gets
    assert store.stats()["pool"]["image_loads_from_disk"] == 1  # manifest and config came from <root>/pool


def _manifest_get_count(registry) -> int:
    return sum(1 for line in registry.log_path.read_text(errors="replace").splitlines()
               if '"GET /v2/' in line and "/manifests/" in line)


def test_corrupted_bytes_give_eio_and_never_reach_the_cache(store_daemon_factory, private_registry, testdata):
    proxy = FaultProxy(private_registry.host).start()
    try:
        image = push_reference(testdata, private_registry.host, "multilayer-esgz", repo="flip/ml")
        ref = image.ref.replace(private_registry.host, proxy.host)
        # The proxy flips the first byte of each body: with neighbour fetch off, the read's
        # request starts at the file's own chunk (neighbours stored before it would come first).
        store = store_daemon_factory(FAST_CONFIG.replace("[store]\n", "[store]\nneighbour_fetch_kb = 0\n"))
        diff = store.layer_dir(ref, image.layers[0]["digest"]) / "diff"
        os.stat(diff)  # resolve (manifest, config, TOCs) through an honest proxy
        proxy.mode_path_contains = "/blobs/"
        proxy.mode = "flip_bytes"
        rel = "etc/config.txt"
        with pytest.raises(OSError) as info:
            (diff / rel).read_bytes()
        assert info.value.errno == errno.EIO
        proxy.mode = "pass"
        # Fetches still under way through the lying proxy (a read's neighbours, the rest of a small
        # layer) end in errors: let them, or the next read would wait for one and share its error.
        assert wait_for(lambda: all(layer.get("in_flight", 0) == 0 for layer in store.stats()["layers"].values()),
                        timeout=60, interval=0.05)
        assert sha256_of(diff / rel) == expected_sha(image, rel)
        # and what is now in the disk cache is right: a restart serves it without the network
        assert store.stop() == 0
        store.start()
        os.stat(diff)
        # What the new process fetches at the layer's open (a small layer whole) must not be under
        # way when the proxy starts lying, or the read would share its error (as above).
        assert wait_for(lambda: all(layer.get("in_flight", 0) == 0 for layer in store.stats()["layers"].values()),
                        timeout=60, interval=0.05)
        proxy.mode = "flip_bytes"
        subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=False)
        assert sha256_of(diff / rel) == expected_sha(image, rel)
    finally:
        proxy.stop()


def test_sigint_unmounts_and_systemd_is_told_ready(store_daemon_factory, tmp_path):
    import signal
    import socket

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    os.environ["NOTIFY_SOCKET"] = address
    try:
        store = store_daemon_factory(FAST_CONFIG)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert sock.recv(100) == b"READY=1"
        store.proc.send_signal(signal.SIGINT)
        assert store.proc.wait(20) == 0
        assert not is_mounted(store.mountpoint)
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()


def test_stop_does_not_wait_for_blocked_lookups(store_daemon_factory):
    """A registry that accepts connections and never answers: lookups block; SIGTERM must still
    unmount and exit cleanly, long before the (large) configured timeouts."""
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    host = f"127.0.0.1:{silent.getsockname()[1]}"
    store = store_daemon_factory("[resolver]\nrequest_timeout_sec = 300\n[store]\nresolve_timeout_sec = 300\n")
    errors: list[int] = []

    def lookup() -> None:
        try:
            os.stat(store.layer_dir(f"{host}/silent/repo:1", "sha256:" + "1" * 64) / "diff")
        except OSError as e:
            errors.append(e.errno)

    threads = [threading.Thread(target=lookup) for _ in range(3)]
    accepted = []
    try:
        for t in threads:
            t.start()
        silent.settimeout(60)
        accepted.append(silent.accept()[0])  # the store asks the registry: a lookup now blocks inside it
        assert store.stop(timeout=20) == 0  # would be killed (-9) if it waited for the 300 s timeouts
        for t in threads:
            t.join(10)
        assert errors and all(e in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED) for e in errors)
    finally:
        for conn in accepted:
            conn.close()
        silent.close()
