"""Getting a `/dev/fuse` connection mounted, and unmounting it.

Two ways, as libfuse does them:
- as root, `mount(2)` directly with the opened `/dev/fuse` descriptor in the options (`fd=N`);
- as a user, `fusermount3` mounts (it is setuid) and hands the descriptor back over a unix socket
  (`_FUSE_COMMFD`, `SCM_RIGHTS`); unmounting is `fusermount3 -u`.

The descriptor is the connection: whoever holds it may serve the mount, in this process or after
being passed to another (`session.ConnectionState` says how to resume serving it). The mount
lives until it is unmounted, or until the last holder of the descriptor closes it (then the kernel
aborts it and leaves a dead mount that answers ENOTCONN: `is_dead_mount`, `unmount`).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import socket
import stat
import subprocess
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
FUSERMOUNT = "fusermount3"


class MountError(Exception):
    """The mount could not be made (the message says why, for an operator)."""


class MountSpec(NamedTuple):
    """How to mount. `allow_other` lets other users (podman's processes, the containers) in;
    `default_permissions` makes the kernel check modes and owners like a local filesystem.
    A NamedTuple, not a dataclass: the holder imports this module, and `dataclasses` (with
    `inspect`) is a megabyte of its small heap."""

    mountpoint: str
    fsname: str = "stargzstore"
    subtype: str = "stargz-store"
    allow_other: bool = True
    default_permissions: bool = True
    max_read: int = 0  # 0: the kernel's default (max_pages * page size)

    def options(self, fd: int | None, uid: int, gid: int, rootmode: int = 0o40000) -> str:
        opts = []
        if fd is not None:
            opts += [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={uid}", f"group_id={gid}"]
        if self.allow_other:
            opts.append("allow_other")
        if self.default_permissions:
            opts.append("default_permissions")
        if self.max_read:
            opts.append(f"max_read={self.max_read}")
        return ",".join(opts)


def _libc() -> ctypes.CDLL:
    """glibc by its soname; `ctypes.util` (which imports tempfile, shutil, random...) only where
    that name does not load: the holder imports this module and stays small."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes import util

        return ctypes.CDLL(util.find_library("c") or "libc.so.6", use_errno=True)


DEVICE = "/dev/fuse"


def open_device() -> int:
    """A new connection (`/dev/fuse`), close-on-exec; a clear error when FUSE is not usable."""
    try:
        return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(f"{DEVICE} does not exist: load the fuse module (modprobe fuse)") from None
    except PermissionError:
        raise MountError(device_unusable()) from None


def device_unusable() -> str:
    """The operator's message for a `/dev/fuse` this user may not open, with the fix."""
    mode = stat.S_IMODE(os.stat(DEVICE).st_mode)
    return (f"{DEVICE} is not usable by uid {os.getuid()} (mode {mode:04o}): make it 0666 as root "
            f"(`chmod 0666 {DEVICE}`, what udev does on most distributions; persistent with a udev rule "
            f"`KERNEL==\"fuse\", MODE=\"0666\"`), or grant this user alone "
            f"(`setfacl -m u:{_user_name()}:rw {DEVICE}`)")


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def mount(spec: MountSpec) -> int:
    """Mount a new connection at `spec.mountpoint`; returns its `/dev/fuse` descriptor."""
    if os.geteuid() == 0:
        return _mount_as_root(spec)
    return _mount_with_fusermount(spec)


def _mount_as_root(spec: MountSpec) -> int:
    fd = open_device()
    source = spec.fsname.encode()
    fstype = f"fuse.{spec.subtype}".encode() if spec.subtype else b"fuse"
    data = spec.options(fd, os.getuid(), os.getgid()).encode()
    libc = _libc()
    if libc.mount(source, spec.mountpoint.encode(), fstype, ctypes.c_ulong(MS_NOSUID | MS_NODEV), data) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount of {spec.mountpoint} failed: {os.strerror(err)}")
    return fd


def _mount_with_fusermount(spec: MountSpec) -> int:
    """`fusermount3 -o OPTS MOUNTPOINT` with `_FUSE_COMMFD`: it sends the descriptor back."""
    import shutil

    if shutil.which(FUSERMOUNT) is None:
        raise MountError(f"{FUSERMOUNT} not found: install the fuse3 package to mount as a user")
    if os.path.exists(DEVICE) and not os.access(DEVICE, os.R_OK | os.W_OK):
        raise MountError(device_unusable())  # fusermount3 opens it as the user, not as root
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = spec.options(None, os.getuid(), os.getgid())
        opts = ",".join(o for o in (opts, f"fsname={spec.fsname}", f"subtype={spec.subtype}") if o)
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([FUSERMOUNT, "-o", opts, "--", spec.mountpoint], env=env,
                                pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
        theirs.close()
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        _, stderr = proc.communicate(timeout=30)
        if proc.returncode != 0 or not fds:
            for fd in fds:
                os.close(fd)
            raise MountError(f"{FUSERMOUNT} could not mount {spec.mountpoint}: {stderr.strip() or proc.returncode}")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        if theirs.fileno() != -1:
            theirs.close()


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount (root: umount2; a user: fusermount3 -u). Lazy detaches a busy or dead mount."""
    if os.geteuid() == 0:
        libc = _libc()
        if libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise MountError(f"cannot unmount {mountpoint}: {os.strerror(err)}")
        return
    args = [FUSERMOUNT, "-u"] + (["-z"] if lazy else []) + ["--", mountpoint]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")


def mount_device(mountpoint: str) -> str | None:
    """`major:minor` of the newest mount at `mountpoint` (from /proc/self/mountinfo), if any.
    Never touches the mount itself (only its parent is resolved): the process holding a
    connection nobody serves yet must not wait on it."""
    path = Path(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(path.parent), path.name)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2].decode()
    return found


def _unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    return field.decode("unicode_escape", "replace")


def is_dead_mount(mountpoint: str | Path) -> bool:
    """True for a FUSE mount whose server is gone (every access answers ENOTCONN)."""
    try:
        os.listdir(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def open_abort_file(device: str) -> int | None:
    """A write descriptor of the fusectl `abort` file of mount `device` (`major:minor`; fusectl is
    mounted if needed), or None. Open it while the mount is known to be ours, write through it
    later (`abort_through`): fusectl names connections by the minor of their mount's device, which
    the kernel frees when the mount goes and hands the next FUSE mount of the machine at once (the
    lowest free number). A path opened after our unmount may therefore be another store's, another
    program's connection; a descriptor opened before stays our connection's, and once that is gone
    writing through it does nothing."""
    control = Path("/sys/fs/fuse/connections")
    minor = device.split(":")[1]
    if not (control / minor).exists() and not os.path.ismount(control):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], capture_output=True)
    try:
        return os.open(control / minor / "abort", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("cannot open the abort file of FUSE connection %s: %s", device, e)
        return None


def abort_through(fd: int, device: str) -> None:
    """Abort the FUSE connection whose abort file `fd` is (`open_abort_file`): the last resort for a
    mount that stays busy after its unmount. Closes `fd`."""
    try:
        os.write(fd, b"1")
    except OSError as e:
        log.error("cannot abort FUSE connection %s: %s", device, e)
    finally:
        os.close(fd)
