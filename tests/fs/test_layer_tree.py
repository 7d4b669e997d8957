"""The overlay view of a TOC, on small hand-written TOCs (no blob needed: no data is read)."""
from __future__ import annotations

import base64
import os
import stat

import pytest

from stargz_store.formats.toc import build_toc
from stargz_store.fs.errors import EntryNotFound, NoSuchAttribute, NotADirectory
from stargz_store.fs.layer_tree import LayerTree

T = "2023-11-14T22:13:20Z"  # 1700000000
BASE = 7 << 32


def toc_of(*entries: dict):
    return build_toc(list(entries), data_end=1 << 20)


@pytest.fixture
def tree() -> LayerTree:
    toc = toc_of(
        {"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": 10, "chunkDigest": "sha256:" + "1" * 64},
        {"name": "./", "type": "dir", "mode": 0o755, "modtime": T},
        {"name": "./etc/", "type": "dir", "mode": 0o755, "modtime": T},
        {"name": "./etc/passwd", "type": "reg", "mode": 0o644, "size": 5, "offset": 100,
         "chunkDigest": "sha256:" + "2" * 64, "uid": 1, "gid": 2, "modtime": T,
         "xattrs": {"user.k": base64.b64encode(b"v\x00w").decode()}},
        {"name": "./etc/.wh.shadow", "type": "reg", "mode": 0o644, "modtime": "2023-11-14T22:13:21Z"},
        {"name": "./etc/.wh.passwd", "type": "reg", "mode": 0o644, "modtime": T},
        {"name": "./etc/link", "type": "hardlink", "linkName": "./etc/passwd"},
        {"name": "./opq/", "type": "dir", "mode": 0o700, "modtime": T},
        {"name": "./opq/.wh..wh..opq", "type": "reg", "mode": 0o644, "modtime": T},
        {"name": "./opq/new", "type": "symlink", "linkName": "../etc/passwd", "mode": 0o777, "modtime": T},
        {"name": "./dev/", "type": "dir", "mode": 0o755, "modtime": T},
        {"name": "./dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666, "modtime": T},
        {"name": "./dev/sda", "type": "block", "devMajor": 8, "mode": 0o660, "modtime": T},
        {"name": "./dev/fifo", "type": "fifo", "mode": 0o600, "modtime": T},
    )
    return LayerTree(toc, BASE)


def names(tree: LayerTree, path: str) -> list[str]:
    return [n for n, _ in tree.listdir(path)]


def test_root_hides_landmarks(tree):
    assert names(tree, "") == ["dev", "etc", "opq"]
    with pytest.raises(EntryNotFound):
        tree.lookup(".no.prefetch.landmark")


def test_whiteout_becomes_char_device_unless_name_exists(tree):
    # .wh.passwd is shadowed by the real passwd in the same layer; .wh.shadow becomes "shadow".
    assert names(tree, "etc") == ["link", "passwd", "shadow"]
    node = tree.lookup("etc/shadow")
    attr = tree.attr(node)
    assert stat.S_ISCHR(attr.mode) and stat.S_IMODE(attr.mode) == 0
    assert attr.rdev == 0 and attr.uid == 0 and attr.gid == 0 and attr.size == 0 and attr.nlink == 1
    assert attr.mtime_ns == 1700000001 * 10**9
    assert not stat.S_ISCHR(tree.attr(tree.lookup("etc/passwd")).mode)
    for hidden in ("etc/.wh.shadow", "etc/.wh.passwd", "opq/.wh..wh..opq"):
        with pytest.raises(EntryNotFound):
            tree.lookup(hidden)


def test_opaque_directory_xattrs(tree):
    opq = tree.lookup("opq")
    assert names(tree, "opq") == ["new"]
    assert tree.getxattr(opq, "trusted.overlay.opaque") == b"y"
    assert tree.getxattr(opq, "user.overlay.opaque") == b"y"
    assert set(tree.xattrs(opq)) == {"trusted.overlay.opaque", "user.overlay.opaque"}
    with pytest.raises(NoSuchAttribute):
        tree.getxattr(tree.lookup("etc"), "trusted.overlay.opaque")


def test_attributes_and_hardlinks(tree):
    passwd, link = tree.attr(tree.lookup("etc/passwd")), tree.attr(tree.lookup("etc/link"))
    assert passwd == link and passwd.nlink == 2
    assert passwd.ino > BASE and passwd.size == 5 and passwd.blocks == 8
    assert stat.S_IMODE(passwd.mode) == 0o644 and (passwd.uid, passwd.gid) == (1, 2)
    assert passwd.mtime_ns == 1700000000 * 10**9
    assert tree.getxattr(tree.lookup("etc/passwd"), "user.k") == b"v\x00w"
    sym = tree.attr(tree.lookup("opq/new"))
    assert stat.S_ISLNK(sym.mode) and sym.size == len("../etc/passwd")
    null, sda, fifo = (tree.attr(tree.lookup(p)) for p in ("dev/null", "dev/sda", "dev/fifo"))
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_IMODE(fifo.mode) == 0o600
    root = tree.attr(tree.lookup(""))
    assert stat.S_ISDIR(root.mode) and root.nlink == 2 + 3


def test_inode_numbers_are_distinct_and_stable(tree):
    paths = ["", "etc", "etc/passwd", "etc/shadow", "opq", "opq/new", "dev/null", "dev/sda", "dev/fifo"]
    inos = [tree.attr(tree.lookup(p)).ino for p in paths]
    assert len(set(inos)) == len(inos)
    again = LayerTree(tree.toc, BASE)
    assert inos == [again.attr(again.lookup(p)).ino for p in paths]
    listed = {n: a for n, a in ((n, tree.attr(node)) for n, node in tree.listdir("etc"))}
    assert listed["shadow"].ino == tree.attr(tree.lookup("etc/shadow")).ino


def test_bad_paths(tree):
    with pytest.raises(NotADirectory):
        tree.lookup("etc/passwd/x")
    with pytest.raises(EntryNotFound):
        tree.lookup("nope/x")
    with pytest.raises(EntryNotFound):
        tree.lookup("etc/nothing")
    with pytest.raises(NotADirectory):
        tree.listdir("etc/passwd")


def test_listing_cache_is_bounded(tree):
    small = LayerTree(tree.toc, BASE, listing_cache_entries=4)
    for path in ("", "etc", "dev", "opq", "etc"):
        assert small.listdir(path) == tree.listdir(path)
        assert small._cached_entries <= 4
