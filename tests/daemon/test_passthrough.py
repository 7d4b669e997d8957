"""FUSE passthrough of fully cached files, through the real daemon on a real mount (issue 13.5).

A file whose every chunk is cached gets a backing file (made from verified chunks, checked against
the TOC's file digest); its next open is answered with it and the kernel reads it without asking
the store: the store's READ count (`fs.read_requests` in stats.json) stays still while the bytes
read are right. The FUSE inode's page cache is dropped first (`POSIX_FADV_DONTNEED`), so a read
the store did not see cannot have come from there.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from stargz_store.fuse import passthrough_permitted
from tests.fixtures.restart_load import BIG_FILE, BIG_SIZE, RESTART_CONFIG, big_file_data, small_file_data, small_file_name
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.root]


@pytest.fixture
def image(restart_image):
    return restart_image


@pytest.fixture
def store(store_daemon_factory, image):
    if not passthrough_permitted():
        pytest.skip("FUSE passthrough needs CAP_SYS_ADMIN in the initial user namespace")
    return store_daemon_factory(RESTART_CONFIG.replace("[store]\n", "[store]\npassthrough = true\n"))


def _diff(store, registry, image) -> Path:
    return store.layer_dir(f"{registry.host}/restart/files:esgz", image.layers[0]["digest"]) / "diff"


def _read(path: Path, offset: int = 0, size: int = -1) -> bytes:
    """Read through a fresh open, the FUSE page cache of the file dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size - offset if size < 0 else size
        parts = []
        while size > 0:
            piece = os.pread(fd, min(size, 1 << 20), offset)
            if not piece:
                break
            parts.append(piece)
            offset += len(piece)
            size -= len(piece)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return b"".join(parts)
    finally:
        os.close(fd)


def _fs(store) -> dict:
    return store.stats()["fs"]


def _made(store) -> int:
    return store.stats().get("backing_files", {}).get("made", 0)


def _settled(store) -> bool:
    """Every RELEASE answered (the kernel sends them after close returns)."""
    fs = _fs(store)
    return fs["passthrough_inodes"] == 0 and fs["cached_inodes"] == 0


def _backing_files(store) -> list[Path]:
    files = store.root / "cache" / "files"
    return [p for p in files.glob("*/*") if p.is_file() and not p.name.startswith(".")]


def _read_after_damage(store, backing: Path, offset: int, path: Path, expected: bytes) -> tuple[dict, dict]:
    """Write into `backing` at `offset` (root may; the store must notice), then read `path`: the
    damage is seen at open and the file served by verified chunks. The `fs` stats around the read."""
    with open(backing, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 16)
    assert wait_for(lambda: _settled(store), timeout=60)
    before = _fs(store)
    assert _read(path) == expected
    after = _fs(store)
    assert after["read_requests"] > before["read_requests"]
    return before, after


def test_a_fully_cached_file_is_read_by_the_kernel_from_its_backing_file(store, registry, image):
    big = _diff(store, registry, image) / BIG_FILE
    expected = big_file_data()
    assert _read(big) == expected  # cold: every chunk fetched, served by the store
    assert wait_for(lambda: _made(store) == 1, timeout=120), store.stats().get("backing_files")
    (backing,) = _backing_files(store)
    st = backing.stat()
    assert (st.st_size, st.st_mode & 0o7777, st.st_uid) == (BIG_SIZE, 0o400, 0)
    assert (backing.parent.parent.stat().st_mode & 0o777) == 0o700
    assert wait_for(lambda: _settled(store), timeout=60)
    before = _fs(store)
    assert _read(big) == expected
    after = _fs(store)
    assert after["read_requests"] == before["read_requests"], "the store was asked: not passthrough"
    assert after["passthrough_opens"] == before["passthrough_opens"] + 1
    # a small file read whole once has one too, and is read by the kernel alike
    small = _diff(store, registry, image) / small_file_name(7)
    assert _read(small) == small_file_data(7)
    assert wait_for(lambda: _made(store) == 2, timeout=60)
    before = _fs(store)
    assert _read(small) == small_file_data(7)
    assert _fs(store)["read_requests"] == before["read_requests"]


def test_a_partly_cached_file_is_served_by_the_store(store, registry, image):
    big = _diff(store, registry, image) / BIG_FILE
    assert _read(big, 0, 1 << 20) == big_file_data()[: 1 << 20]
    assert wait_for(lambda: store.stats()["backing_files"]["incomplete"] >= 1, timeout=60)
    assert _made(store) == 0
    assert wait_for(lambda: _settled(store), timeout=60)
    before = _fs(store)
    assert _read(big, 0, 1 << 20) == big_file_data()[: 1 << 20]
    after = _fs(store)
    assert after["read_requests"] > before["read_requests"]
    assert after["passthrough_opens"] == 0


def test_a_file_open_through_the_store_keeps_its_mode_until_closed(store, registry, image):
    """An open file served by the store (the kernel's page cache) while its backing file is made:
    further opens must not ask for passthrough (the kernel fails them: ETXTBSY, then EIO) until it
    is closed; afterwards they do."""
    big = _diff(store, registry, image) / BIG_FILE
    expected = big_file_data()
    held = os.open(big, os.O_RDONLY)
    try:
        assert os.pread(held, 1 << 20, 0) == expected[: 1 << 20]
        assert _read(big) == expected  # completes the cache
        assert wait_for(lambda: _made(store) == 1, timeout=120)
        assert _read(big, BIG_SIZE - 4096) == expected[-4096:]  # an open while `held` is open
        assert _fs(store)["passthrough_opens"] == 0
    finally:
        os.close(held)
    assert wait_for(lambda: _settled(store), timeout=60)
    before = _fs(store)
    assert _read(big) == expected
    assert _fs(store)["read_requests"] == before["read_requests"]
    assert _fs(store)["passthrough_opens"] == 1


