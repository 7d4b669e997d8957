"""Backing files for passthrough: made only from bytes that verify, opened only while untouched."""
from __future__ import annotations

import hashlib
import os

import pytest

from stargz_store.cache.backing_files import BackingFileError, BackingFileStore

DATA = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def _pieces(data: bytes, size: int = 65536):
    return [data[i : i + size] for i in range(0, len(data), size)]


def _make(store: BackingFileStore, data: bytes = DATA, digest: str = DIGEST):
    return store.make(store.key_for(digest, (), len(data)), len(DATA), digest, _pieces(data))


def test_a_made_file_is_root_only_read_only_and_opens_checked(tmp_path):
    store = BackingFileStore(tmp_path / "files")
    made = _make(store)
    st = os.stat(made.path)
    assert (st.st_size, st.st_mode & 0o7777, st.st_nlink) == (len(DATA), 0o400, 1)
    assert os.stat(tmp_path / "files").st_mode & 0o777 == 0o700
    assert store.get(made.key) == made
    fd = store.open(made)
    assert fd is not None
    try:
        assert os.pread(fd, len(DATA) + 1, 0) == DATA
    finally:
        os.close(fd)


@pytest.mark.parametrize("data, digest, why", [
    (DATA[:-1] + b"\0", DIGEST, "do not hash"),
    (DATA[:-1], DIGEST, "bytes, expected"),
])
def test_bytes_that_do_not_verify_leave_nothing_behind(tmp_path, data, digest, why):
    store = BackingFileStore(tmp_path / "files")
    with pytest.raises(BackingFileError, match=why):
        store.make(store.key_for(digest, (), len(DATA)), len(DATA), digest, _pieces(data))
    assert [p for p in (tmp_path / "files").rglob("*") if p.is_file() and p.name != "records.log"] == []
    assert store.get(store.key_for(digest, (), len(DATA))) is None


@pytest.mark.parametrize("damage", ["write", "truncate", "chmod", "replace"])
def test_a_touched_file_is_refused_and_removed(tmp_path, damage):
    store = BackingFileStore(tmp_path / "files")
    made = _make(store)
    if damage == "write":
        os.chmod(made.path, 0o600)
        with open(made.path, "r+b") as f:
            f.write(b"x")
        os.chmod(made.path, 0o400)
    elif damage == "truncate":
        os.truncate(made.path, 10)
    elif damage == "chmod":
        os.chmod(made.path, 0o444)
    else:
        other = made.path + ".new"
        with open(other, "wb") as f:
            f.write(DATA)
        os.chmod(other, 0o400)
        os.replace(other, made.path)
    assert store.open(made) is None
    assert not os.path.exists(made.path)
    assert store.get(made.key) is None
    assert store.stats()["bad_files"] == 1


def test_records_outlive_the_process_but_not_the_boot(tmp_path, monkeypatch):
    store = BackingFileStore(tmp_path / "files")
    made = _make(store)
    again = BackingFileStore(tmp_path / "files")  # a restarted daemon
    fd = again.open(again.get(made.key))
    assert fd is not None
    os.close(fd)
    monkeypatch.setattr("stargz_store.cache.backing_files._boot_id", lambda: "another-boot")
    after_reboot = BackingFileStore(tmp_path / "files")  # data written without fsync may be lost
    assert after_reboot.get(made.key) is None
    assert not os.path.exists(made.path)


def test_a_file_without_a_toc_digest_is_keyed_by_its_chunks(tmp_path):
    store = BackingFileStore(tmp_path / "files")
    key = store.key_for("", ["sha256:" + "a" * 64, "sha256:" + "b" * 64], len(DATA))
    assert key.startswith("chunks-") and key != store.key_for("", ["sha256:" + "a" * 64], len(DATA))
    made = store.make(key, len(DATA), "", _pieces(DATA))
    fd = store.open(made)
    assert fd is not None
    os.close(fd)


def test_files_another_process_made_are_found(tmp_path):
    """The serving process after a restart or a crash was built before its predecessor made them."""
    waiting = BackingFileStore(tmp_path / "files")
    made = _make(BackingFileStore(tmp_path / "files"))
    found = waiting.get(made.key)
    assert found == made
    fd = waiting.open(found)
    assert fd is not None
    os.close(fd)
