"""Serving one FUSE connection: read requests from `/dev/fuse`, call `Operations`, write replies.

Why our own loop instead of libfuse: a connection must be able to outlive the process serving it
(restart and upgrade of the store under running containers), and libfuse 3.14 cannot resume a
connection another process initialised (it answers every request with EIO until it has seen an
INIT, which the kernel sends once per mount). Here the negotiated parameters are a small value
(`ConnectionState`) that the next process is given with the descriptor; it then serves the same
mount, and asks the kernel to send again (`FUSE_NOTIFY_RESEND`, Linux 6.9+) whatever its
predecessor had read but not answered. The same loop gives us FUSE passthrough (Linux 6.9+):
an OPEN answered with a backing file lets the kernel read that file directly.

Threads: every worker reads the one descriptor (the kernel hands each request to one reader) and
answers on it; a request that blocks (a fetch from the registry) holds only its worker, and a new
worker is started when none is idle, up to `max_threads`. Workers wait with `epoll` (one woken
per request: `_waiter`) and read non-blockingly, so `stop()` takes effect within `POLL_INTERVAL`
without losing a request: what a worker has read it answers before it checks the flag again.
All workers read the same open file description (no per-thread clones): requests a dead
server had read stay queued on it, where `FUSE_NOTIFY_RESEND` finds them, instead of being
aborted with the clone's release.
A worker counts itself as reading (`_reading`) from before its `read` until the request it read is
counted as being answered: `wait_answered` after `stop()` then also waits for a request read in
the instant the flag was set, so what a hand-over reports (`hand_over_open_files`) includes
every OPEN and RELEASE this process read.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Protocol, Sequence

from . import abi
from .journal import APPLIED_KEPT, OpenFilesJournal

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
_U64 = (1 << 64) - 1


class Abandoned(Exception):
    """Raised while answering a request this process must leave unanswered: the open-file table
    was handed over (`hand_over_open_files`) before the request changed it, so the next process
    must count it, and answer it when the kernel sends it again (FUSE_NOTIFY_RESEND)."""


class FuseError(Exception):
    """Raised by an operation: the request is answered with `errno`."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


