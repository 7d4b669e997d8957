"""The FUSE adapter only translates: errors to errno (one table), attributes to stat fields."""
from __future__ import annotations

import errno
import stat

import mfusepy as fuse
import pytest

from stargz_store.fs import errors
from stargz_store.fs.attrs import Attr
from stargz_store.fs.caller import ROOT, Caller
from stargz_store.fs.fuse_adapter import ERRNO, MountOptions, StoreOperations, errno_of, stat_dict
from stargz_store.fs.model import StoreModel


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


def test_stat_fields():
    attr = Attr(ino=5, mode=stat.S_IFREG | 0o644, nlink=2, uid=3, gid=4, size=4097, mtime_ns=1_500_000_000, rdev=0)
    st = stat_dict(attr)
    assert st["st_ino"] == 5 and st["st_nlink"] == 2 and st["st_size"] == 4097 and st["st_blocks"] == 16
    assert st["st_mtime"] == 1_500_000_000 and st["st_uid"] == 3 and st["st_gid"] == 4


class _Provider:
    """Just enough of a LayerProvider to reach each error path."""

    def canonical_ref(self, text):
        if "bad" in text:
            raise errors.InvalidName(text)
        return text

    def warm(self, ref):
        pass

    def layer(self, ref, key):
        raise errors.LayerUnavailable("registry down")

    def image_files(self, ref):
        raise errors.EntryNotFound(ref)

    def use(self, ref, key):
        self.used = (ref, key)

    def release(self, ref, key):
        pass

    def known_refs(self):
        return []

    def resolved(self, ref, key=""):
        return False


@pytest.fixture
def ops():
    return StoreOperations(StoreModel(_Provider()), MountOptions(), caller=lambda: ROOT)


def _errno(fn, *args):
    with pytest.raises(fuse.FuseOSError) as info:
        fn(*args)
    return info.value.errno


def test_operations_raise_fuse_errors(ops):
    import base64

    ref = base64.b64encode(b"example.com/a:b").decode()
    bad = base64.b64encode(b"bad").decode()
    key = "sha256:" + "a" * 64
    assert _errno(ops.getattr, f"/{bad}") == errno.EINVAL
    assert _errno(ops.getattr, f"/{ref}/{key}/diff") == errno.EIO
    assert _errno(ops.getattr, f"/{ref}/manifest") == errno.ENOENT
    assert _errno(ops.create, f"/{ref}/{key}/use", 0o644, 0) == errno.ENOENT
    assert ops.model.provider.used == ("example.com/a:b", key)
    assert _errno(ops.rmdir, f"/{ref}/{key}") == errno.ENOENT
    assert _errno(ops.mkdir, f"/{ref}/x", 0o755) == errno.EINVAL
    assert _errno(ops.unlink, f"/{ref}/{key}/info") == errno.EROFS
    assert _errno(ops.read, f"/{ref}/{key}/info", 10, 0, 12345) == errno.EBADF
    assert ops.getattr("/")["st_mode"] & stat.S_IFDIR
    assert ops.statfs("/")["f_namemax"] == 255


def test_each_request_is_answered_for_its_own_caller():
    """The adapter asks who sent each request and hands it to the model: the same path is EACCES
    for another user (the provider has resolved nothing) and reaches the provider for root."""
    import base64

    callers = iter([Caller(1000), ROOT, Caller(1000), ROOT])
    ops = StoreOperations(StoreModel(_Provider()), MountOptions(), caller=lambda: next(callers))
    diff = f"/{base64.b64encode(b'example.com/a:b').decode()}/sha256:{'a' * 64}/diff"
    assert _errno(ops.getattr, diff) == errno.EACCES
    assert _errno(ops.getattr, diff) == errno.EIO  # root: the provider's answer
    assert _errno(ops.create, diff.replace("/diff", "/use"), 0o644, 0) == errno.EACCES
    assert not hasattr(ops.model.provider, "used")
    assert _errno(ops.create, diff.replace("/diff", "/use"), 0o644, 0) == errno.ENOENT


def test_fill_stat_reports_what_stat_dict_reports():
    from stargz_store.fs.fuse_adapter import fill_stat

    attr = Attr(ino=7, mode=stat.S_IFCHR, nlink=1, uid=9, gid=8, size=5000, mtime_ns=1_700_000_000_123_456_789, rdev=0x0103)
    st = fuse.c_stat()
    fill_stat(st, attr)
    expected = stat_dict(attr)
    for key in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize", "st_rdev"):
        assert getattr(st, key) == expected[key], key
    for ts in (st.st_mtimespec, st.st_ctimespec, st.st_atimespec):
        assert ts.tv_sec * 1_000_000_000 + ts.tv_nsec == expected["st_mtime"]


class _ListingModel:
    """A model whose directory listing counts how often it is built."""

    def __init__(self, names):
        self.names = names
        self.builds = 0

    def readdir(self, path, *, caller):
        self.builds += 1
        return [(n, Attr(ino=10 + i, mode=stat.S_IFREG | 0o644)) for i, n in enumerate(self.names)]


def test_open_directory_keeps_one_listing_across_pages():
    model = _ListingModel([f"f{i}" for i in range(50)])
    ops = StoreOperations(model, MountOptions(), caller=lambda: ROOT)  # type: ignore[arg-type]
    fh = ops.opendir("/d")
    first = ops.listing_for("/d", fh, 0)
    assert [n for n, _ in first[:3]] == [".", "..", "f0"] and len(first) == 52
    assert ops.listing_for("/d", fh, 30) is first  # a later page: the same snapshot
    assert model.builds == 1
    other = ops.opendir("/d")
    assert other != fh
    ops.listing_for("/d", other, 0)
    assert model.builds == 2
    ops.releasedir("/d", fh)
    ops.listing_for("/d", fh, 30)  # a released handle still answers (freshly built), never fails
    assert model.builds == 3
    ops.releasedir("/d", other)
    assert ops._dir_listings == {}
