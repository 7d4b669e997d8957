"""The kernel's FUSE wire format (include/uapi/linux/fuse.h): opcodes, flags and struct layouts.

Only what this store speaks is defined. Every struct is little-endian and 64-bit aligned as the
header says; sizes are checked at import so a typo cannot silently shift a field. Protocol
versions: 7.23 is the oldest minor we accept (Linux 3.15; every kernel containers/storage runs on
is newer); passthrough needs 7.40 (Linux 6.9) and `FUSE_NOTIFY_RESEND` 7.40 too.
"""
from __future__ import annotations

import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 40  # what we implement; the session speaks min(kernel's, ours)
OLDEST_MINOR = 23
ROOT_ID = 1

# -- opcodes -----------------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50
TMPFILE = 51
STATX = 52

OPCODE_NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int) and 0 < v < 100
                and k not in ("KERNEL_MAJOR", "KERNEL_MINOR", "OLDEST_MINOR", "ROOT_ID")}

# -- INIT flags (flags | flags2 << 32) ---------------------------------------------------------
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# -- OPEN reply flags --------------------------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# -- notifications (the `error` field of an out header with unique 0) --------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7

RESEND_BIT = 1 << 63  # set in `unique` of a request the kernel sends again after NOTIFY_RESEND

# -- device ioctls -----------------------------------------------------------------------------
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (229 << 8) | nr


DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, 16)
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)

# -- structs -----------------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_nsec attr_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows with INIT_EXT)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... flags2 max_stack_depth, reserved
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
DIRENT = struct.Struct("<QQII")  # ino off namelen type
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

for _s, _n in ((IN_HEADER, 40), (OUT_HEADER, 16), (ATTR, 88), (ENTRY_OUT_HEAD, 40), (ATTR_OUT_HEAD, 16),
               (INIT_OUT, 64), (OPEN_OUT, 16), (READ_IN, 40), (RELEASE_IN, 24), (STATFS_OUT, 80),
               (DIRENT, 24), (BACKING_MAP, 16), (CREATE_IN, 16)):
    assert _s.size == _n, (_s.format, _s.size, _n)

# The kernel refuses a read buffer smaller than this (FUSE_MIN_READ_BUFFER), and one smaller than
# a header plus `max_write` of data. We never accept writes, so `max_write` stays small.
MIN_READ_BUFFER = 8192
