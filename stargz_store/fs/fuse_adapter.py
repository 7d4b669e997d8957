"""The FUSE side: `stargz_store.fuse.Operations` over a `StoreModel`, by translation only.

Requests come in as node ids, byte names and the caller's `Context`; they go to the model as node
ids, `str` names (the file system encoding) and a `Caller`. Attributes (`Attr`) pass through
with their owners shown as the model's `Ownership` says (unchanged for a root store; a rootless
store's host ids for its user's Podman namespace: the one place ids are mapped), listings become
`DirEntry`s, and model errors become `FuseError(errno)` in exactly one place (`ERRNO`). Mount decisions that matter for podman, for security and for speed
(`MountOptions`, applied by `mount_spec` and `session_options`):
- `default_permissions`: the kernel checks every access against the modes and owners we report
  (the layers' own, and root-only store files), as on a local filesystem; with `allow_other` and
  without it, any local user could read every file of every image. Root (containers/storage)
  passes every check, so lookups, `use` and `rmdir` still reach the store;
- not mounted `ro`: an `ro` mount makes the kernel answer EROFS to `create(use)` and `rmdir`
  itself, and the store would never see the notifications; we refuse other writes ourselves;
- layer content is immutable, so attribute/entry timeouts are long, the page cache is kept
  across opens and a `diff` directory's listing is cached by the kernel; negative lookups are
  not cached, so a layer that becomes servable (or a retried use/rmdir) is seen at once, and the
  store's own directories are listed afresh at every open (images come and go);
- `no_open`: the first OPEN is declined, after which the kernel opens files without asking and
  reads name the file's node directly (one round trip less per file opened);
- the mount's readahead window is raised (`read_ahead_kb`, the kernel starts FUSE mounts at
  128 KiB), so sequential reads arrive as large requests instead of many 128 KiB ones;
- listings answer READDIRPLUS with full attributes where they are cheap (a layer's tree), so the
  kernel learns every child's dentry and attributes from one listing and a walk costs no LOOKUP
  per file.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass

from .. import fuse
from ..fuse.mount import mount_device
from .attrs import Attr
from .caller import Caller
from . import errors
from .errors import FsError
from .idmap import ROOTFUL, Ownership
from .inodes import is_diff_nodeid
from .. import metrics
from .model import StoreModel

log = logging.getLogger(__name__)

ERRNO: dict[type[FsError], int] = {
    errors.EntryNotFound: errno.ENOENT,
    errors.InvalidName: errno.EINVAL,
    errors.LayerUnavailable: errno.EIO,
    errors.ReadOnly: errno.EROFS,
    errors.NoSuchAttribute: errno.ENODATA,
    errors.NotADirectory: errno.ENOTDIR,
    errors.IsADirectory: errno.EISDIR,
    errors.NotASymlink: errno.EINVAL,
    errors.BadHandle: errno.EBADF,
    errors.PermissionDenied: errno.EACCES,
    errors.StaleNode: errno.ESTALE,
}
UNKNOWN_INO = 0xFFFFFFFF  # d_ino of a listed name without attributes (libfuse's FUSE_UNKNOWN_INO)
DT_DIR = 4


def errno_of(error: FsError) -> int:
    for cls in type(error).__mro__:
        code = ERRNO.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return errno.EIO


def _fuse_error(error: FsError, what: str, node: int) -> fuse.FuseError:
    code = errno_of(error)
    if code == errno.EIO:
        log.warning("%s of node %#x: %s", what, node, error)
    return fuse.FuseError(code, str(error))


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
    passthrough: bool = True  # the kernel reads fully cached files from backing files (if it can, and we may)
    passthrough_keep: int = 1024  # backing files kept registered after their last close (`Session._claim_kept`)


def mount_spec(mountpoint: str, options: MountOptions) -> fuse.MountSpec:
    return fuse.MountSpec(mountpoint, fsname=options.fsname, allow_other=options.allow_other,
                          default_permissions=options.default_permissions)


def session_options(options: MountOptions) -> fuse.SessionOptions:
    passthrough = options.passthrough and fuse.passthrough_permitted()
    if options.passthrough and not passthrough:
        log.info("FUSE passthrough needs CAP_SYS_ADMIN in the initial user namespace: off, reads go through the store")
    return fuse.SessionOptions(
        attr_timeout=options.attr_timeout,
        entry_timeout=options.entry_timeout,
        negative_timeout=options.negative_timeout,
        no_open=options.no_open,
        passthrough=passthrough,
        passthrough_keep=options.passthrough_keep,
        debug=options.debug,
        observe=metrics.observe_fuse,
    )


class StoreOperations:
    """`fuse.Operations` over the model. A directory handle keeps the listing taken at its first
    READDIR until RELEASEDIR, so a listing read in many kernel pages is built once and stays
    consistent."""

    def __init__(self, model: StoreModel, options: MountOptions | None = None) -> None:
        self.model = model
        self.options = options or MountOptions()
        self._listings: dict[int, list[fuse.DirEntry] | None] = {}
        self._next_dir_handle = 1
        self._dir_lock = threading.Lock()
        self.ownership: Ownership = getattr(model, "ownership", ROOTFUL)
        self._store_uid = self.ownership.store_uid
        self._owners = self.ownership.attr
        self.passthrough = False  # what the connection negotiated (`negotiated`): no backing files before

    def negotiated(self, state: fuse.ConnectionState) -> None:
        """The connection's INIT (this process's, or a predecessor's): look for backing files only
        when the kernel takes them (else they would be made and never used)."""
        self.passthrough = self.options.passthrough and state.passthrough

    def _caller(self, ctx: fuse.Context) -> Caller:
        return Caller(ctx.uid, self._store_uid)

    # -- nodes --------------------------------------------------------------------------------

    def lookup(self, ctx: fuse.Context, parent: int, name: bytes) -> Attr:
        try:
            return self._owners(self.model.lookup(parent, os.fsdecode(name), caller=self._caller(ctx)))
        except FsError as e:
            raise _fuse_error(e, "lookup", parent) from None

    def forget(self, ino: int, nlookup: int) -> None:
        self.model.forget(ino, nlookup)

    def getattr(self, ctx: fuse.Context, ino: int) -> Attr:
        try:
            return self._owners(self.model.getattr(ino, caller=self._caller(ctx)))
        except FsError as e:
            raise _fuse_error(e, "getattr", ino) from None

    def readlink(self, ctx: fuse.Context, ino: int) -> bytes:
        try:
            return os.fsencode(self.model.readlink(ino, caller=self._caller(ctx)))
        except FsError as e:
            raise _fuse_error(e, "readlink", ino) from None

    def getxattr(self, ctx: fuse.Context, ino: int, name: bytes) -> bytes:
        try:
            return self.model.getxattr(ino, os.fsdecode(name), caller=self._caller(ctx))
        except FsError as e:
            raise _fuse_error(e, "getxattr", ino) from None

    def listxattr(self, ctx: fuse.Context, ino: int) -> list[bytes]:
        try:
            return [os.fsencode(n) for n in self.model.listxattr(ino, caller=self._caller(ctx))]
        except FsError as e:
            raise _fuse_error(e, "listxattr", ino) from None

    def statfs(self, ctx: fuse.Context, ino: int) -> tuple[int, int, int]:
        st = self.model.statfs()
        return st["f_bsize"], st["f_namemax"], st["f_frsize"]

    # -- directories --------------------------------------------------------------------------

    def opendir(self, ctx: fuse.Context, ino: int) -> fuse.OpenReply:
        with self._dir_lock:
            fh = self._next_dir_handle
            self._next_dir_handle += 1
            self._listings[fh] = None
        return fuse.OpenReply(fh, keep_cache=is_diff_nodeid(ino))  # a layer's directories never change

    def readdir(self, ctx: fuse.Context, ino: int, fh: int, offset: int) -> list[fuse.DirEntry]:
        """The entries after `offset` of the listing of open directory `fh` (taken now when
        `offset` is 0 or when it has none yet)."""
        entries = None if offset == 0 else self._listings.get(fh)
        if entries is None:
            try:
                listing = self.model.readdir(ino, caller=self._caller(ctx))
            except FsError as e:
                raise _fuse_error(e, "readdir", ino) from None
            entries = [fuse.DirEntry(b".", 1, ino=UNKNOWN_INO, kind=DT_DIR),
                       fuse.DirEntry(b"..", 2, ino=UNKNOWN_INO, kind=DT_DIR)]
            owners = self._owners
            entries += [fuse.DirEntry(os.fsencode(name), i, attr=None if attr is None else owners(attr), ino=UNKNOWN_INO)
                        for i, (name, attr) in enumerate(listing, start=3)]
            with self._dir_lock:
                if fh in self._listings:
                    self._listings[fh] = entries
        return entries[offset:]

    def releasedir(self, ino: int, fh: int) -> None:
        with self._dir_lock:
            self._listings.pop(fh, None)

    # -- files --------------------------------------------------------------------------------

    def open(self, ctx: fuse.Context, ino: int, flags: int, *, backing: bool = True) -> fuse.OpenReply:
        """With passthrough, a file whose every byte is cached and verified is answered with its
        backing file's descriptor (the session registers it with the kernel, or closes it).
        `backing` False: the session holds a checked one already (`Session._claim_kept`)."""
        passthrough = self.passthrough and backing
        try:
            fh = self.model.open(ino, flags, caller=self._caller(ctx), backing=passthrough)
        except FsError as e:
            raise _fuse_error(e, "open", ino) from None
        backing_fd = self.model.backing_fd(fh) if passthrough else None
        return fuse.OpenReply(fh, keep_cache=self.options.kernel_cache, backing_fd=backing_fd)

    def read(self, ctx: fuse.Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        try:
            data = self.model.read(ino, fh, offset, size, caller=self._caller(ctx))
        except FsError as e:
            raise _fuse_error(e, "read", ino) from None
        metrics.served_bytes.inc(len(data))
        return data

    def release(self, ino: int, fh: int) -> None:
        if fh:
            self.model.release(fh)

    # -- notifications and refused writes -----------------------------------------------------

    def create(self, ctx: fuse.Context, parent: int, name: bytes, mode: int, flags: int) -> None:
        try:
            self.model.create(parent, os.fsdecode(name), caller=self._caller(ctx))
        except FsError as e:
            raise _fuse_error(e, "create", parent) from None

    def rmdir(self, ctx: fuse.Context, parent: int, name: bytes) -> None:
        try:
            self.model.rmdir(parent, os.fsdecode(name), caller=self._caller(ctx))
        except FsError as e:
            raise _fuse_error(e, "rmdir", parent) from None

    def refuse_write(self, ctx: fuse.Context, ino: int, name: bytes | None) -> None:
        try:
            self.model.refuse_write(ino, None if name is None else os.fsdecode(name))
        except FsError as e:
            raise _fuse_error(e, "write", ino) from None


class KernelNotifier:
    """Tells the kernel to forget a released layer directory. Not from the request that released
    it: the kernel holds the parent directory locked until that request is answered, and the
    notification needs the same lock. So a thread sends them, one after another."""

    def __init__(self, session: fuse.Session) -> None:
        self.session = session
        self._queue: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuse-notify", daemon=True)
        self._thread.start()

    def forget_entry(self, parent: int, name: str) -> None:
        self._queue.put((parent, name))

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self.session.notify_inval_entry(item[0], os.fsencode(item[1]))


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Set the readahead of our mount's backing device (`/sys/class/bdi/<major:minor>`).
    After INIT: the kernel lowers it to what INIT negotiated."""
    device = mount_device(mountpoint)
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        log.debug("readahead of %s (%s) set to %d KiB", mountpoint, device, kb)
    except OSError as e:
        # Only root may write there: a rootless store expects this, and serves on at 128 KiB.
        level = logging.WARNING if os.geteuid() == 0 else logging.INFO
        log.log(level, "cannot raise the readahead of %s (%s): %s; sequential reads stay at the kernel default",
                mountpoint, device, e)
