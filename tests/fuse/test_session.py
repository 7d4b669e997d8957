"""The FUSE session against the real kernel: a mounted `MemFS`, read by real system calls."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stargz_store.fuse import MountSpec, Session, SessionOptions, abi, mount, unmount
from stargz_store.fuse.mount import is_dead_mount, mount_device
from tests.fixtures.store import private_tmpdir, remove_tmpdir
from tests.fixtures.waiting import wait_for

from .memfs import MemFS, Node, sample_tree

pytestmark = [pytest.mark.root]
NOBODY = 65534
CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir():
    base = private_tmpdir("stargz-fuse-test-")
    base.chmod(0o755)  # other users must be able to reach the mountpoint
    yield base
    remove_tmpdir(base)


class Mounted:
    def __init__(self, base: Path, fs: MemFS, options: SessionOptions) -> None:
        self.path = base / "mnt"
        self.path.mkdir()
        self.fs = fs
        self.fd = mount(MountSpec(str(self.path)))
        self.session = Session(self.fd, fs, options)
        self.thread = threading.Thread(target=self.session.serve, daemon=True)
        self.thread.start()
        assert self.session.initialized.wait(10)

    def close(self) -> None:
        if mount_device(str(self.path)) is not None:
            unmount(str(self.path), lazy=True)
        assert self.session.wait_stopped(10), "the session did not end after the unmount"
        os.close(self.fd)


@pytest.fixture
def mounted(workdir):
    made: list[Mounted] = []

    def make(fs: MemFS | None = None, **options) -> Mounted:
        m = Mounted(workdir, fs or MemFS(sample_tree()), SessionOptions(**options))
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def as_nobody(code: str) -> subprocess.CompletedProcess:
    def drop() -> None:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)

    # Debian's interpreter: ours may live under root's home, which other users cannot enter.
    return subprocess.run(["/usr/bin/python3", "-c", code], preexec_fn=drop, capture_output=True, text=True,
                          timeout=30, cwd="/")


def test_files_directories_symlinks_and_xattrs_through_the_kernel(mounted):
    m = mounted()
    assert (m.path / "hello").read_bytes() == b"hello world\n"
    assert sorted(os.listdir(m.path)) == ["d0", "d1", "d2", "hello", "link", "opaque", "private", "secret", "slow"]
    assert os.readlink(m.path / "link") == "hello"
    assert (m.path / "link").read_bytes() == b"hello world\n"
    st = os.stat(m.path / "d1" / "f07")
    assert (st.st_size, st.st_mtime_ns) == (len(b"file 1/7\n"), 1_700_000_000_123_456_789)
    assert os.getxattr(m.path / "opaque", "user.overlay.opaque") == b"y"
    assert os.listxattr(m.path / "opaque") == ["user.overlay.opaque"]
    with pytest.raises(OSError) as e:
        os.getxattr(m.path / "hello", "user.nothing")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "missing")
    assert os.statvfs(m.path).f_namemax == 255


def test_writes_are_refused_and_notifications_reach_the_operations(mounted):
    m = mounted()
    for attempt in (lambda: os.mkdir(m.path / "new"), lambda: os.unlink(m.path / "hello"),
                    lambda: os.rename(m.path / "hello", m.path / "bye"), lambda: os.chmod(m.path / "hello", 0o777),
                    lambda: os.setxattr(m.path / "hello", "user.x", b"1"), lambda: os.symlink("x", m.path / "sym")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):  # containers/storage's "use" notification
        open(m.path / "d0" / "use", "w")
    assert m.fs.created == [b"use"]
    with pytest.raises(FileNotFoundError):  # ... and its "release"
        os.rmdir(m.path / "d0")
    assert m.fs.removed == [b"d0"]


def test_a_listing_brings_attributes_so_opening_every_file_sends_no_lookup(mounted):
    m = mounted()
    names = os.listdir(m.path / "d2")
    lookups = m.fs.calls.get("lookup", 0)
    for name in names:
        os.stat(m.path / "d2" / name)
        (m.path / "d2" / name).read_bytes()
    assert m.fs.calls.get("lookup", 0) == lookups
    assert m.fs.calls["read"] >= len(names)


def test_the_kernel_enforces_modes_for_other_users(mounted):
    m = mounted()
    readable = as_nobody(f"print(open({str(m.path / 'hello')!r}).read(), end='')")
    assert (readable.returncode, readable.stdout) == (0, "hello world\n"), readable.stderr
    for path in (m.path / "secret", m.path / "private" / "inner"):
        denied = as_nobody(f"open({str(path)!r}).read()")
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stderr
    assert m.fs.calls.get("read", 0) == 1  # the refused opens never reached the filesystem


def test_a_blocked_read_does_not_hold_up_other_requests(mounted):
    fs = MemFS(sample_tree())
    fs.read_gate = threading.Event()
    m = mounted(fs)
    result: dict[str, bytes] = {}
    slow = threading.Thread(target=lambda: result.setdefault("slow", (m.path / "slow").read_bytes()))
    slow.start()
    try:
        for i in range(20):  # served by other workers while one waits
            assert (m.path / "d0" / f"f{i:02d}").read_bytes() == f"file 0/{i}\n".encode()
        assert "slow" not in result
    finally:
        fs.read_gate.set()
        slow.join(10)
    assert result["slow"] == b"slow"


def test_an_unmount_ends_the_session(workdir):
    mnt = workdir / "mnt"
    mnt.mkdir()
    fd = mount(MountSpec(str(mnt)))
    session = Session(fd, MemFS(sample_tree()))
    thread = threading.Thread(target=session.serve, daemon=True)
    thread.start()
    assert session.initialized.wait(10)
    assert (mnt / "hello").read_bytes() == b"hello world\n"
    unmount(str(mnt))
    assert session.wait_stopped(10)
    thread.join(5)
    assert not thread.is_alive()
    os.close(fd)
    assert mount_device(str(mnt)) is None


def _passthrough_mount(mounted, workdir: Path, payload: bytes, **options) -> tuple[Mounted, MemFS, Path]:
    """A MemFS whose `big` is backed by a file of `payload`, mounted with passthrough on
    (skips where the kernel does not offer it)."""
    backing = workdir / "backing.bin"
    backing.write_bytes(payload)
    fs = MemFS(sample_tree(str(backing)), passthrough=True)
    m = mounted(fs, passthrough=True, **options)
    if not m.session.state.passthrough:
        pytest.skip("this kernel does not offer FUSE passthrough (Linux 6.9+)")
    return m, fs, backing


def test_passthrough_serves_reads_from_the_backing_file(mounted, workdir):
    payload = os.urandom(3 << 20)
    m, fs, _ = _passthrough_mount(mounted, workdir, payload)
    assert (m.path / "big").read_bytes() == payload
    assert (m.path / "big").read_bytes() == payload  # a second open reuses nothing stale
    assert fs.calls.get("read", 0) == 0, "the kernel read the backing file, not the store"
    assert fs.calls["open"] == 2


def _context_switches(tids: list[int]) -> int:
    """Voluntary context switches of the threads `tids`: each wake-up and wait again is one; a
    preemption by other work on a busy machine (nonvoluntary) is not the store's doing."""
    total = 0
    for tid in tids:
        with open(f"/proc/self/task/{tid}/status") as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return total


