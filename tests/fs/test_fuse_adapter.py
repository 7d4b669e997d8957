"""The FUSE adapter only translates: errors to errno (one table), attributes to the kernel's stat."""
from __future__ import annotations

import base64
import errno
import os
import stat

import pytest

from stargz_store import fuse
from stargz_store.fs import errors
from stargz_store.fs.attrs import Attr
from stargz_store.fs.caller import Caller
from stargz_store.fs.fuse_adapter import ERRNO, StoreOperations, errno_of
from stargz_store.fs.inodes import ROOT_ID
from stargz_store.fs.model import StoreModel
from stargz_store.fs.provider import ImageFiles, ServedLayer
from stargz_store.fuse import abi

ROOT_CTX = fuse.Context(0, 0, 1)
USER_CTX = fuse.Context(1000, 1000, 2)
REF = base64.b64encode(b"example.com/a:b")
KEY = ("sha256:" + "a" * 64).encode()


def test_every_model_error_has_its_errno():
    subclasses = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FsError)]
    for cls in subclasses:
        if cls is not errors.FsError:
            assert cls in ERRNO, f"{cls.__name__} has no errno"
    assert errno_of(errors.EntryNotFound("x")) == errno.ENOENT
    assert errno_of(errors.InvalidName("x")) == errno.EINVAL
    assert errno_of(errors.LayerUnavailable("x")) == errno.EIO
    assert errno_of(errors.ReadOnly("x")) == errno.EROFS
    assert errno_of(errors.NoSuchAttribute("x")) == errno.ENODATA
    assert errno_of(errors.PermissionDenied("x")) == errno.EACCES
    assert errno_of(errors.StaleNode("x")) == errno.ESTALE


def test_stat_fields_reach_the_kernel_as_the_model_says():
    """The adapter hands `Attr` through; the session packs it into the kernel's `fuse_attr`."""
    attr = Attr(ino=5, mode=stat.S_IFREG | 0o644, nlink=2, uid=3, gid=4, size=4097, mtime_ns=1_700_000_000_123_456_789,
                rdev=0x0103)
    r, w = os.pipe()
    try:
        packed = fuse.Session(r, StoreOperations(StoreModel(_Provider())))._attr(attr)
    finally:
        os.close(r)
        os.close(w)
    (ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
     mode, nlink, uid, gid, rdev, blksize, _) = abi.ATTR.unpack(packed)
    assert (ino, mode, nlink, uid, gid, size, rdev, blksize) == (5, stat.S_IFREG | 0o644, 2, 3, 4, 4097, 0x0103, 4096)
    assert blocks == 16  # whole 4 KiB blocks, in 512-byte units
    for sec, nsec in ((atime, atimensec), (mtime, mtimensec), (ctime, ctimensec)):
        assert sec * 1_000_000_000 + nsec == attr.mtime_ns


class _Provider:
    """Just enough of a LayerProvider to reach each error path."""

    def __init__(self) -> None:
        self.used: tuple[str, str] | None = None

    def canonical_ref(self, text: str) -> str:
        if "bad" in text:
            raise errors.InvalidName(text)
        return text

    def resolved(self, ref: str, key: str = "") -> bool:
        return False

    def image_files(self, ref: str) -> ImageFiles:
        raise errors.EntryNotFound(ref)

    def layer(self, ref: str, key: str) -> ServedLayer:
        raise errors.LayerUnavailable("registry down")

    def numbered(self, number: int) -> ServedLayer:
        raise errors.StaleNode(str(number))

    def hold(self, number: int) -> ServedLayer:
        raise errors.StaleNode(str(number))

    def let_go(self, served: ServedLayer) -> None:
        pass

    def pin(self, ref: str, key: str) -> None:
        pass

    def unpin(self, ref: str, key: str) -> None:
        pass

    def use(self, ref: str, key: str) -> None:
        self.used = (ref, key)

    def release(self, ref: str, key: str) -> bool:
        return True

    def known_refs(self) -> list[str]:
        return []


@pytest.fixture
def ops():
    return StoreOperations(StoreModel(_Provider()))


def _errno(fn, *args):
    with pytest.raises(fuse.FuseError) as info:
        fn(*args)
    return info.value.errno


