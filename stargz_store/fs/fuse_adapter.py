"""The FUSE side: mfusepy `Operations` over a `StoreModel`, and the mount call.

This module only translates: paths and handles in, stat dicts and bytes out, and model errors to
errno in exactly one place (`ERRNO`). Mount decisions that matter for podman and for speed:
- not mounted `ro`: an `ro` mount makes the kernel answer EROFS to `create(use)` and `rmdir`
  itself, and the store would never see the notifications; we refuse other writes ourselves;
- layer content is immutable, so attribute/entry timeouts are long and the kernel page cache is
  kept across opens (`kernel_cache`); negative lookups are not cached, so a layer that becomes
  servable (or a retried use/rmdir) is seen at once;
- our own inode numbers are reported (`use_ino`), so hardlinks show one inode;
- the mount's readahead window is raised (`read_ahead_kb`, the kernel starts FUSE mounts at
  128 KiB), so sequential reads arrive as large requests instead of many 128 KiB ones.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import mfusepy as fuse

from .attrs import Attr
from .errors import (
    BadHandle,
    EntryNotFound,
    FsError,
    InvalidName,
    IsADirectory,
    LayerUnavailable,
    NoSuchAttribute,
    NotADirectory,
    NotASymlink,
    ReadOnly,
)
from .model import StoreModel

log = logging.getLogger(__name__)

ERRNO: dict[type[FsError], int] = {
    EntryNotFound: errno.ENOENT,
    InvalidName: errno.EINVAL,
    LayerUnavailable: errno.EIO,
    ReadOnly: errno.EROFS,
    NoSuchAttribute: errno.ENODATA,
    NotADirectory: errno.ENOTDIR,
    IsADirectory: errno.EISDIR,
    NotASymlink: errno.EINVAL,
    BadHandle: errno.EBADF,
}


def errno_of(error: FsError) -> int:
    for cls in type(error).__mro__:
        code = ERRNO.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return errno.EIO


@dataclass(frozen=True)
class MountOptions:
    """How the kernel may cache: seconds for attributes and entries; `debug` logs every request."""

    attr_timeout: float = 3600.0
    entry_timeout: float = 3600.0
    negative_timeout: float = 0.0
    kernel_cache: bool = True
    allow_other: bool = True
    debug: bool = False
    fsname: str = "stargzstore"
    read_ahead_kb: int = 4096  # 0 = leave the kernel's default


def _translating(method):
    """Run a model call; a model error becomes `FuseOSError(errno)`, anything else EIO (logged)."""

    def wrapper(self, *args):
        try:
            return method(self, *args)
        except FsError as e:
            code = errno_of(e)
            if code == errno.EIO:
                log.warning("%s%r: %s", method.__name__, args[:1], e)
            raise fuse.FuseOSError(code) from None
        except fuse.FuseOSError:
            raise
        except Exception:
            log.exception("unexpected error in %s%r", method.__name__, args[:1])
            raise fuse.FuseOSError(errno.EIO) from None

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def stat_dict(attr: Attr) -> dict[str, Any]:
    return {
        "st_ino": attr.ino,
        "st_mode": attr.mode,
        "st_nlink": attr.nlink,
        "st_uid": attr.uid,
        "st_gid": attr.gid,
        "st_size": attr.size,
        "st_blocks": attr.blocks,
        "st_blksize": 4096,
        "st_rdev": attr.rdev,
        "st_mtime": attr.mtime_ns,
        "st_ctime": attr.mtime_ns,
        "st_atime": attr.mtime_ns,
    }


class StoreOperations(fuse.Operations):
    """mfusepy callbacks. Times are integer nanoseconds (`use_ns`)."""

    use_ns = True

    def __init__(
        self,
        model: StoreModel,
        options: MountOptions,
        mountpoint: str = "",
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.mountpoint = mountpoint
        self.on_ready = on_ready

    def init_with_config(self, conn, config) -> None:
        if config is not None:
            config.attr_timeout = self.options.attr_timeout
            config.entry_timeout = self.options.entry_timeout
            config.negative_timeout = self.options.negative_timeout
            config.kernel_cache = int(self.options.kernel_cache)
            config.use_ino = 1
            config.readdir_ino = 1
        log.info("FUSE session started")
        if self.mountpoint:
            threading.Thread(target=self._after_mount, name="after-mount", daemon=True).start()

    def _after_mount(self) -> None:
        """Once the kernel lists the mount: raise its readahead, then report readiness."""
        if wait_for_mount(self.mountpoint) is None:
            log.warning("mount at %s did not appear in /proc/self/mountinfo", self.mountpoint)
            return
        if self.options.read_ahead_kb > 0:
            set_read_ahead(self.mountpoint, self.options.read_ahead_kb)
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.exception("readiness callback failed")

    @_translating
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        return stat_dict(self.model.getattr(path))

    @_translating
    def readdir(self, path: str, fh: int) -> list:
        out: list = [(".", None, 0), ("..", None, 0)]
        for name, attr in self.model.readdir(path):
            out.append((name, {"st_mode": attr.mode, "st_ino": attr.ino} if attr else None, 0))
        return out

    @_translating
    def readlink(self, path: str) -> str:
        return self.model.readlink(path)

    @_translating
    def open(self, path: str, flags: int) -> int:
        return self.model.open(path, flags)

    @_translating
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.model.read(fh, offset, size)

    @_translating
    def release(self, path: str, fh: int) -> int:
        self.model.release(fh)
        return 0

    @_translating
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.model.getxattr(path, name)

    @_translating
    def listxattr(self, path: str) -> list[str]:
        return self.model.listxattr(path)

    @_translating
    def statfs(self, path: str) -> dict[str, int]:
        return self.model.statfs()

    @_translating
    def create(self, path: str, mode: int, fi=None) -> int:
        self.model.create(path)
        return 0  # not reached: create always raises

    @_translating
    def rmdir(self, path: str) -> int:
        self.model.rmdir(path)
        return 0

    # Every other write: EROFS, after validating the name like a lookup would.
    @_translating
    def mkdir(self, path: str, mode: int) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def unlink(self, path: str) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def symlink(self, target: str, source: str) -> int:
        self.model.refuse_write(target)
        return 0

    @_translating
    def link(self, target: str, source: str) -> int:
        self.model.refuse_write(target)
        return 0

    @_translating
    def rename(self, old: str, new: str) -> int:
        self.model.refuse_write(old)
        return 0

    @_translating
    def chmod(self, path: str, mode: int) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        raise ReadOnly(path)

    @_translating
    def utimens(self, path: str, times=None) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.model.refuse_write(path)
        return 0

    @_translating
    def removexattr(self, path: str, name: str) -> int:
        self.model.refuse_write(path)
        return 0


def mount(
    model: StoreModel, mountpoint: str, options: MountOptions, on_ready: Callable[[], None] | None = None
) -> None:
    """Mount and serve in the foreground until SIGINT/SIGTERM or unmount; libfuse unmounts on exit.

    libfuse installs its own SIGINT/SIGTERM/SIGHUP handlers (Python's could not run while the
    main thread is inside the C loop), and the multithreaded loop serves requests in parallel.
    """
    ops = StoreOperations(model, options, mountpoint, on_ready)
    kwargs: dict[str, Any] = {
        "foreground": True,
        "allow_other": options.allow_other,
        "fsname": options.fsname,
        "subtype": "stargz-store",
        "debug": options.debug,
    }
    fuse.FUSE(ops, mountpoint, **kwargs)


def mount_device(mountpoint: str) -> str | None:
    """`major:minor` of the newest mount at `mountpoint` (from /proc/self/mountinfo), if any."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].decode("unicode_escape", "replace") == target:
                found = fields[2].decode()
    return found


def wait_for_mount(mountpoint: str, wait: float = 10.0) -> str | None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        device = mount_device(mountpoint)
        if device is not None:
            return device
        time.sleep(0.02)
    return None


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Raise the readahead of our mount's backing device (`/sys/class/bdi/<major:minor>`)."""
    device = mount_device(mountpoint)
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        log.debug("readahead of %s (%s) set to %d KiB", mountpoint, device, kb)
    except OSError as e:
        log.warning("cannot raise the readahead of %s (%s): %s; sequential reads stay at the kernel default",
                    mountpoint, device, e)
