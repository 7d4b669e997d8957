"""`stargz-store [--config PATH] [--root DIR] [--log-level LEVEL] [--create-mountpoint] MOUNTPOINT`: the store daemon.

Same flags and defaults as the Go stargz-store (`-flag` and `--flag`, with `=` or a space), so
units and scripts can switch. Exit codes: 0 after a clean unmount (SIGINT/SIGTERM), 1 when the
mount fails, 2 for usage, configuration, lock or mountpoint problems.

Memory: glibc gives every thread that allocates its own malloc arena (up to 8 per core), and
freed chunk buffers stay in them; with a dozen FUSE and fetch threads a daemon that read a few
hundred MB held ~400 MB it no longer used. `tune_malloc` caps the arenas at startup (before any
worker thread exists) and `MemoryTrimmer` hands free heap pages back to the kernel after busy
periods. Both are no-ops on a libc without them (musl).

Privacy: the data root holds image metadata, counters and cached layer bytes of every image
(including files other users may not read through the mount), so it is 0700 (an existing wider
one is tightened at start) and the daemon runs with umask 077 once the mountpoint exists, so
everything it creates under the root is its own alone.

Counters: SIGUSR1 writes `<root>/stats.json` (atomically). Signals are handled by `Lifecycle`.
Once mounted, `main` ends the process with `os._exit` after unmounting: worker threads may still
be inside registry requests, and a stopping daemon must not wait for their timeouts.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from .config import DEFAULT_CONFIG_PATH, ConfigError, StoreConfig, load_config
from .control import SOCKET_NAME as CONTROL_SOCKET_NAME
from .control_ops import start_control_socket

if TYPE_CHECKING:
    from ..cache.chunk_cache import ChunkCache

log = logging.getLogger("stargz_store.daemon")

DEFAULT_ROOT = "/var/lib/stargz-store"
EXIT_OK, EXIT_MOUNT_FAILED, EXIT_USAGE = 0, 1, 2
LOCK_NAME = "stargz-store.lock"
ROOT_MODE = 0o700
PRIVATE_UMASK = 0o077
LOOP_ENDED_WITH_ERROR = 8
_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL,
}


class StartupError(Exception):
    """Something that stops the daemon before it mounts; the message is for the operator."""


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags; its help is the whole program's overview (the commands of `stargz_store.cli`)."""
    from ..cli import PROG, overview, package_version

    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [flags] MOUNTPOINT\n       {PROG} COMMAND [flags] ...\n       {PROG} --version",
        description="Lazy-pulling Additional Layer Store for Podman and CRI-O (eStargz, zstd:chunked).\n\n" + overview(),
        epilog=f"`{PROG} COMMAND --help` shows a command's own flags. The daemon exits 0 after a clean unmount,\n"
        "1 when the mount fails, 2 for usage, configuration, lock or mountpoint problems.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", "-version", action="version", version=f"{PROG} {package_version()}")
    parser.add_argument("--config", "-config", default=None, metavar="PATH",
                        help=f"TOML config (default {DEFAULT_CONFIG_PATH}; missing there = all defaults)")
    parser.add_argument("--root", "-root", default=DEFAULT_ROOT, metavar="DIR",
                        help=f"data directory: cache, metadata, lock (default {DEFAULT_ROOT})")
    parser.add_argument("--log-level", "-log-level", default="info", choices=sorted(_LEVELS), metavar="LEVEL",
                        help=f"one of {', '.join(sorted(_LEVELS))} (default info)")
    parser.add_argument("--addr", "-addr", default=None, metavar="SOCKET", 
                        help="control socket for stargz-store-helper and commands (default ROOT/store.sock)")
    parser.add_argument("--create-mountpoint", "-create-mountpoint", action="store_true",
                        help="create MOUNTPOINT (and its parents) if it does not exist")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT",
                        help="an existing directory to mount the store on (see --create-mountpoint)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags and a MOUNTPOINT that is an existing directory, or may be created (exit 2 otherwise).

    A word that is not a directory is refused here, before anything is created: `stargz-store
    version` must not mount a new `./version`, nor create the data root.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = mountpoint_problem(args.mountpoint, create=args.create_mountpoint)
    if problem:
        parser.error(problem)
    return args


