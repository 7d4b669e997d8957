"""A second, independent store takes a live mount over (`--takeover`), as a DaemonSet's rolling update does.

Two `stargz-store` invocations, separate process trees sharing nothing but the data root and the
mountpoint (like two pods sharing a hostPath): the first serves readers, the second is started
with `--takeover`, gets the mount's `/dev/fuse` descriptor and state over `<root>/holder.sock`
and serves; the first then gets SIGTERM (Kubernetes deleting the old pod) and exits without
unmounting. Readers: one loops over small files, one is part-way through a 24 MiB lazily fetched
file over a slow link (sha256 checked at the end): 0 failed reads, the longest read printed
(`-s`). Also: a successor that dies in the middle of the hand-over leaves the first serving, and a
stop with no successor still unmounts.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from tests.fixtures.restart_load import BIG_FILE, BIG_SIZE, SMALL_FILES, FileLoop, SlowRead, big_file_data
from tests.fixtures.restart_load import RESTART_CONFIG as CONFIG
from tests.fixtures.restart_load import small_file_data, small_file_name, stop_readers, wait_for_reads
from tests.fixtures.store import StoreDaemon, is_mounted, lazy_unmount, private_tmpdir, remove_tmpdir
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _successor(store_daemon_factory, old):
    """A second store on the same root and mountpoint, started with `--takeover`."""
    new = store_daemon_factory(CONFIG, root=old.root, mountpoint=old.mountpoint, extra_args=["--takeover"],
                               start=False)
    new.start()  # returns at once: the mount (the old store's) answers
    return new


def _served_by(store, timeout: float = 300.0) -> dict:
    """Wait until `store`'s holder serves the mount (`server.json` names it); it must not exit meanwhile."""
    pid = store.proc.pid
    assert wait_for(lambda: store.server_state(timeout=0).get("holder_pid") == pid or not store.running,
                    timeout=timeout, interval=0.02), store.log_tail()
    assert store.running, store.log_tail()
    return store.server_state()


def _log_has(store, text: str, timeout: float = 300.0, while_running=None) -> bool:
    """`text` in `store`'s log; False at once if `while_running` (a store) exited first."""
    def seen() -> bool:
        return text in store.log_path.read_text(errors="replace")

    wait_for(lambda: seen() or (while_running is not None and not while_running.running), timeout=timeout,
             interval=0.01)
    return seen()


def _small_files(diff):
    return {diff / small_file_name(i): small_file_data(i) for i in range(0, SMALL_FILES, 7)}


