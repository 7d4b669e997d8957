"""The FUSE side: mfusepy `Operations` over a `StoreModel`, and the mount call.

This module only translates: paths, handles and the request's uid (`Caller`) in, stat dicts and
bytes out, and model errors to errno in exactly one place (`ERRNO`). Mount decisions that matter
for podman, for security and for speed:
- `default_permissions`: the kernel checks every access against the modes and owners we report
  (the layers' own, and root-only store files), as on a local filesystem; with `allow_other` and
  without it, any local user could read every file of every image. Root (containers/storage)
  passes every check, so lookups, `use` and `rmdir` still reach the store;
- not mounted `ro`: an `ro` mount makes the kernel answer EROFS to `create(use)` and `rmdir`
  itself, and the store would never see the notifications; we refuse other writes ourselves;
- layer content is immutable, so attribute/entry timeouts are long and the kernel page cache is
  kept across opens (`kernel_cache`); negative lookups are not cached, so a layer that becomes
  servable (or a retried use/rmdir) is seen at once;
- our own inode numbers are reported (`use_ino`), so hardlinks show one inode;
- the mount's readahead window is raised (`read_ahead_kb`, the kernel starts FUSE mounts at
  128 KiB), so sequential reads arrive as large requests instead of many 128 KiB ones;
- directory listings answer READDIRPLUS with full attributes (`StoreFUSE`), so the kernel learns
  every child's dentry and attributes from one listing and a walk costs no LOOKUP per file; stat
  structures are filled straight from `Attr`, without mfusepy's per-field dict round trip.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import ctypes

import mfusepy as fuse

from .attrs import Attr
from .caller import Caller
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
    PermissionDenied,
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
    PermissionDenied: errno.EACCES,
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
    default_permissions: bool = True  # the kernel enforces modes and owners (not a config key: always on)
    debug: bool = False
    fsname: str = "stargzstore"
    read_ahead_kb: int | None = 4096  # 0 = no readahead; None = leave the kernel's default (128)
    no_open: bool = True  # let the kernel skip OPEN/RELEASE (one round trip less per file opened)


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


def request_caller() -> Caller:
    """The uid of the FUSE request this thread is serving (libfuse's request context)."""
    return Caller(fuse.fuse_get_context()[0])


class StoreOperations(fuse.Operations):
    """mfusepy callbacks. Times are integer nanoseconds (`use_ns`). `caller` says who sent the
    request being served (tests outside a FUSE request pass their own)."""

    use_ns = True

    def __init__(
        self,
        model: StoreModel,
        options: MountOptions,
        mountpoint: str = "",
        on_ready: Callable[[], None] | None = None,
        caller: Callable[[], Caller] = request_caller,
    ) -> None:
        self.model = model
        self.options = options
        self.mountpoint = mountpoint
        self.on_ready = on_ready
        self.caller = caller
        self._dir_listings: dict[int, list[tuple[str, Attr | None]] | None] = {}
        self._next_dir_handle = 1
        self._dir_lock = threading.Lock()
        self._no_open = False

    def init_with_config(self, conn, config) -> None:
        if conn is not None and conn.capable & FUSE_CAP_READDIRPLUS:
            # Always READDIRPLUS, not the kernel's "auto" mode: that one uses it for the first
            # page of a listing only (about 25 entries) unless lookups interleave with the
            # listing, so `os.walk` (list all, then open) would still LOOKUP most files.
            conn.want = (conn.want | FUSE_CAP_READDIRPLUS) & ~FUSE_CAP_READDIRPLUS_AUTO
        # Files are immutable and a read can find its file by path, so an OPEN round trip per
        # file buys nothing: answering the first OPEN with ENOSYS makes the kernel skip OPEN and
        # RELEASE from then on (and keep the page cache, as FOPEN_KEEP_CACHE would).
        self._no_open = bool(self.options.no_open and conn is not None and conn.capable & FUSE_CAP_NO_OPEN_SUPPORT)
        if self._no_open:
            # O_TRUNC then comes as a size change (refused: EROFS) instead of a flag of the
            # OPEN the kernel no longer sends; a write-only open succeeds, its writes are EROFS.
            conn.want &= ~FUSE_CAP_ATOMIC_O_TRUNC
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
        if self.options.read_ahead_kb is not None:
            set_read_ahead(self.mountpoint, self.options.read_ahead_kb)
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.exception("readiness callback failed")

    @_translating
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        return stat_dict(self.model.getattr(path, caller=self.caller()))

    @_translating
    def attr(self, path: str) -> Attr:
        """`getattr` without the dict: what `StoreFUSE` copies into the kernel's stat buffer."""
        return self.model.getattr(path, caller=self.caller())

    @_translating
    def readdir(self, path: str, fh: int) -> list:
        out: list = [(".", None, 0), ("..", None, 0)]
        for name, attr in self.model.readdir(path, caller=self.caller()):
            out.append((name, {"st_mode": attr.mode, "st_ino": attr.ino} if attr else None, 0))
        return out

    @_translating
    def listing(self, path: str) -> list[tuple[str, Attr | None]]:
        """`readdir` as `(name, Attr or None)` pairs, `.` and `..` first (no attributes)."""
        return [(".", None), ("..", None), *self.model.readdir(path, caller=self.caller())]

    def opendir(self, path: str) -> int:
        """A directory handle: its listing is taken at the first readdir and kept until
        releasedir, so a listing read in many kernel pages is built once (and stays consistent)."""
        with self._dir_lock:
            fh = self._next_dir_handle
            self._next_dir_handle += 1
            self._dir_listings[fh] = None
        return fh

    def releasedir(self, path: str, fh: int) -> int:
        with self._dir_lock:
            self._dir_listings.pop(fh, None)
        return 0

    def listing_for(self, path: str, fh: int, offset: int) -> list[tuple[str, Attr | None]]:
        """The listing of open directory `fh` (taken now when `offset` is 0 or it has none yet)."""
        listing = None if offset == 0 else self._dir_listings.get(fh)
        if listing is None:
            listing = self.listing(path)
            with self._dir_lock:
                if fh in self._dir_listings:
                    self._dir_listings[fh] = listing
        return listing

    @_translating
    def readlink(self, path: str) -> str:
        return self.model.readlink(path, caller=self.caller())

    @_translating
    def open(self, path: str, flags: int) -> int:
        if self._no_open:
            self.model.check_open(path, flags, caller=self.caller())  # refusals still apply to this open
            raise fuse.FuseOSError(errno.ENOSYS)  # success, and no OPEN for any later open
        return self.model.open(path, flags, caller=self.caller())

    @_translating
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh == 0:  # opened without OPEN (no_open): model handles start at 1
            return self.model.read_path(path, offset, size, caller=self.caller())
        return self.model.read(fh, offset, size)

    @_translating
    def release(self, path: str, fh: int) -> int:
        if fh:
            self.model.release(fh)
        return 0

    @_translating
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.model.getxattr(path, name, caller=self.caller())

    @_translating
    def listxattr(self, path: str) -> list[str]:
        return self.model.listxattr(path, caller=self.caller())

    @_translating
    def statfs(self, path: str) -> dict[str, int]:
        return self.model.statfs()

    @_translating
    def create(self, path: str, mode: int, fi=None) -> int:
        self.model.create(path, caller=self.caller())
        return 0  # not reached: create always raises

    @_translating
    def rmdir(self, path: str) -> int:
        self.model.rmdir(path, caller=self.caller())
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


FUSE_CAP_READDIRPLUS = 1 << 13  # libfuse 3 `fuse_conn_info.want` bits
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_NO_OPEN_SUPPORT = 1 << 17
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_READDIR_PLUS = 1  # readdir flag: the kernel asked for READDIRPLUS (libfuse 3 `fuse_readdir_flags`)
FUSE_FILL_DIR_PLUS = 2  # filler flag: the stat given is complete, make it the child's entry and attributes


def fill_stat(st: Any, attr: Attr) -> None:
    """Copy `attr` into a zeroed mfusepy `c_stat` (the same fields `stat_dict` reports)."""
    st.st_ino = attr.ino
    st.st_mode = attr.mode
    st.st_nlink = attr.nlink
    st.st_uid = attr.uid
    st.st_gid = attr.gid
    st.st_size = attr.size
    st.st_blocks = attr.blocks
    st.st_blksize = 4096
    st.st_rdev = attr.rdev
    sec, nsec = divmod(attr.mtime_ns, 1_000_000_000)
    for ts in (st.st_mtimespec, st.st_ctimespec, st.st_atimespec):
        ts.tv_sec = sec
        ts.tv_nsec = nsec


class StoreFUSE(fuse.FUSE):
    """mfusepy's `FUSE` with two hot callbacks replaced (libfuse 3 only; 2 keeps mfusepy's own).

    - getattr fills the stat buffer from `Attr` directly;
    - readdir answers READDIRPLUS with complete attributes (`FUSE_FILL_DIR_PLUS`): libfuse then
      registers each child as looked up and the kernel caches its dentry and attributes for
      `entry_timeout`/`attr_timeout`, so opening every file of a listed directory sends no
      LOOKUP (a walk of 20,000 files saves 20,000 round trips through the daemon).
    Nodes without cheap attributes (store directories) are listed without them, as before.
    """

    if fuse.fuse_version_major == 3:

        def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            ctypes.memset(buf, 0, ctypes.sizeof(fuse.c_stat))
            fill_stat(buf.contents, self.operations.attr("" if path is None else path.decode(self.encoding, self.errors)))
            return 0

        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
            # Entries carry their position + 1 as offset: libfuse 3 (before 3.17) sends
            # READDIRPLUS attributes to the kernel only in this "offset" mode; a listing
            # filled with offset 0 reaches the kernel with the attributes marked invalid.
            decoded = "" if path is None else path.decode(self.encoding, self.errors)
            entries = self.operations.listing_for(decoded, fip.contents.fh if fip else 0, offset)
            plus = FUSE_FILL_DIR_PLUS if flags & FUSE_READDIR_PLUS else 0
            st = fuse.c_stat()
            size = ctypes.sizeof(st)
            encoding, errors = self.encoding, self.errors
            for index in range(offset, len(entries)):
                name, attr = entries[index]
                raw = name.encode(encoding, errors)
                if attr is None:
                    full = filler(buf, raw, None, index + 1, 0)
                else:
                    ctypes.memset(ctypes.byref(st), 0, size)
                    fill_stat(st, attr)
                    full = filler(buf, raw, st, index + 1, plus)
                if full != 0:
                    break
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
        "default_permissions": options.default_permissions,
        "fsname": options.fsname,
        "subtype": "stargz-store",
        "debug": options.debug,
    }
    StoreFUSE(ops, mountpoint, **kwargs)


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
    """Set the readahead of our mount's backing device (`/sys/class/bdi/<major:minor>`)."""
    device = mount_device(mountpoint)
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        log.debug("readahead of %s (%s) set to %d KiB", mountpoint, device, kb)
    except OSError as e:
        log.warning("cannot raise the readahead of %s (%s): %s; sequential reads stay at the kernel default",
                    mountpoint, device, e)