def mountpoint_problem(mountpoint: str, create: bool) -> str | None:
    """Why MOUNTPOINT cannot be used, or None. A path that cannot be stat'ed for another reason (a
    dead FUSE mount answers ENOTCONN) is left to `prepare_mountpoint`, which clears dead mounts."""
    try:
        is_dir = stat.S_ISDIR(os.stat(mountpoint).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        if create:
            return None
        hint = "" if os.sep in mountpoint else "; it is not a command either (`stargz-store --help` lists them)"
        return f"mountpoint {mountpoint!r} does not exist: create the directory or pass --create-mountpoint{hint}"
    except OSError:
        return None
    return None if is_dir else f"mountpoint {mountpoint!r} is not a directory"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=_LEVELS[level],
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # mfusepy logs every error answer (ENOENT, ENODATA...) with a traceback at debug level; the
    # answers that matter are logged by our adapter. `debug = true` in config.toml traces requests.
    logging.getLogger("fuse").setLevel(max(_LEVELS[level], logging.INFO))


def prepare_root(root: Path) -> None:
    """Create the data root 0700, or tighten an existing one that others could enter (logged):
    what is under it was written by root for root."""
    root.mkdir(mode=ROOT_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode & ~ROOT_MODE:
        log.warning("data root %s had mode %04o; tightening it to %04o", root, mode, ROOT_MODE)
        os.chmod(root, ROOT_MODE)


def acquire_root_lock(root: Path) -> IO[str]:
    """Hold an exclusive lock on `<root>/stargz-store.lock` for the life of the process."""
    path = root / LOCK_NAME
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise StartupError(f"another stargz-store (pid {holder}) is already using root {root}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def prepare_mountpoint(mountpoint: Path) -> None:
    """Create the mountpoint; lazily unmount a dead FUSE mount left by a crashed run; refuse a live one.

    A dead mount is recognised by ENOTCONN from a readdir (a stat may still be answered from
    the kernel's attribute cache, since we ask for long cache timeouts).
    """
    try:
        mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.stat(mountpoint)
        if os.path.ismount(mountpoint):
            os.listdir(mountpoint)
            raise StartupError(f"{mountpoint} is already a mount point (another store running?)")
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise StartupError(f"mountpoint {mountpoint}: {e.strerror}") from None
        log.warning("%s is a dead mount from a previous run; unmounting it", mountpoint)
        result = subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            raise StartupError(f"cannot unmount stale mount at {mountpoint}: {result.stderr.strip()}") from None
        os.stat(mountpoint)


def build_store(cfg: StoreConfig, root: Path):
    """The object graph: registry client -> chunk cache -> layer resolver -> image pool -> model."""
    from ..cache.chunk_cache import ChunkCache
    from ..formats import estargz, zstd_chunked  # noqa: F401  (loaded now, not during the first lookup)
    from ..fs.model import StoreModel
    from ..layer.resolver import LayerResolver
    from ..registry.client import RegistryClient
    from .pool import ImagePool

    client = RegistryClient(cfg.registry)
    cache = ChunkCache(root / "cache", memory_bytes=cfg.memory_cache_bytes)
    start_cache_sweep(cache)
    resolver = LayerResolver(client, cache, cfg.layer)
    pool = ImagePool(client, resolver, cfg.pool, metadata_dir=root / "pool")
    (root / "pool").mkdir(exist_ok=True)
    return pool, StoreModel(pool, pool_target=str(root / "pool"), log_file_access=cfg.log_file_access)


def start_cache_sweep(cache: ChunkCache) -> threading.Thread:
    """Remove the temp files interrupted cache writes left (a crash, a power cut), on a thread:
    a large cache takes a while to list, and the sweep spares this process's own writes, so the
    store need not wait for it before serving."""

    def sweep() -> None:
        try:
            cache.sweep_temp_files()
        except OSError as e:
            log.warning("cache: sweeping temp files failed: %s", e)

    thread = threading.Thread(target=sweep, name="cache-sweep", daemon=True)
    thread.start()
    return thread


def write_stats(pool, root: Path) -> None:
    path = root / "stats.json"
    tmp = root / ".stats.json.tmp"
    tmp.write_text(json.dumps(pool.stats(), indent=1, sort_keys=True))
    tmp.replace(path)


class Lifecycle:
    """Signals and shutdown of a mounted daemon.

    SIGINT/SIGTERM/SIGHUP/SIGUSR1 are blocked in every thread and taken by one thread with
    `sigwait` (Python handlers cannot run while the main thread sits in libfuse's loop, and
    libfuse's own handlers would only end the loop after every blocked lookup had timed out).
    On a stop signal: close the pool (waiting lookups and reads get EIO at once), unmount (the
    kernel then ends libfuse's loop), and if the mount is busy, detach it and abort the FUSE
    connection after `abort_after` seconds so the process always exits.
    """

    SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}

    def __init__(self, pool, root: Path, mountpoint: Path, abort_after: float = 5.0) -> None:
        self.pool = pool
        self.root = root
        self.mountpoint = mountpoint
        self.abort_after = abort_after
        self.device: str | None = None  # major:minor of our mount, known once it is live
        self.stopping = threading.Event()
        self.loop_ended = threading.Event()

    @classmethod
    def block_signals(cls) -> None:
        """Call before any thread starts, so every thread inherits the mask."""
        signal.pthread_sigmask(signal.SIG_BLOCK, cls.SIGNALS)

    def start(self) -> None:
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()

    def on_ready(self) -> None:
        from ..fs.fuse_adapter import mount_device

        self.device = mount_device(str(self.mountpoint))
        log.info("stargz-store is serving at %s", self.mountpoint)
        notify_systemd("READY=1")

    def _signal_loop(self) -> None:
        while True:
            sig = signal.sigwait(self.SIGNALS)
            if sig == signal.SIGUSR1:
                try:
                    write_stats(self.pool, self.root)
                except Exception:
                    log.exception("writing stats failed")
                continue
            if self.stopping.is_set():
                continue
            log.info("%s received: unmounting %s", signal.Signals(sig).name, self.mountpoint)
            self.stopping.set()
            notify_systemd("STOPPING=1")
            self.pool.close()
            self._unmount()

    def _unmount(self) -> None:
        result = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("umount %s: %s; detaching it lazily", self.mountpoint, result.stderr.strip())
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if not self.loop_ended.wait(self.abort_after) and self.device:
            self._abort_connection()

    def _abort_connection(self) -> None:
        """Last resort for a mount that stays busy: abort it through fusectl (mounted if needed)."""
        control = Path("/sys/fs/fuse/connections")
        minor = self.device.split(":")[1] if self.device else ""
        log.warning("FUSE connection %s still busy after %g s; aborting it", self.device, self.abort_after)
        if not (control / minor).exists() and not os.path.ismount(control):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], capture_output=True)
        try:
            (control / minor / "abort").write_text("1")
        except OSError as e:
            log.error("cannot abort FUSE connection %s: %s", self.device, e)