def test_a_second_store_takes_the_mount_over_and_readers_see_no_failure(store_daemon_factory, restart_image,
                                                                         slow_link):
    old = store_daemon_factory(CONFIG)
    diff = old.layer_dir(f"{slow_link.host}/restart/files:esgz", restart_image.layers[0]["digest"]) / "diff"
    os.stat(diff)  # resolve through an honest link first
    slow_link.mode = "slow"
    loop = FileLoop(_small_files(diff)).start()
    big = SlowRead(diff / BIG_FILE, paced=True).start()
    try:
        big.allow(BIG_SIZE // 4)
        assert wait_for(lambda: big.reads >= 4 and loop.reads >= 20, timeout=300), (loop.failures, big.failures)
        before = old.server_state()
        big.allow(BIG_SIZE // 4)  # a slow read under way while the mount changes hands
        started = time.monotonic()
        new = _successor(store_daemon_factory, old)
        state = _served_by(new)
        took = time.monotonic() - started
        assert state["generation"] > before["generation"] and state["takeovers"] == 1
        assert old.running  # it waits for its stop signal, holding nothing
        assert wait_for_reads(loop, 5), loop.failures
        handed_at = time.monotonic()
        assert old.stop(mount_stays=True) == 0  # Kubernetes deletes the old pod: SIGTERM
        assert is_mounted(new.mountpoint)
        assert wait_for_reads(loop, 5), loop.failures
        assert big.read_to_end(), "the large file's read did not end"
    finally:
        stop_readers(loop, big)
    print(f"\ntake-over test (filesystem): new store serving {took:.1f} s after its start; small-file reads "
          f"{loop.reads}, longest {loop.longest_between(started, handed_at):.2f} s; large-file reads {big.reads} "
          f"(128 KiB over {slow_link.mode_options['rate'] >> 20} MiB/s), longest "
          f"{big.longest_between(started, handed_at):.2f} s during the take-over, {big.longest_stall:.2f} s overall")
    assert loop.failures == [] and big.failures == []
    assert big.sha256 == hashlib.sha256(big_file_data()).hexdigest()
    old_log = old.log_path.read_text(errors="replace")
    assert "exiting; the mount stays" in old_log and "unmounted" not in old_log
    assert (diff / small_file_name(3)).read_bytes() == small_file_data(3)
    assert new.stop() == 0  # a stop with no successor: a real one
    assert not is_mounted(new.mountpoint)


@pytest.mark.parametrize("dies", ["while the old server stops", "after the state was sent"])
def test_a_successor_that_dies_mid_hand_over_leaves_the_old_store_serving(store_daemon_factory, restart_image,
                                                                         slow_link, dies):
    """The old store's server is held in its stop by a lookup the registry does not answer yet, so
    the successor can be killed at a known step: before the state reached it, or after (frozen
    with SIGSTOP until then). Either way the old store serves on, no read fails, and its stop
    then unmounts."""
    old = store_daemon_factory(CONFIG)
    diff = old.layer_dir(f"{slow_link.host}/restart/files:esgz", restart_image.layers[0]["digest"]) / "diff"
    os.stat(diff)
    loop = FileLoop(_small_files(diff)).start()
    held = slow_link.add_rule("hold", path_contains="/manifests/not-yet")
    lookup_errors: list[BaseException] = []

    def lookup() -> None:
        try:
            os.stat(old.layer_dir(f"{slow_link.host}/restart/files:not-yet", restart_image.layers[0]["digest"]) / "diff")
        except FileNotFoundError:
            pass  # the registry has no such tag
        except BaseException as e:  # noqa: BLE001 - reported by the test
            lookup_errors.append(e)

    lookup_thread = threading.Thread(target=lookup, daemon=True)
    try:
        assert wait_for_reads(loop, 20), loop.failures
        before = old.server_state()
        lookup_thread.start()
        assert held.held.wait(30), (lookup_errors, slow_link.seen[-5:], old.log_tail())
        new = _successor(store_daemon_factory, old)
        assert _log_has(old, f"holder pid {new.proc.pid} is ready: stopping server", while_running=new), \
            (old.log_tail(), new.log_tail())
        if dies == "after the state was sent":
            new.proc.send_signal(signal.SIGSTOP)
            held.release.set()
            assert _log_has(old, f"sent the mount's state to holder pid {new.proc.pid}"), old.log_tail()
        new.proc.kill()
        assert new.proc.wait(60) == -signal.SIGKILL
        held.release.set()
        went = "after it got the mount's state" if dies == "after the state was sent" else "during the hand-over"
        assert _log_has(old, f"holder pid {new.proc.pid} went away {went}"), old.log_tail()
        state = old.wait_generation(before["generation"])
        assert state["holder_pid"] == old.proc.pid and state["takeovers"] == 0
        assert wait_for_reads(loop, 20), loop.failures
        lookup_thread.join(120)
    finally:
        held.release.set()
        loop.stop.set()
        loop.join(120)
    print(f"\ntake-over cut short {dies}: small-file reads {loop.reads}, longest {loop.longest_stall:.2f} s")
    assert loop.failures == [] and lookup_errors == []
    assert not lookup_thread.is_alive()
    assert "unmount" not in new.log_path.read_text(errors="replace")
    assert old.stop() == 0  # no successor any more: a real stop
    assert not is_mounted(old.mountpoint)


def test_a_stop_signal_during_the_hand_over_waits_for_the_successor(store_daemon_factory, restart_image, slow_link):
    """Kubernetes may delete the old pod before the new one has taken over (a readiness probe
    that answers too early): the old store's SIGTERM then waits for the successor to serve, and
    it exits without unmounting."""
    old = store_daemon_factory(CONFIG)
    diff = old.layer_dir(f"{slow_link.host}/restart/files:esgz", restart_image.layers[0]["digest"]) / "diff"
    os.stat(diff)
    loop = FileLoop(_small_files(diff)).start()
    held = slow_link.add_rule("hold", path_contains="/manifests/not-yet")
    lookup_thread = threading.Thread(target=_look_up_missing, args=(old, slow_link, restart_image), daemon=True)
    try:
        assert wait_for_reads(loop, 20), loop.failures
        lookup_thread.start()
        assert held.held.wait(120), "the lookup did not reach the registry"
        new = _successor(store_daemon_factory, old)
        assert _log_has(old, f"holder pid {new.proc.pid} is ready: stopping server", while_running=new), \
            (old.log_tail(), new.log_tail())
        old.proc.send_signal(signal.SIGTERM)
        assert _log_has(old, "waiting for it"), old.log_tail()
        held.release.set()
        assert old.proc.wait(120) == 0, old.log_tail()
        assert _served_by(new)["takeovers"] == 1
        assert is_mounted(new.mountpoint)
        assert wait_for_reads(loop, 20), loop.failures
    finally:
        held.release.set()
        loop.stop.set()
        loop.join(120)
    assert loop.failures == []
    assert "exiting; the mount stays" in old.log_path.read_text(errors="replace")
    assert new.stop() == 0
    assert not is_mounted(new.mountpoint)


def _look_up_missing(store, proxy, image) -> None:
    """Look up a layer of a tag the registry does not have (ENOENT once the registry answers)."""
    try:
        os.stat(store.layer_dir(f"{proxy.host}/restart/files:not-yet", image.layers[0]["digest"]) / "diff")
    except FileNotFoundError:
        pass


@dataclass
class PodStore(StoreDaemon):
    """A store in a mount namespace of its own whose copy of the shared "hostPath" directory is
    a peer of the host's: what a pod with `mountPropagation: Bidirectional` gets; with
    `pid_namespace`, in a PID namespace of its own too, its holder PID 1 there, as in a pod
    (`unshare --fork` ignores SIGTERM: `stop` signals the holder itself)."""

    pid_namespace: bool = False

    def command(self) -> list[str]:
        pid = ["--pid", "--fork", "--kill-child=SIGKILL"] if self.pid_namespace else []
        return ["unshare", "--mount", "--propagation", "unchanged", *pid, "--", *super().command()]

    def stop(self, *args, **kwargs) -> int | None:
        if self.pid_namespace and self.running:
            for child in open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split():
                os.kill(int(child), signal.SIGTERM)
        return super().stop(*args, **kwargs)


@pytest.mark.parametrize("pid_namespace", [False, True], ids=["mount-ns", "mount-and-pid-ns"])
def test_a_store_in_another_namespace_takes_the_mount_over_and_the_host_keeps_it(registry, restart_image,
                                                                                 pid_namespace):
    """Like two pods: each store in its own mount namespace (and PID namespace), the data root and
    mountpoint in a shared ("Bidirectional") directory. The first store's mount shows on the
    host; the second takes it over; the first exits on SIGTERM and its namespace goes with it,
    and the host's mount still answers (the second serves it); the second's stop unmounts it on
    the host too."""
    base = private_tmpdir()
    hostpath = base / "hostpath"
    hostpath.mkdir()
    subprocess.run(["mount", "--bind", str(hostpath), str(hostpath)], check=True)
    stores: list[PodStore] = []
    loop = None
    try:
        subprocess.run(["mount", "--make-rshared", str(hostpath)], check=True)
        (base / "config.toml").write_text(CONFIG)

        def pod(name: str, *extra: str) -> PodStore:
            store = PodStore(root=hostpath / "root", mountpoint=hostpath / "store", config_path=base / "config.toml",
                             log_path=base / f"{name}.log", extra_args=list(extra), pid_namespace=pid_namespace)
            stores.append(store)
            store.start()
            return store

        old = pod("old")
        diff = old.layer_dir(f"{registry.host}/restart/files:esgz", restart_image.layers[0]["digest"]) / "diff"
        loop = FileLoop(_small_files(diff)).start()  # reads on the host, through the propagated mount
        assert wait_for_reads(loop, 20), loop.failures
        new = pod("new", "--takeover")
        assert wait_for(lambda: new.server_state(timeout=0).get("takeovers") == 1 or not new.running,
                        timeout=300, interval=0.02), new.log_tail()  # holder pids: 1 in both PID namespaces
        assert new.running, new.log_tail()
        assert old.stop(mount_stays=True) == 0
        assert "exiting; the mount stays" in old.log_tail()
        assert is_mounted(hostpath / "store")
        assert wait_for_reads(loop, 20), loop.failures
        loop.stop.set()
        loop.join(120)
        assert loop.failures == []
        assert new.stop() == 0
        assert not is_mounted(hostpath / "store"), "the unmount in the new store's namespace did not reach the host"
    finally:
        if loop is not None:
            loop.stop.set()
            loop.join(120)
        for store in reversed(stores):
            store.stop()
        if is_mounted(hostpath / "store"):
            lazy_unmount(hostpath / "store")
        subprocess.run(["umount", "-l", str(hostpath)], check=False)
        remove_tmpdir(base)


_FOREIGN_SUCCESSOR = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.__class__.__name__}))
    sys.exit(0)
