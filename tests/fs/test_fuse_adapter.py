"""The FUSE adapter only translates: errors to errno (one table), attributes to stat fields."""
from __future__ import annotations

import errno
import stat

import mfusepy as fuse
import pytest

from stargz_store.fs import errors
from stargz_store.fs.attrs import Attr
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


@pytest.fixture
def ops():
    return StoreOperations(StoreModel(_Provider()), MountOptions())


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