def test_one_idle_worker_is_woken_per_request(mounted):
    """Idle workers all wait on the one descriptor; a request must wake one of them, not all
    (each woken worker is a context switch, six per request in a warm walk before)."""
    m = mounted(min_threads=8)
    assert wait_for(lambda: sum(t.name.startswith("fuse-") for t in threading.enumerate()) >= 8, timeout=10)
    tids = [t.native_id for t in threading.enumerate() if t.name.startswith("fuse-")]
    fd = os.open(m.path / "hello", os.O_RDONLY)
    try:
        assert not os.isatty(fd)  # an IOCTL, answered ENOTTY
        before = _context_switches(tids)
        for _ in range(200):
            assert not os.isatty(fd)
        per_request = (_context_switches(tids) - before) / 200
    finally:
        os.close(fd)
    assert per_request < 3, f"{per_request:.1f} context switches of the workers per request"


def _fds_on(path: Path) -> int:
    """Descriptors of this process open on `path`."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == str(path)
        except OSError:
            pass
    return count


def test_a_reopen_uses_the_registration_kept_after_the_last_release(mounted, workdir):
    """A file opened again after its last close is answered with the backing id kept from its
    first open: the filesystem is not asked for its backing file again, the kernel still reads it."""
    payload = os.urandom(1 << 20)
    m, fs, backing = _passthrough_mount(mounted, workdir, payload, passthrough_keep=8)
    for _ in range(3):
        assert (m.path / "big").read_bytes() == payload
        # RELEASE is async: the next open must come after it (else it joins the open file's id)
        assert wait_for(lambda: m.session.passthrough_stats()["passthrough_inodes"] == 0, timeout=10)
    stats = m.session.passthrough_stats()
    assert fs.calls["open"] == 3 and fs.calls["backing_opened"] == 1
    assert (stats["passthrough_opens"], stats["kept_reopens"], stats["kept_backing"]) == (1, 2, 1)
    assert fs.calls.get("read", 0) == 0, "the kernel read the backing file, not the store"
    assert _fds_on(backing) == 1  # the kept registration's descriptor
    m.session.stop()
    assert m.session.wait_stopped(10)
    assert _fds_on(backing) == 0 and m.session.passthrough_stats()["kept_backing"] == 0


def test_a_kept_registration_whose_file_changed_is_not_used(mounted, workdir):
    """The copy is checked at every open: one changed since (times, mode, or its name removed)
    is let go of, and the open asks the filesystem for its backing file again."""
    m, fs, backing = _passthrough_mount(mounted, workdir, b"x" * 8192, passthrough_keep=8)
    released = lambda: m.session.passthrough_stats()["passthrough_inodes"] == 0  # noqa: E731
    for change in (lambda: os.utime(backing, ns=(1, 1)), lambda: backing.chmod(0o600),
                   lambda: os.link(backing, workdir / "second-name")):
        assert (m.path / "big").read_bytes() == b"x" * 8192
        wait_for(released, timeout=10)
        assert m.session.passthrough_stats()["kept_backing"] == 1
        before = fs.calls["backing_opened"]
        change()
        assert (m.path / "big").read_bytes() == b"x" * 8192
        assert fs.calls["backing_opened"] == before + 1
        wait_for(released, timeout=10)
    assert m.session.passthrough_stats()["kept_reopens"] == 2  # the opens before each change


def test_kept_registrations_are_bounded(mounted, workdir):
    """Beyond `passthrough_keep` the oldest kept registration is let go of (and its descriptor)."""
    nodes = sample_tree()
    paths = []
    for i in range(4):
        path = workdir / f"backing{i}.bin"
        path.write_bytes(bytes([i]) * 4096)
        paths.append(path)
        ino = 9000 + i
        nodes[ino] = Node(ino, stat.S_IFREG | 0o644, size=4096, backing=str(path))
        nodes[1].children[f"b{i}".encode()] = ino
    fs = MemFS(nodes, passthrough=True)
    m = mounted(fs, passthrough=True, passthrough_keep=2)
    if not m.session.state.passthrough:
        pytest.skip("this kernel does not offer FUSE passthrough (Linux 6.9+)")
    for i in range(4):
        assert (m.path / f"b{i}").read_bytes() == bytes([i]) * 4096
        wait_for(lambda: m.session.passthrough_stats()["passthrough_inodes"] == 0, timeout=10)
    assert m.session.passthrough_stats()["kept_backing"] == 2
    assert [_fds_on(p) for p in paths] == [0, 0, 1, 1]
    assert (m.path / "b3").read_bytes() == bytes([3]) * 4096
    assert (m.path / "b0").read_bytes() == bytes([0]) * 4096
    assert fs.calls["backing_opened"] == 5  # b0 again, b3 from what was kept


def _start_server(fd: int, mode: str, state: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.fuse.memfs", str(fd), mode] + ([state] if state else [])
    return subprocess.Popen(args, pass_fds=[fd], stdout=subprocess.PIPE, text=True, cwd=CHECKOUT)


def _event(proc: subprocess.Popen, name: str) -> dict:
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == name:
            return event
    raise AssertionError(f"server ended without {name!r}")


def test_a_new_process_resumes_the_mount_and_answers_what_a_dead_one_had_read(workdir):
    """The holder (this test) keeps the descriptor; server A dies holding a READ; server B, given
    only the descriptor and A's negotiated state, serves the mount and the READ is answered."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    fd = mount(MountSpec(str(mnt)))
    os.set_inheritable(fd, True)
    servers: list[subprocess.Popen] = []
    reader = None
    try:
        first = _start_server(fd, "crash-on-read")
        servers.append(first)
        state = _event(first, "init")["state"]  # the kernel queues INIT when the mount is made
        assert (mnt / "hello").read_bytes() == b"hello world\n"
        # A process of its own: this one must hold no file of the mount while it starts servers
        # (a child closing an inherited FUSE file would wait for a server that is not there yet).
        reader = subprocess.Popen(["cat", str(mnt / "slow")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _event(first, "dying")
        assert first.wait(10) == 9
        second = _start_server(fd, "resume", state)
        servers.append(second)
        resumed = _event(second, "resumed")
        out, err = reader.communicate(timeout=20)
        if not resumed["resend"]:
            pytest.skip("kernel without FUSE_NOTIFY_RESEND (Linux < 6.9)")
        assert (reader.returncode, out, err) == (0, b"slow", b"")
        assert not is_dead_mount(mnt)  # the holder kept the connection through A's death
        assert (mnt / "d1" / "f03").read_bytes() == b"file 1/3\n"  # B serves new requests too
    finally:
        unmount(str(mnt), lazy=True)  # first: a mount nobody serves would hang whoever touches it
        os.close(fd)
        for proc in servers + ([reader] if reader else []):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_mount_whose_every_holder_is_gone_is_dead_and_can_be_detached(workdir):
    mnt = workdir / "mnt"
    mnt.mkdir()
    fd = mount(MountSpec(str(mnt)))
    os.close(fd)  # no server, no holder: the kernel aborts the connection
    deadline = time.monotonic() + 5
    while not is_dead_mount(mnt) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert is_dead_mount(mnt)
    unmount(str(mnt), lazy=True)
    assert mount_device(str(mnt)) is None


def test_no_open_the_kernel_asks_for_the_first_open_only(mounted):
    """With `no_open` the first OPEN is declined (ENOSYS, after the filesystem had its say): the
    kernel then opens every file without asking and reads name the node, with no handle."""
    m = mounted(no_open=True)
    if not m.session.state.no_open:
        pytest.skip("this kernel does not offer FUSE no_open")
    for _ in range(3):
        assert (m.path / "hello").read_bytes() == b"hello world\n"
    assert (m.path / "d0" / "f01").read_bytes() == b"file 0/1\n"
    assert m.fs.calls["open"] == 1 and m.fs.calls["release"] == 1  # the declined one, released at once
    assert m.fs.calls["read"] >= 2


def test_times_before_1970_reach_the_kernel(workdir, mounted):
    nodes = sample_tree()
    old = dataclasses.replace(nodes[2], mtime_ns=-86_400_000_000_000 + 5)  # "hello": a day before the epoch
    nodes[2] = old
    m = mounted(MemFS(nodes))
    assert os.stat(m.path / "hello").st_mtime_ns == old.mtime_ns
    assert os.listdir(m.path)  # a listing with full attributes carries it too


def test_a_directory_that_may_change_is_listed_afresh(mounted):
    """`opendir` without keep_cache: a name added later is in the next listing (the store's own
    directories); with it, the kernel may serve the next listing from its cache."""
    fs = MemFS(sample_tree())
    fs.cache_listings = False
    m = mounted(fs)
    assert "late" not in os.listdir(m.path / "d0")
    d0 = fs.nodes[abi.ROOT_ID].children[b"d0"]
    fs.nodes[9000] = Node(9000, stat.S_IFREG | 0o644, size=1, data=b"x")
    fs.nodes[d0].children[b"late"] = 9000
    assert "late" in os.listdir(m.path / "d0")


def test_an_invalidated_entry_is_forgotten_by_the_kernel(mounted):
    """`notify_inval_entry` (sent from outside any request: the kernel holds the parent locked
    while it waits for an answer) makes the kernel drop the name and FORGET its node."""
    m = mounted()
    hello = m.fs.nodes[abi.ROOT_ID].children[b"hello"]
    os.stat(m.path / "hello")
    assert m.fs.forgotten.get(hello, 0) == 0
    m.session.notify_inval_entry(abi.ROOT_ID, b"hello")
    assert wait_for(lambda: m.fs.forgotten.get(hello, 0) == 1)
    lookups = m.fs.calls["lookup"]
    os.stat(m.path / "hello")  # looked up anew
    assert m.fs.calls["lookup"] == lookups + 1


def test_an_open_still_being_answered_at_a_hand_over_is_left_to_the_next_server(mounted, workdir):
    """A hand-over that cannot wait for an OPEN any longer hands its open-file table over without
    it: the OPEN must then be counted and answered by the next server (the kernel sends it again),
    not by this one, or the next server's table misses an open file and answers a second open of
    the same inode with another backing id (the kernel refuses that: EIO)."""
    payload = os.urandom(1 << 20)
    m, fs, _ = _passthrough_mount(mounted, workdir, payload)
    old = m.session
    fs.open_gate = threading.Event()
    opened: dict[str, object] = {}

    def first_open() -> None:
        try:
            opened["fd"] = os.open(m.path / "big", os.O_RDONLY)
        except OSError as e:
            opened["error"] = e

    opener = threading.Thread(target=first_open, daemon=True)
    opener.start()
    assert fs.open_entered.wait(10)
    old.stop()
    assert not old.wait_answered(0.2, but={abi.READ})  # the OPEN is still being answered
    files = old.hand_over_open_files()
    assert files["backing"] == []
    fs.open_gate.set()  # the OPEN goes on in the old server, which must leave it unanswered
    assert old.wait_stopped(10)
    # The old session's worker is done with the OPEN: it must not have counted it (an event, not
    # a wait: whether the opener has been woken yet depends on the load).
    assert old.passthrough_stats()["passthrough_inodes"] == 0
    opener.join(0.5)
    answered_by_old = not opener.is_alive()

    new = Session(m.fd, fs, SessionOptions(passthrough=True), state=old.state)
    new.adopt_open_files(files)
    m.session = new
    m.thread = threading.Thread(target=new.serve, daemon=True)
    m.thread.start()
    if not new.notify_resend():
        pytest.skip("kernel without FUSE_NOTIFY_RESEND (Linux < 6.9)")
    opener.join(10)
    assert "fd" in opened, opened
    fd = opened["fd"]
    try:  # (closing needs a server: FLUSH)
        assert not answered_by_old, "answered by the server that had handed its table over"
        assert new.passthrough_stats()["passthrough_inodes"] == 1
        assert (m.path / "big").read_bytes() == payload  # a second open: the same backing id
        assert os.pread(fd, 4096, 0) == payload[:4096]
    finally:
        os.close(fd)
    assert wait_for(lambda: new.passthrough_stats()["passthrough_inodes"] == 0, timeout=10)