try:
    s.sendall(json.dumps({"op": "succeed", "protocol": 1, "pid": 0, "mountpoint": sys.argv[2]}).encode() + b"\n")
    data, fds, _, _ = socket.recv_fds(s, 65536, 2)
except OSError:  # closed by the holder before or while we spoke
    data, fds = b"", []
print(json.dumps({"connect": "ok", "data": data.decode(), "fds": len(fds)}))
"""


def _as_nobody(sock_path, mountpoint) -> dict:
    import json
    import pwd
    nobody = pwd.getpwnam("nobody")
    out = subprocess.run(["/usr/bin/python3", "-I", "-c", _FOREIGN_SUCCESSOR, str(sock_path), str(mountpoint)],
                         user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/", capture_output=True,
                         text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_only_a_process_of_the_stores_own_uid_gets_the_mount(store_daemon_factory):
    """The socket is in the 0700 root; and should that be opened up, the holder still checks the
    peer's uid (`SO_PEERCRED`) and hands nothing to another user's process."""
    store = store_daemon_factory(CONFIG)
    sock_path = store.root / "holder.sock"
    assert wait_for(sock_path.exists, timeout=60), store.log_tail()
    assert _as_nobody(sock_path, store.mountpoint) == {"connect": "PermissionError"}
    opened = [store.root, store.root.parent, store.root.parent.parent]  # the root and the test's dirs above it
    modes = {path: os.stat(path).st_mode & 0o7777 for path in opened}
    for path in opened:
        os.chmod(path, 0o711)
    os.chmod(sock_path, 0o666)
    try:
        assert _as_nobody(sock_path, store.mountpoint) == {"connect": "ok", "data": "", "fds": 0}
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert _log_has(store, "refused a holder hand-over to a process of uid")
    assert os.listdir(store.mountpoint) is not None and store.running
    assert store.stop() == 0
    assert not is_mounted(store.mountpoint)