class StatLike(Protocol):
    """The attributes a reply needs (`stargz_store.fs.attrs.Attr` has them). `nodeid` is the
    number the kernel names the node by in later requests; `ino` is what stat(2) shows. They
    differ when one file is shown at two places that must not be one kernel inode (a directory
    tree served under two names: the kernel allows a directory one dentry only)."""

    nodeid: int
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int

    @property
    def blocks(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Context:
    """Who asked: the caller's ids as the kernel saw them (in the mount's user namespace)."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class OpenReply:
    """How a file is opened. `backing_fd`: serve it by passthrough from this file (the session
    registers it with the kernel and closes it); `keep_cache`: the page cache stays valid across
    opens (our content never changes)."""

    fh: int = 0
    keep_cache: bool = True
    direct_io: bool = False
    backing_fd: int | None = None


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One listing entry; `attr` None lists the name without attributes (the kernel looks it up
    when it needs it). `offset` is what the kernel hands back to continue after this entry."""

    name: bytes
    offset: int
    attr: StatLike | None = None
    ino: int = 0
    kind: int = 0  # DT_* type when `attr` is None


@dataclass
class ConnectionState:
    """What INIT negotiated: enough for another process to serve the connection."""

    proto_minor: int
    flags: int
    max_readahead: int
    max_write: int
    max_pages: int
    passthrough: bool
    no_open: bool = False  # the first OPEN is answered ENOSYS: the kernel then opens files without asking

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ConnectionState:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class SessionOptions:
    """Cache lifetimes in seconds (our content is immutable: long ones are right)."""

    attr_timeout: float = 3600.0
    entry_timeout: float = 3600.0
    negative_timeout: float = 0.0
    readdirplus: bool = True
    max_pages: int = 256  # largest READ the kernel sends: 1 MiB
    max_readahead: int = 0  # 0: what the kernel offers
    passthrough: bool = False
    min_threads: int = 2
    max_threads: int = 64
    max_write: int = 4096  # we refuse writes; this only sizes the read buffer
    no_open: bool = False  # files need no OPEN: see `_open` (off when passthrough is on: it needs OPEN)
    # Backing files kept registered after their inode's last release, for a cheap re-open
    # (`_claim_kept`): at most this many (each holds a descriptor here and an open file in the
    # kernel), and never more than a quarter of the descriptors this process may open.
    passthrough_keep: int = 0
    debug: bool = False  # log every request and every error answer (at DEBUG level)
    # Called after each answered request with (opcode, its name, seconds taken, errno sent or 0):
    # the daemon's metrics. Must be quick and must not raise.
    observe: Callable[[int, str, float, int], None] | None = None


class Operations(Protocol):
    """What the session calls, by inode number (`abi.ROOT_ID` is the root). Every method may raise
    `FuseError`; any other exception is logged and answered with EIO."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> StatLike: ...

    def forget(self, ino: int, nlookup: int) -> None: ...

    def getattr(self, ctx: Context, ino: int) -> StatLike: ...

    def readlink(self, ctx: Context, ino: int) -> bytes: ...

    def open(self, ctx: Context, ino: int, flags: int, *, backing: bool = True) -> OpenReply: ...
    # `backing` False: the session already holds a checked backing file for this inode (a kept
    # registration), so none is looked for or opened (`OpenReply.backing_fd` stays None).

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes | memoryview: ...

    def release(self, ino: int, fh: int) -> None: ...

    def opendir(self, ctx: Context, ino: int) -> OpenReply: ...

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> Sequence[DirEntry]: ...

    def releasedir(self, ino: int, fh: int) -> None: ...

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes: ...

    def listxattr(self, ctx: Context, ino: int) -> Iterable[bytes]: ...

    def statfs(self, ctx: Context, ino: int) -> tuple[int, int, int]: ...  # (bsize, namelen, frsize)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int) -> None: ...

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None: ...

    def refuse_write(self, ctx: Context, ino: int, name: bytes | None) -> None: ...


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


class Session:
    """One served connection. `state=None`: a fresh mount, INIT is expected first; otherwise the
    connection was initialised by an earlier process and `state` is what it negotiated."""

    def __init__(self, fd: int, ops: Operations, options: SessionOptions | None = None,
                 state: ConnectionState | None = None) -> None:
        self.fd = fd
        self.ops = ops
        self.options = options or SessionOptions()
        self.state = state
        self.initialized = threading.Event()
        if state is not None:
            self.initialized.set()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # readable once stopped
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._workers = 0
        self._idle = 0
        self._busy = 0
        self._answering: dict[int, int] = {}  # opcode -> requests of it being answered
        self._reading = 0  # workers between their last look at the stop flag and counting what they read
        self._answered = threading.Condition(self._lock)
        self._backing: dict[int, list[int]] = {}  # ino -> [backing id, files open by passthrough]
        self._cached: dict[int, int] = {}  # ino -> files open through the page cache (passthrough on)
        self._backing_lock = threading.Lock()
        self._backing_refused = False  # the kernel refused BACKING_OPEN for lack of privilege
        # Registrations whose backing file we hold a descriptor of (`_claim_kept`): of inodes open
        # by passthrough (ino -> Kept), and kept after their last release, oldest first.
        self._held: dict[int, Kept] = {}
        self._kept: OrderedDict[int, Kept] = OrderedDict()
        self._keep = _keep_limit(self.options.passthrough_keep)
        self.kept_reopens = 0  # opens answered with a kept registration (no backing file opened)
        self._applied: dict[int, None] = {}  # uniques of OPENs/RELEASEs counted (a resent one is not counted again)
        self._handed_over = False  # the open-file table went to the next process: OPENs/RELEASEs are left to it
        self.journal: OpenFilesJournal | None = None  # `adopt_open_files`
        self.passthrough_opens = 0  # backing ids registered (inodes put in passthrough mode)
        self.read_requests = 0
        self._entry_valid = _split_seconds(self.options.entry_timeout)
        self._attr_valid = _split_seconds(self.options.attr_timeout)
        self._negative_valid = _split_seconds(self.options.negative_timeout)
        self._buffer_size = max(abi.MIN_READ_BUFFER, 4096 + self.options.max_write, 64 << 10)
        self.on_init: Callable[[ConnectionState], None] | None = None
        self.requests = 0
        self._handlers: dict[int, Callable[[int, Context, int, memoryview], None]] = self._handler_table()
        os.set_blocking(fd, False)

    # -- running -------------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until unmounted, aborted or `stop()`ped. Returns once every worker has ended,
        having let go of the registrations it kept (`_claim_kept`: no other process knows them)."""
        with self._lock:
            for _ in range(max(1, self.options.min_threads)):
                self._start_worker()
        self._ended.wait()
        self._drop_kept()

    def stop(self) -> None:
        """Stop reading requests; those being answered are answered first (see `wait_stopped`).
        Idle workers wake at once (the wake pipe), so a hand-over does not wait a poll interval."""
        if not self._stop.is_set():
            self._stop.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # already closed: every worker has ended

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until every worker has ended; then the kept registrations are let go of (as at
        the end of `serve`, which may return after a hand-over has already moved on)."""
        if not self._ended.wait(timeout):
            return False
        self._drop_kept()
        return True

    def wait_answered(self, timeout: float | None, but: Iterable[int] = ()) -> bool:
        """Wait until no request is being answered, apart from those with an opcode in `but`
        (after `stop()`: then no new one is read). False if some still are after `timeout`."""
        skip = set(but)
        with self._lock:
            return self._answered.wait_for(
                lambda: not self._reading and not any(n for op, n in self._answering.items() if op not in skip),
                timeout)

    def answering(self, opcode: int) -> int:
        """Requests with `opcode` being answered right now."""
        return self._answering.get(opcode, 0)

    @property
    def busy(self) -> int:
        """Requests being answered right now."""
        return self._busy

    def _start_worker(self) -> None:
        self._workers += 1
        self._idle += 1
        threading.Thread(target=self._worker, name=f"fuse-{self._workers}", daemon=True).start()

    def _worker(self) -> None:
        buf = bytearray(self._buffer_size)
        view = memoryview(buf)
        poller = _waiter(self.fd, self._wake_r)
        try:
            while not self._stop.is_set():
                try:
                    ready = [(fd, ev) for fd, ev in poller.poll(POLL_INTERVAL) if fd == self.fd]
                    if not ready or self._stop.is_set():
                        continue
                    if ready[0][1] & (select.EPOLLERR | select.EPOLLHUP):
                        self._ended_by_kernel("the connection was closed")
                        return
                    with self._lock:
                        if self._stop.is_set():
                            continue
                        self._reading += 1
                    try:
                        n = os.readv(self.fd, [buf])
                    except BaseException:
                        with self._lock:
                            self._reading -= 1
                            self._answered.notify_all()
                        raise
                except BlockingIOError:
                    continue  # another worker took the request
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                        continue
                    if e.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
                        self._ended_by_kernel(os.strerror(e.errno))
                        return
                    raise
                opcode = abi.IN_HEADER.unpack_from(view)[1] if n >= abi.IN_HEADER.size else 0
                with self._lock:
                    self._reading -= 1
                    self._idle -= 1
                    self._busy += 1
                    self._answering[opcode] = self._answering.get(opcode, 0) + 1
                    if self._idle == 0 and self._workers < self.options.max_threads:
                        self._start_worker()
                try:
                    self._handle(view[:n])
                finally:
                    with self._lock:
                        self._idle += 1
                        self._busy -= 1
                        self._answering[opcode] -= 1
                        self._answered.notify_all()
        except Exception:
            log.exception("FUSE worker failed")
        finally:
            poller.close()
            with self._lock:
                self._workers -= 1
                self._idle -= 1
                if self._workers == 0:
                    self._ended.set()
                    for fd in (self._wake_r, self._wake_w):
                        os.close(fd)
                    self._wake_r = self._wake_w = -1

    def _ended_by_kernel(self, why: str) -> None:
        if not self._stop.is_set():
            log.info("FUSE connection ended: %s", why)
        self.stop()

    # -- one request ---------------------------------------------------------------------------

    def _handle(self, request: memoryview) -> None:
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = abi.IN_HEADER.unpack_from(request)
        self.requests += 1
        body = request[abi.IN_HEADER.size : length]
        if extlen:
            body = body[: len(body) - extlen * 8]
        handler = self._handlers.get(opcode)
        if not self.initialized.is_set() and opcode != abi.INIT:
            self._reply_error(unique, errno.EIO)
            return
        if handler is None:
            self._reply_error(unique, errno.ENOSYS)
            return
        if self.options.debug:
            log.debug("FUSE %s node %d uid %d pid %d", abi.OPCODE_NAMES.get(opcode, opcode), nodeid, uid, pid)
        observe = self.options.observe
        began = time.monotonic() if observe is not None else 0.0
        code = 0
        try:
            handler(unique, Context(uid, gid, pid), nodeid, body)
        except Abandoned:
            log.info("FUSE %s node %d left to the next server (the open files were handed over before it was "
                     "counted)", abi.OPCODE_NAMES.get(opcode, opcode), nodeid)
        except FuseError as e:
            if self.options.debug:
                log.debug("FUSE %s node %d: %s", abi.OPCODE_NAMES.get(opcode, opcode), nodeid, errno.errorcode.get(e.errno, e.errno))
            code = e.errno
            self._reply_error(unique, e.errno)
        except Exception:
            log.exception("FUSE %s on node %d failed", abi.OPCODE_NAMES.get(opcode, opcode), nodeid)
            code = errno.EIO
            self._reply_error(unique, errno.EIO)
        finally:
            if observe is not None:
                observe(opcode, abi.OPCODE_NAMES.get(opcode, str(opcode)), time.monotonic() - began, code)

    def _reply(self, unique: int, *parts: bytes | memoryview) -> bool:
        """Send an answer; False when the caller was interrupted and gave up (ENOENT)."""
        total = abi.OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [abi.OUT_HEADER.pack(total, 0, unique), *parts])
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            return False
        return True

    def _reply_error(self, unique: int, code: int) -> None:
        try:
            os.write(self.fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -code, unique))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def _attr(self, a: StatLike) -> bytes:
        sec, nsec = divmod(a.mtime_ns, 1_000_000_000)
        sec &= _U64  # times before 1970: the kernel reads the field back as a signed 64-bit number
        return abi.ATTR.pack(a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec,
                             a.mode, a.nlink, a.uid, a.gid, a.rdev, 4096, 0)

    def _entry(self, a: StatLike) -> bytes:
        ev, evn = self._entry_valid
        av, avn = self._attr_valid
        return abi.ENTRY_OUT_HEAD.pack(a.nodeid, 0, ev, av, evn, avn) + self._attr(a)

    # -- handlers ------------------------------------------------------------------------------

    def _handler_table(self) -> dict[int, Callable[[int, Context, int, memoryview], None]]:
        refused = (abi.SETATTR, abi.MKDIR, abi.MKNOD, abi.UNLINK, abi.SYMLINK, abi.LINK, abi.RENAME, abi.RENAME2,
                   abi.SETXATTR, abi.REMOVEXATTR, abi.WRITE, abi.FALLOCATE, abi.TMPFILE)
        table = {
            abi.INIT: self._init,
            abi.LOOKUP: self._lookup,
            abi.FORGET: self._forget,
            abi.BATCH_FORGET: self._batch_forget,
            abi.GETATTR: self._getattr,
            abi.READLINK: self._readlink,
            abi.OPEN: self._open,
            abi.READ: self._read,
            abi.RELEASE: self._release,
            abi.OPENDIR: self._opendir,
            abi.READDIR: self._readdir,
            abi.READDIRPLUS: self._readdir,
            abi.RELEASEDIR: self._releasedir,
            abi.GETXATTR: self._getxattr,
            abi.LISTXATTR: self._listxattr,
            abi.STATFS: self._statfs,
            abi.CREATE: self._create,
            abi.RMDIR: self._rmdir,
            abi.FLUSH: self._enosys,  # the kernel stops sending FLUSH at every close
            abi.FSYNC: self._ok,
            abi.FSYNCDIR: self._ok,
            abi.INTERRUPT: self._no_reply,
            abi.DESTROY: self._destroy,
            abi.IOCTL: self._ioctl_unsupported,
        }
        for op in refused:
            table[op] = self._refuse
        return table

    def _init(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        major, minor, max_readahead, flags = abi.INIT_IN.unpack_from(body)
        if major != abi.KERNEL_MAJOR:
            log.error("kernel FUSE protocol %d.%d is not supported", major, minor)
            self._reply_error(unique, errno.EPROTO)
            return
        if minor < abi.OLDEST_MINOR:
            log.error("kernel FUSE protocol 7.%d is older than 7.%d", minor, abi.OLDEST_MINOR)
            self._reply_error(unique, errno.EPROTO)
            return
        if flags & abi.INIT_EXT and len(body) >= abi.INIT_IN.size + 4:
            flags |= int.from_bytes(body[abi.INIT_IN.size : abi.INIT_IN.size + 4], "little") << 32
        opts = self.options
        want = abi.ASYNC_READ | abi.BIG_WRITES | abi.PARALLEL_DIROPS | abi.MAX_PAGES | abi.CACHE_SYMLINKS
        want |= abi.ABORT_ERROR | abi.INIT_EXT
        if opts.readdirplus:
            want |= abi.DO_READDIRPLUS  # always plus: see `_readdir`
        passthrough = opts.passthrough and bool(flags & abi.PASSTHROUGH) and minor >= 40
        if passthrough:
            want |= abi.PASSTHROUGH
        elif opts.passthrough:
            log.warning("FUSE passthrough is not offered by this kernel (protocol 7.%d): reads go through the store",
                        minor)
        want &= flags
        # No OPEN round trip per file: the kernel offers it (NO_OPEN_SUPPORT) and takes an ENOSYS
        # answer to the first OPEN as "never ask again" (it then keeps the page cache, as
        # FOPEN_KEEP_CACHE would). Passthrough needs an OPEN per file to hand over its backing file.
        no_open = opts.no_open and bool(flags & abi.NO_OPEN_SUPPORT) and not passthrough
        proto_minor = min(minor, abi.KERNEL_MINOR)
        readahead = min(max_readahead, opts.max_readahead) if opts.max_readahead else max_readahead
        state = ConnectionState(proto_minor, want, readahead, opts.max_write, opts.max_pages, passthrough, no_open)
        out = abi.INIT_OUT.pack(
            abi.KERNEL_MAJOR, proto_minor, readahead, want & 0xFFFFFFFF, 16, 12, opts.max_write, 1,
            opts.max_pages, 0, want >> 32, 1 if passthrough else 0,
        )
        self.state = state
        self._reply(unique, out)
        self.initialized.set()
        log.info("FUSE protocol 7.%d (kernel 7.%d), passthrough %s, no_open %s", proto_minor, minor,
                 "on" if passthrough else "off", "on" if no_open else "off")
        if self.on_init is not None:
            self.on_init(state)

    def _lookup(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        name = bytes(body[:-1]) if body and body[-1] == 0 else bytes(body)
        try:
            attr = self.ops.lookup(ctx, nodeid, name)
        except FuseError as e:
            if e.errno == errno.ENOENT and self.options.negative_timeout > 0:
                nv, nvn = self._negative_valid
                self._reply(unique, abi.ENTRY_OUT_HEAD.pack(0, 0, nv, 0, nvn, 0), bytes(abi.ATTR.size))
                return
            raise
        self._reply(unique, self._entry(attr))

    def _forget(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        (nlookup,) = abi.FORGET_IN.unpack_from(body)
        self.ops.forget(nodeid, nlookup)

    def _batch_forget(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
        for i in range(count):
            ino, nlookup = abi.FORGET_ONE.unpack_from(body, abi.BATCH_FORGET_IN.size + i * abi.FORGET_ONE.size)
            self.ops.forget(ino, nlookup)

    def _getattr(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        av, avn = self._attr_valid
        self._reply(unique, abi.ATTR_OUT_HEAD.pack(av, avn, 0), self._attr(self.ops.getattr(ctx, nodeid)))

    def _readlink(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        self._reply(unique, self.ops.readlink(ctx, nodeid))

    def _open(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        passthrough = self.state is not None and self.state.passthrough
        kept = self._claim_kept(nodeid) if passthrough and self._kept else None
        try:
            # Its refusals (EROFS, EACCES...) still answer this open.
            opened = self.ops.open(ctx, nodeid, flags, backing=kept is None)
        except BaseException:
            if kept is not None:
                self._keep_registration(nodeid, kept)
            raise
        if self.state is not None and self.state.no_open:
            if opened.backing_fd is not None:
                os.close(opened.backing_fd)
            self.ops.release(nodeid, opened.fh)
            raise FuseError(errno.ENOSYS)  # success, and no OPEN (nor RELEASE) for any later open
        if passthrough:
            try:
                open_flags, backing_id = self._open_mode(nodeid, opened, unique, kept)
            except Abandoned:
                self.ops.release(nodeid, opened.fh)
                raise
        else:
            if opened.backing_fd is not None:
                os.close(opened.backing_fd)
            open_flags, backing_id = self._cache_flags(opened), 0
        if not self._reply(unique, abi.OPEN_OUT.pack(opened.fh, open_flags, backing_id)):
            # No such request any more (ENOENT): the kernel does not give up on an OPEN it sent
            # us (it waits for the answer even when the caller is killed), so it was sent again
            # (`notify_resend`: the same unique with RESEND_BIT) and that copy is answered. The
            # count stays: the copy finds this open counted (`_counted_before`).
            self.ops.release(nodeid, opened.fh)

    @staticmethod
    def _cache_flags(opened: OpenReply) -> int:
        return (abi.FOPEN_KEEP_CACHE if opened.keep_cache else 0) | (abi.FOPEN_DIRECT_IO if opened.direct_io else 0)

    def _open_mode(self, ino: int, opened: OpenReply, unique: int, kept: Kept | None = None) -> tuple[int, int]:
        """(open flags, backing id) of an open while passthrough is on. The kernel wants every
        open file of an inode in one mode (fs/fuse/iomode.c): while some are open by passthrough,
        every further open must name the same backing id (another one is EBUSY, a cached open
        EIO); while some are open through the page cache, a passthrough open is ETXTBSY. So the
        mode of an inode is decided at its first open and kept until its last release; the open
        files per inode and mode are counted here (and handed over to a successor: `hand_over_open_files`).
        An OPEN counted already (`_counted_before`: a resent copy) is answered in the inode's mode
        without counting it again. `kept`: a registration claimed for this open (`_claim_kept`),
        used when the inode has no open file, let go of otherwise."""
        fd = opened.backing_fd
        try:
            with self._backing_lock:
                if self._handed_over:
                    raise Abandoned()
                held = self._backing.get(ino)
                again = self._counted_before(unique)
                if again and (held is not None or self._cached.get(ino)):
                    return (abi.FOPEN_PASSTHROUGH, held[0]) if held is not None else (self._cache_flags(opened), 0)
                if held is not None:
                    held[1] += 1
                    self._note(ino, unique, held[0], 1, 0)
                    return abi.FOPEN_PASSTHROUGH, held[0]  # the kernel refuses KEEP_CACHE with it
                if kept is not None and not self._cached.get(ino):
                    kept, reused = None, kept
                    self._backing[ino] = [reused.backing_id, 1]
                    self._held[ino] = reused
                    self.kept_reopens += 1
                    self._note(ino, unique, reused.backing_id, 1, 0)
                    return abi.FOPEN_PASSTHROUGH, reused.backing_id
                if fd is not None and not self._cached.get(ino) and not self._backing_refused:
                    try:
                        backing_id = _ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, abi.BACKING_MAP.pack(fd, 0, 0))
                    except OSError as e:
                        self._backing_failed(ino, e)
                    else:
                        self._backing[ino] = [backing_id, 1]
                        self.passthrough_opens += 1
                        self._note(ino, unique, backing_id, 1, 0)
                        if len(self._held) < self._keep:  # room, the oldest kept let go of if need be
                            self._held[ino] = Kept(backing_id, fd, _identity(os.fstat(fd)))
                            fd = None  # kept open: a re-open after the last release checks it (`_claim_kept`)
                            self._trim_kept()
                        return abi.FOPEN_PASSTHROUGH, backing_id
                self._cached[ino] = self._cached.get(ino, 0) + 1
                self._note(ino, unique, 0, 0, 1)
                return self._cache_flags(opened), 0
        finally:
            if fd is not None:
                os.close(fd)  # the kernel holds its own reference once registered
            if kept is not None:  # claimed but not used (the inode was opened meanwhile)
                self._let_go(kept)

    def _claim_kept(self, ino: int) -> Kept | None:
        """The registration kept for `ino` after its last release, taken out of the kept set for
        this open, if its backing file is unchanged. Why keep them: a re-open then costs no
        lookup, open or check of the copy by path and no BACKING_OPEN (nor a BACKING_CLOSE at its
        release), which are most of what an OPEN of a cached file costs. What still holds
        (README "Security model"): the copy is checked at every open, here by `fstat` of the
        descriptor kept of it against what it was when it was opened and checked by path; a
        write, truncation, `chmod`, `touch`, or a removal or replacement of its name (the link
        count drops) changes that, and the registration is then let go of and the open goes the
        long way (`Operations.open` looks the copy up and checks it against its record)."""
        with self._backing_lock:
            kept = self._kept.pop(ino, None)
        if kept is None:
            return None
        try:
            unchanged = _identity(os.fstat(kept.fd)) == kept.identity
        except OSError:
            unchanged = False
        if unchanged:
            return kept
        log.info("backing file of inode %d changed since it was checked: it is looked up again", ino)
        self._let_go(kept)
        return None

    def _keep_registration(self, ino: int, kept: Kept) -> None:
        """Put `kept` (newest) into the kept set, letting go of the oldest beyond the limit."""
        with self._backing_lock:
            previous = self._kept.pop(ino, None)
            self._kept[ino] = kept
            if previous is not None:
                self._let_go(previous)
            self._trim_kept()

    def _trim_kept(self) -> None:
        """Let go of the oldest kept registrations beyond the limit (under `_backing_lock`)."""
        while len(self._held) + len(self._kept) > self._keep and self._kept:
            self._let_go(self._kept.popitem(last=False)[1])

    def _let_go(self, kept: Kept) -> None:
        """Unregister a backing id nobody uses and close its descriptor."""
        try:
            _ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, kept.backing_id.to_bytes(4, "little"))
        except OSError as e:
            log.debug("closing backing id %d: %s", kept.backing_id, e.strerror)
        os.close(kept.fd)

    def _drop_kept(self) -> None:
        """Let go of every kept registration, and close the descriptors held of registrations in
        use (their ids are handed over with `hand_over_open_files`; the kernel holds its own references).
        Under the lock throughout: a caller of `wait_stopped` may close the FUSE descriptor as
        soon as it returns, so this must be done by then, whichever thread did it."""
        with self._backing_lock:
            while self._kept:
                self._let_go(self._kept.popitem()[1])
            while self._held:
                os.close(self._held.popitem()[1].fd)

    def _backing_failed(self, ino: int, error: OSError) -> None:
        # EPERM: not CAP_SYS_ADMIN in the initial namespace; ELOOP: the copies are on a stacked
        # filesystem (overlayfs: the store's root inside a container), deeper than the one level
        # we declare (max_stack_depth 1, so that overlayfs can still stack on this mount). Every
        # copy is alike: stop asking.
        if error.errno in (errno.EPERM, errno.EACCES, errno.ELOOP):
            self._backing_refused = True
            log.warning("FUSE passthrough refused by the kernel (%s): every file is served by the store",
                        error.strerror)
        else:  # EINVAL...: this file only
            log.info("passthrough of inode %d refused by the kernel (%s): served by the store", ino, error.strerror)

    def _counted_before(self, unique: int) -> bool:
        """Whether the change of the open files that request `unique` makes was counted already:
        by a copy of it (the kernel sends a request again, with RESEND_BIT, when asked to by
        `notify_resend`; a copy and its original may both be answered, by this process or by a
        dead predecessor whose journal we replayed). Under `_backing_lock`."""
        return bool(unique) and (unique & ~abi.RESEND_BIT) in self._applied

    def _closed(self, ino: int, unique: int) -> None:
        """One open file of `ino` is gone: the last one by passthrough lets go of its backing id.
        `unique`: the RELEASE; one counted before (`_counted_before`) is not counted again."""
        with self._backing_lock:
            if self._handed_over:
                raise Abandoned()
            if self._counted_before(unique):
                return
            held = self._backing.get(ino)
            if held is not None:
                held[1] -= 1
                self._note(ino, unique, held[0], -1, 0)
                if held[1] <= 0:
                    del self._backing[ino]
                    kept = self._held.pop(ino, None)
                    if kept is not None and kept.backing_id == held[0]:
                        self._kept[ino] = kept  # a re-open may use it (`_claim_kept`)
                        self._trim_kept()
                        return
                    if kept is not None:
                        os.close(kept.fd)
                    try:
                        _ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, held[0].to_bytes(4, "little"))
                    except OSError as e:
                        log.debug("closing backing id %d: %s", held[0], e.strerror)
                return
            count = self._cached.get(ino, 0)
            if count:
                self._note(ino, unique, 0, 0, -1)
            if count > 1:
                self._cached[ino] = count - 1
            elif count:
                del self._cached[ino]

    def _note(self, ino: int, unique: int, backing_id: int, passthrough: int, through_cache: int) -> None:
        """Journal one change of the open files (under `_backing_lock`), before it is answered."""
        unique &= ~abi.RESEND_BIT
        if unique:
            self._applied[unique] = None
            if len(self._applied) > 2 * APPLIED_KEPT:
                for old in list(self._applied)[:APPLIED_KEPT]:
                    del self._applied[old]
        journal = self.journal
        if journal is not None and journal.note(ino, unique, backing_id, passthrough, through_cache):
            journal.rewrite(self._open_files())

    def hand_over_open_files(self) -> dict[str, list]:
        """The open files per inode and mode (`_open_mode`), for the process taking over after
        `stop()`: it must answer further opens of these inodes in the same mode, with the same
        backing ids (which belong to the connection, not to this process). From now on no OPEN or
        RELEASE is counted or answered here (`Abandoned`). Why: one still being answered when the
        hand-over could not wait any longer (`drained` false) would otherwise change this table
        after its copy was taken, and be answered: the next process, never told, would count the
        files of that inode one off (one too many: its backing id is never let go of; one too few:
        it lets go of it while the kernel still reads through it). Left unanswered, the kernel
        sends it again to the next process (FUSE_NOTIFY_RESEND), which counts it."""
        with self._backing_lock:
            self._handed_over = True
            return self._open_files()

    def _open_files(self) -> dict[str, list]:
        return {"backing": [[ino, bid, n] for ino, (bid, n) in self._backing.items()],
                "cached": [[ino, n] for ino, n in self._cached.items()],
                "applied": list(self._applied)[-APPLIED_KEPT:]}

    def passthrough_stats(self) -> dict[str, int]:
        with self._backing_lock:
            return {"passthrough_opens": self.passthrough_opens, "read_requests": self.read_requests,
                    "passthrough_inodes": len(self._backing), "cached_inodes": len(self._cached),
                    "kept_backing": len(self._kept), "kept_reopens": self.kept_reopens}

    def adopt_open_files(self, files: dict[str, list] | None, journal: OpenFilesJournal | None = None) -> None:
        """Take over a predecessor's `hand_over_open_files()` (before serving); from now on every change
        is also appended to `journal` (started over with this table), for a successor after a crash."""
        with self._backing_lock:
            for ino, bid, n in (files or {}).get("backing", ()):
                self._backing[int(ino)] = [int(bid), int(n)]
            for ino, n in (files or {}).get("cached", ()):
                self._cached[int(ino)] = int(n)
            for unique in (files or {}).get("applied", ()):
                self._applied[int(unique)] = None
            if journal is not None:
                journal.rewrite(self._open_files())
                self.journal = journal

    def _read(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        fh, offset, size = abi.READ_IN.unpack_from(body)[:3]
        self.read_requests += 1
        self._reply(unique, self.ops.read(ctx, nodeid, fh, offset, size))

    def _release(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        (fh,) = abi.RELEASE_IN.unpack_from(body)[:1]
        if self.state is not None and self.state.passthrough:
            self._closed(nodeid, unique)
        self.ops.release(nodeid, fh)
        self._reply(unique)

    def _opendir(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        """`keep_cache`: the kernel may cache the listing across opens (an immutable directory);
        without it every opendir lists afresh (a directory whose entries come and go)."""
        opened = self.ops.opendir(ctx, nodeid)
        flags = abi.FOPEN_KEEP_CACHE | abi.FOPEN_CACHE_DIR if opened.keep_cache else 0
        self._reply(unique, abi.OPEN_OUT.pack(opened.fh, flags, 0))

    def _readdir(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        """READDIR and READDIRPLUS. With plus, an entry that has attributes is sent complete:
        the kernel makes it a dentry with cached attributes (one LOOKUP saved per file of a walk)
        and counts it as a lookup, to be forgotten later like one."""
        fh, offset, size = abi.READ_IN.unpack_from(body)[:3]
        plus = self.state is not None and bool(self.state.flags & abi.DO_READDIRPLUS)
        parts: list[bytes] = []
        used = 0
        for entry in self.ops.readdir(ctx, nodeid, fh, offset):
            attr = entry.attr
            ino = attr.ino if attr is not None else entry.ino
            kind = (attr.mode >> 12) & 0xF if attr is not None else entry.kind
            name = entry.name
            record = abi.DIRENT.pack(ino, entry.offset, len(name), kind) + name
            record += b"\0" * (-len(record) % 8)
            if plus:
                if attr is not None and name not in (b".", b".."):
                    record = self._entry(attr) + record
                else:
                    record = bytes(abi.ENTRY_OUT_HEAD.size + abi.ATTR.size) + record
            if used + len(record) > size:
                break
            parts.append(record)
            used += len(record)
        self._reply(unique, b"".join(parts))

    def _releasedir(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        (fh,) = abi.RELEASE_IN.unpack_from(body)[:1]
        self.ops.releasedir(nodeid, fh)
        self._reply(unique)

    def _getxattr(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        name = bytes(body[abi.GETXATTR_IN.size :]).rstrip(b"\0")
        value = self.ops.getxattr(ctx, nodeid, name)
        self._reply_sized(unique, size, value)

    def _listxattr(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        names = b"".join(n + b"\0" for n in self.ops.listxattr(ctx, nodeid))
        self._reply_sized(unique, size, names)

    def _reply_sized(self, unique: int, size: int, value: bytes) -> None:
        """xattr replies: size 0 asks for the length only; a short buffer is ERANGE."""
        if size == 0:
            self._reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            self._reply_error(unique, errno.ERANGE)
        else:
            self._reply(unique, value)

    def _statfs(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        bsize, namelen, frsize = self.ops.statfs(ctx, nodeid)
        self._reply(unique, abi.STATFS_OUT.pack(0, 0, 0, 0, 0, bsize, namelen, frsize, 0))

    def _create(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        flags, mode, _umask, _ = abi.CREATE_IN.unpack_from(body)
        name = bytes(body[abi.CREATE_IN.size :]).split(b"\0", 1)[0]
        self.ops.create(ctx, nodeid, name, mode, flags)
        raise FuseError(errno.EROFS)  # `create` raises its own answer; never create anything

    def _rmdir(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        self.ops.rmdir(ctx, nodeid, bytes(body).split(b"\0", 1)[0])
        self._reply(unique)

    def _refuse(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        self.ops.refuse_write(ctx, nodeid, None)
        raise FuseError(errno.EROFS)

    def _ok(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        self._reply(unique)

    def _enosys(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        raise FuseError(errno.ENOSYS)

    def _no_reply(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        """INTERRUPT: our requests are short or bounded by their own timeouts; nothing to do."""

    def _ioctl_unsupported(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        """No ioctl is ours (Python's `open()` asks isatty() of every file: TCGETS lands here)."""
        raise FuseError(errno.ENOTTY)

    def _destroy(self, unique: int, ctx: Context, nodeid: int, body: memoryview) -> None:
        self._reply(unique)
        self.stop()

    # -- notifications -------------------------------------------------------------------------

    def notify_resend(self) -> bool:
        """Ask the kernel to send again every request that was read but not answered (by a
        process that died or was replaced). True if the kernel supports it (Linux 6.9+)."""
        try:
            os.write(self.fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, abi.NOTIFY_RESEND, 0))
        except OSError as e:
            log.info("FUSE_NOTIFY_RESEND not supported here (%s): requests read by a dead server are lost", e.strerror)
            return False
        return True

    def notify_inval_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget name `name` under `parent` (a node that changed meaning)."""
        payload = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        try:
            os.writev(self.fd, [abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), abi.NOTIFY_INVAL_ENTRY, 0), payload])
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("inval_entry %d/%r: %s", parent, name, e.strerror)


@dataclass(frozen=True, slots=True)
class Kept:
    """A registered backing file this process holds a descriptor of (`Session._claim_kept`):
    `identity` is what `fstat` said of it when it was registered, just after its owner checked it."""

    backing_id: int
    fd: int
    identity: tuple[int, ...]


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What a change of a file would change: size, times, inode, device, mode, link count."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_mode, st.st_nlink)


def _waiter(fuse_fd: int, wake_fd: int) -> select.epoll:
    """A worker's wait for a request (or for `stop`). Exclusive (`EPOLLEXCLUSIVE`, Linux 4.5+):
    the kernel wakes one idle worker per request queued, not every one (a plain `poll` on the
    shared descriptor woke them all: one context switch per idle worker per request, ~6 per
    request in a warm walk). The wake pipe is not exclusive: `stop` wakes them all."""
    poller = select.epoll()
    try:
        poller.register(fuse_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    except OSError:
        poller.register(fuse_fd, select.EPOLLIN)
    poller.register(wake_fd, select.EPOLLIN)
    return poller


def _keep_limit(wanted: int) -> int:
    """`SessionOptions.passthrough_keep`, at most a quarter of this process's descriptor limit."""
    if wanted <= 0:
        return 0
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    return wanted if soft == resource.RLIM_INFINITY else max(0, min(wanted, soft // 4))


CAP_SYS_ADMIN = 21


def passthrough_permitted() -> bool:
    """Whether this process may register backing files (`FUSE_DEV_IOC_BACKING_OPEN` wants
    CAP_SYS_ADMIN in the initial user namespace, Linux 6.9-6.18 at least): a rootless store may
    not, and then keeps `no_open` instead of asking the kernel for passthrough it cannot use."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
                    break
            else:
                return False
        with open("/proc/self/uid_map") as f:
            initial_namespace = f.read().split() == ["0", "0", "4294967295"]
    except (OSError, ValueError):
        return False
    return bool(effective >> CAP_SYS_ADMIN & 1) and initial_namespace


def _ioctl(fd: int, request: int, arg: bytes) -> int:
    """An ioctl whose result is its return value: `fcntl.ioctl` returns the system call's result
    when handed a mutable buffer (raises OSError on failure)."""
    return fcntl.ioctl(fd, request, bytearray(arg), True)