def test_a_damaged_backing_file_is_detected_at_open_and_made_again(store, registry, image):
    big = _diff(store, registry, image) / BIG_FILE
    expected = big_file_data()
    assert _read(big) == expected
    assert wait_for(lambda: _made(store) == 1, timeout=120)
    (backing,) = _backing_files(store)
    before, after = _read_after_damage(store, backing, BIG_SIZE // 2, big, expected)
    assert after["passthrough_opens"] == before["passthrough_opens"]
    stats = store.stats()["backing_files"]
    assert stats["bad_files"] == 1
    assert wait_for(lambda: _made(store) == 2, timeout=120)  # made again from the chunks
    assert wait_for(lambda: _settled(store), timeout=60)
    before = _fs(store)
    assert _read(big) == expected
    after = _fs(store)
    assert after["read_requests"] == before["read_requests"]
    assert after["passthrough_opens"] == before["passthrough_opens"] + 1


def test_a_reopen_uses_the_kept_registration_and_a_copy_changed_meanwhile_is_still_caught(store, registry, image):
    """After a file's last close its backing id stays registered (`passthrough_keep_files`): the
    re-open checks the kept descriptor and opens nothing by path. A copy written to while kept
    is caught at the next open all the same: served by verified chunks, then made again."""
    small = _diff(store, registry, image) / small_file_name(3)
    expected = small_file_data(3)
    assert _read(small) == expected
    assert wait_for(lambda: _made(store) == 1, timeout=120)
    assert wait_for(lambda: _settled(store), timeout=60)
    assert _read(small) == expected  # the first open by passthrough: the copy opened by path
    assert wait_for(lambda: _settled(store), timeout=60)
    before, opened = _fs(store), store.stats()["backing_files"]["opened"]
    assert _read(small) == expected
    after = _fs(store)
    assert after["read_requests"] == before["read_requests"], "the store was asked: not passthrough"
    assert after["kept_reopens"] == before["kept_reopens"] + 1
    assert after["passthrough_opens"] == before["passthrough_opens"]  # no new backing id
    assert store.stats()["backing_files"]["opened"] == opened  # the copy was not opened by path
    (backing,) = _backing_files(store)
    before, after = _read_after_damage(store, backing, 0, small, expected)
    assert after["kept_reopens"] == before["kept_reopens"]
    assert store.stats()["backing_files"]["bad_files"] == 1
    assert wait_for(lambda: _made(store) == 2, timeout=120)  # made again from the chunks


def test_with_passthrough_off_every_read_goes_through_the_store(store_daemon_factory, registry, image):
    store = store_daemon_factory(RESTART_CONFIG.replace("[store]\n", "[store]\npassthrough = false\n"))
    big = _diff(store, registry, image) / BIG_FILE
    expected = big_file_data()
    assert _read(big) == expected
    assert _read(big) == expected
    stats = store.stats()
    assert "backing_files" not in stats
    assert stats["fs"]["passthrough_opens"] == 0
    before = stats["fs"]["read_requests"]
    assert _read(big, 0, 1 << 20) == expected[: 1 << 20]
    assert _fs(store)["read_requests"] > before
    assert not (store.root / "cache" / "files").exists()
    assert "passthrough off" in store.log_path.read_text(errors="replace")


def _replace_server(store, how: str) -> None:
    if how == "restart":
        old = store.server_state()["server_pid"]
        assert store.restart()["server_pid"] != old
    else:
        generation = store.server_state()["generation"]
        killed = store.kill_server()
        assert store.wait_generation(generation)["server_pid"] != killed


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_files_open_by_passthrough_stay_usable_when_the_server_is_replaced(store, registry, image, how):
    """Backing ids belong to the FUSE connection: the next serving process must answer further
    opens of an inode with the id its predecessor registered (another id is EBUSY, a cached open
    EIO), and let go of it when the last of those files is closed. A stopping process hands its
    open files over; after a crash, the successor replays the dead one's journal."""
    big = _diff(store, registry, image) / BIG_FILE
    expected = big_file_data()
    assert _read(big) == expected
    assert wait_for(lambda: _made(store) == 1, timeout=120)
    assert wait_for(lambda: _settled(store), timeout=60)
    first = os.open(big, os.O_RDONLY)
    try:
        assert os.pread(first, 4096, 0) == expected[:4096]
        assert _fs(store)["passthrough_inodes"] == 1
        _replace_server(store, how)
        assert _fs(store)["passthrough_inodes"] == 1  # handed over, or replayed
        assert os.pread(first, 4096, BIG_SIZE - 4096) == expected[-4096:]
        try:
            second = os.open(big, os.O_RDONLY)
        except OSError as e:
            pytest.fail(f"a second open after the {how} failed: {errno.errorcode.get(e.errno)}")
        try:
            assert os.pread(second, 1 << 20, 1 << 20) == expected[1 << 20 : 2 << 20]
        finally:
            os.close(second)
    finally:
        os.close(first)
    assert wait_for(lambda: _settled(store), timeout=60)  # the last release let go of the id
    before = _fs(store)
    assert _read(big) == expected
    after = _fs(store)
    assert after["read_requests"] == before["read_requests"]
    assert after["passthrough_opens"] == before["passthrough_opens"] + 1
    assert store.stop() == 0