def test_operations_raise_fuse_errors(ops):
    bad = base64.b64encode(b"bad")
    assert _errno(ops.lookup, ROOT_CTX, ROOT_ID, bad) == errno.EINVAL
    ref = ops.lookup(ROOT_CTX, ROOT_ID, REF).nodeid
    layer = ops.lookup(ROOT_CTX, ref, KEY).nodeid
    assert _errno(ops.lookup, ROOT_CTX, layer, b"diff") == errno.EIO
    assert _errno(ops.lookup, ROOT_CTX, ref, b"manifest") == errno.ENOENT
    assert _errno(ops.create, ROOT_CTX, layer, b"use", 0o644, 0) == errno.ENOENT
    assert ops.model.provider.used == ("example.com/a:b", KEY.decode())
    assert _errno(ops.rmdir, ROOT_CTX, ref, KEY) == errno.ENOENT
    assert _errno(ops.refuse_write, ROOT_CTX, ref, b"x") == errno.EINVAL  # mkdir <ref>/x: not a digest
    assert _errno(ops.refuse_write, ROOT_CTX, layer, b"info") == errno.EROFS  # unlink <layer>/info
    assert _errno(ops.read, ROOT_CTX, layer, 12345, 0, 10) == errno.EBADF
    assert _errno(ops.getattr, ROOT_CTX, 0x1234) == errno.ESTALE  # an id never given out
    assert ops.getattr(ROOT_CTX, ROOT_ID).mode & stat.S_IFDIR
    assert ops.statfs(ROOT_CTX, ROOT_ID)[1] == 255


def test_each_request_is_answered_for_its_own_caller(ops):
    """The adapter hands each request's uid to the model: the same lookup is EACCES for another
    user (the provider has resolved nothing) and reaches the provider for root."""
    assert _errno(ops.lookup, USER_CTX, ROOT_ID, REF) == errno.EACCES
    ref = ops.lookup(ROOT_CTX, ROOT_ID, REF).nodeid
    assert _errno(ops.lookup, USER_CTX, ref, KEY) == errno.EACCES
    layer = ops.lookup(ROOT_CTX, ref, KEY).nodeid
    assert _errno(ops.lookup, USER_CTX, layer, b"diff") == errno.EACCES
    assert _errno(ops.lookup, ROOT_CTX, layer, b"diff") == errno.EIO  # root: the provider's answer
    assert _errno(ops.create, USER_CTX, layer, b"use", 0o644, 0) == errno.EACCES
    assert ops.model.provider.used is None
    assert _errno(ops.create, ROOT_CTX, layer, b"use", 0o644, 0) == errno.ENOENT
    assert ops.model.provider.used is not None


class _ListingModel:
    """A model whose directory listing counts how often it is built."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.builds = 0

    def readdir(self, nodeid: int, *, caller: Caller) -> list[tuple[str, Attr | None]]:
        self.builds += 1
        return [(n, Attr(ino=10 + i, mode=stat.S_IFREG | 0o644)) for i, n in enumerate(self.names)]


def test_open_directory_keeps_one_listing_across_pages():
    model = _ListingModel([f"f{i}" for i in range(50)])
    ops = StoreOperations(model)  # type: ignore[arg-type]
    fh = ops.opendir(ROOT_CTX, 7).fh
    first = ops.readdir(ROOT_CTX, 7, fh, 0)
    assert [e.name for e in first[:3]] == [b".", b"..", b"f0"] and len(first) == 52
    assert [e.offset for e in first[:3]] == [1, 2, 3]
    assert ops.readdir(ROOT_CTX, 7, fh, 30) == first[30:]  # a later page: the same snapshot
    assert model.builds == 1
    other = ops.opendir(ROOT_CTX, 7).fh
    assert other != fh
    ops.readdir(ROOT_CTX, 7, other, 0)
    assert model.builds == 2
    ops.releasedir(7, fh)
    ops.readdir(ROOT_CTX, 7, fh, 30)  # a released handle still answers (freshly built), never fails
    assert model.builds == 3
    ops.releasedir(7, other)
    assert ops._listings == {}


def test_only_a_layer_tree_listing_may_be_cached_by_the_kernel(ops):
    """The store's own directories change (images come and go): listed afresh at every open."""
    ref = ops.lookup(ROOT_CTX, ROOT_ID, REF).nodeid
    assert not ops.opendir(ROOT_CTX, ROOT_ID).keep_cache
    assert not ops.opendir(ROOT_CTX, ref).keep_cache
    assert ops.opendir(ROOT_CTX, 3 << 32 | 1).keep_cache  # a diff directory of layer 3