def notify_systemd(state: str) -> None:
    """`sd_notify` for `Type=notify` units (as the Go store sends READY=1 once mounted)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", state, e)


M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2
TRIM_INTERVAL = 2.0  # seconds between checks of the trimmer
TRIM_AFTER_CPU = 0.05  # CPU seconds used since the last trim that make a trim worthwhile


def tune_malloc(arenas: int = MALLOC_ARENAS) -> Callable[[], int] | None:
    """Cap glibc's malloc arenas (unless MALLOC_ARENA_MAX is set); returns `malloc_trim(0)`, if any."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    mallopt = getattr(libc, "mallopt", None)
    trim = getattr(libc, "malloc_trim", None)
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        if mallopt(M_ARENA_MAX, arenas) != 1:
            log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    if trim is None:
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryTrimmer:
    """Calls `malloc_trim` every `interval` seconds in which the daemon did some work (CPU time
    grew), so buffers of a large transfer do not stay resident; an idle daemon is left alone."""

    def __init__(self, trim: Callable[[], int], interval: float = TRIM_INTERVAL) -> None:
        self.trim = trim
        self.interval = interval
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="malloc-trim", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        last = _cpu_seconds()
        while not self._stop.wait(self.interval):
            now = _cpu_seconds()
            if now - last < TRIM_AFTER_CPU:
                continue
            self.trim()
            last = _cpu_seconds()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    root = Path(args.root).absolute()
    mountpoint = Path(args.mountpoint).absolute()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG_PATH, explicit=args.config is not None)
        prepare_root(root)
        lock = acquire_root_lock(root)
        prepare_mountpoint(mountpoint)
        os.umask(PRIVATE_UMASK)  # after the mountpoint (and any parent it needed) was made 0755
    except (ConfigError, StartupError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    except OSError as e:
        log.error("cannot prepare %s: %s", root, e)
        return EXIT_USAGE

    from ..fs.fuse_adapter import mount

    trim = tune_malloc()
    Lifecycle.block_signals()
    pool, model = build_store(cfg, root)
    control = start_control_socket(args.addr or root / CONTROL_SOCKET_NAME, pool)
    trimmer = MemoryTrimmer(trim) if trim is not None else None
    if trimmer is not None:
        trimmer.start()
    lifecycle = Lifecycle(pool, root, mountpoint)
    lifecycle.start()
    log.info("mounting stargz-store at %s (root %s)", mountpoint, root)
    code = EXIT_OK
    try:
        mount(model, str(mountpoint), cfg.mount, on_ready=lifecycle.on_ready)
    except RuntimeError as e:
        # fuse_main_real: 1-7 = could not parse options, create or mount; 8 = the loop ended
        # with an error (e.g. the connection was aborted while stopping).
        libfuse_code = e.args[0] if e.args else None
        if not (lifecycle.stopping.is_set() and libfuse_code == LOOP_ENDED_WITH_ERROR):
            log.error("FUSE mount at %s failed (libfuse code %s)", mountpoint, libfuse_code)
            code = EXIT_MOUNT_FAILED
    finally:
        lifecycle.loop_ended.set()
        control.close()
        if trimmer is not None:
            trimmer.stop()
        pool.close()
        lock.close()
    if code == EXIT_OK:
        log.info("unmounted %s; exiting", mountpoint)
    # Threads may still sit in registry requests until their own timeouts; do not wait for them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
