"""`stargz-store [--config PATH] [--root DIR] [--log-level LEVEL] [--create-mountpoint] MOUNTPOINT`: the store daemon.

Run by a user other than root (or with `--rootless`) it is a rootless store for that user's
rootless Podman (`rootless`): per-user defaults (MOUNTPOINT may then be left out), `fusermount3`
without `allow_other`, and owners mapped into the user's Podman namespace (`--uidmap/--gidmap`).

Same flags and defaults as the Go stargz-store (`-flag` and `--flag`, with `=` or a space), so
units and scripts can switch. Exit codes: 0 after a clean unmount (SIGINT/SIGTERM), 1 when the
mount fails, 2 for usage, configuration, lock or mountpoint problems.

Memory: glibc gives every thread that allocates its own malloc arena (up to 8 per core), and
freed chunk buffers stay in them; with a dozen FUSE and fetch threads a daemon that read a few
hundred MB held ~400 MB it no longer used. `tune_malloc` caps the arenas at startup (before any
worker thread exists), gives buffers larger than a chunk their own mappings (freed at once, see `MMAP_THRESHOLD`)
and `MemoryTrimmer` hands free heap pages back to the kernel after busy periods. Both are no-ops on a libc without them (musl).

Privacy: the data root holds image metadata, counters and cached layer bytes of every image
(including files other users may not read through the mount), so it is 0700 (an existing wider
one is tightened at start) and the daemon runs with umask 077 once the mountpoint exists, so
everything it creates under the root is its own alone.

Processes: `main` prepares (config, root, lock, mountpoint), mounts, and becomes the holder
(`holder`): it keeps the mount and runs the serving processes (`server`, `lifecycle`), which may
be restarted or replaced without unmounting (README "Restarts and upgrades"). Counters: SIGUSR1
to the holder makes the serving process write `<root>/stats.json` (atomically).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from ..logs import LOG_FORMAT
from .config import DEFAULT_CONFIG_PATH, ConfigError, StoreConfig, load_config
from .control import SOCKET_NAME as CONTROL_SOCKET_NAME
from .control_ops import start_control_socket
from .rootless import UserDefaults, is_rootless, ownership_from_flags, visibility_warning
from .succession import Predecessor, SuccessionError, wait_for_mount

if TYPE_CHECKING:
    from ..cache.chunk_cache import ChunkCache

log = logging.getLogger("stargz_store.daemon")

DEFAULT_ROOT = "/var/lib/stargz-store"
EXIT_OK, EXIT_MOUNT_FAILED, EXIT_USAGE = 0, 1, 2
LOCK_NAME = "stargz-store.lock"
ROOT_MODE = 0o700
PRIVATE_UMASK = 0o077
_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL,
}


class StartupError(Exception):
    """Something that stops the daemon before it mounts; the message is for the operator."""


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags; its help is the whole program's overview (the commands of `stargz_store.cli`)."""
    from ..commands import PROG, overview, package_version

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
    parser.add_argument("--root", "-root", default=None, metavar="DIR",
                        help=f"data directory: cache, metadata, lock (default {DEFAULT_ROOT}; rootless: "
                        "$XDG_DATA_HOME/stargz-store)")
    parser.add_argument("--log-level", "-log-level", default="info", choices=sorted(_LEVELS), metavar="LEVEL",
                        help=f"one of {', '.join(sorted(_LEVELS))} (default info)")
    parser.add_argument("--addr", "-addr", default=None, metavar="SOCKET", 
                        help="control socket for stargz-store-helper and commands (default ROOT/store.sock)")
    parser.add_argument("--create-mountpoint", "-create-mountpoint", action="store_true",
                        help="create MOUNTPOINT (and its parents) if it does not exist")
    parser.add_argument("--rootless", action="store_true",
                        help="serve a rootless Podman of the user running the store (the default when not run "
                        "as root): per-user defaults, fusermount3, owners mapped into the user's namespace")
    parser.add_argument("--uidmap", default=None, metavar="C:H:N[,...]",
                        help="container uid C..C+N-1 shows as host uid H..H+N-1 (podman's --uidmap format; "
                        "rootless default: 0 is your uid, then your /etc/subuid ranges)")
    parser.add_argument("--gidmap", default=None, metavar="C:H:N[,...]",
                        help="the same for groups (rootless default: your gid, then your /etc/subgid ranges)")
    parser.add_argument("--takeover", action="store_true",
                        help="if a store already runs on ROOT, take its live mount over (the old one stops serving "
                        "and exits on its stop signal without unmounting; a DaemonSet's rolling update) instead of "
                        "refusing to start; with no store running, start as usual")
    parser.add_argument("--ready-file", default=None, metavar="PATH",
                        help="a file this daemon creates once it serves the mount and removes when it lets the mount "
                        "go (a readiness probe that tells an old pod's store from its successor)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                        help="an existing directory to mount the store on (see --create-mountpoint; rootless "
                        "default: ROOT/store, created)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags and a MOUNTPOINT that is an existing directory, or may be created (exit 2 otherwise).

    A word that is not a directory is refused here, before anything is created: `stargz-store
    version` must not mount a new `./version`, nor create the data root.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = apply_mode(args)
    if problem is None:
        problem = mountpoint_problem(args.mountpoint, create=args.create_mountpoint)
    if problem:
        parser.error(problem)
    return args


def apply_mode(args: argparse.Namespace) -> str | None:
    """Fill in the defaults of the mode (root or rootless) and the id maps; a usage problem, or None.

    Sets `rootless`, `root`, `mountpoint`, `config_path`/`config_explicit` (a default config path
    may be missing) and `ownership` (None: owners as the layers have them)."""
    from ..fs.idmap import IdMapError

    rootless = args.rootless or is_rootless()
    if args.rootless and not is_rootless():
        return "--rootless is for a user's own store: run it as that user (as root, --uidmap/--gidmap map owners)"
    args.rootless = rootless
    defaults = UserDefaults.from_env() if rootless else None
    if args.root is None:
        args.root = str(defaults.root) if defaults else DEFAULT_ROOT
    if args.mountpoint is None:
        if defaults is None:
            return "MOUNTPOINT is required (only a rootless store has a default one)"
        args.mountpoint = str(Path(args.root) / "store")
        args.create_mountpoint = True
    args.config_explicit = args.config is not None
    args.config_path = args.config or (str(defaults.config) if defaults else DEFAULT_CONFIG_PATH)
    try:
        args.ownership = ownership_from_flags(args.uidmap, args.gidmap, rootless=rootless)
    except IdMapError as e:
        return f"bad --uidmap/--gidmap: {e}"
    return None


def apply_rootless(cfg: StoreConfig, args: argparse.Namespace) -> None:
    """What the mode changes in the loaded config: no `allow_other` for a rootless store (it
    needs `user_allow_other` in /etc/fuse.conf, and the user's own Podman needs no other user),
    the owners' maps; a warning when Podman may not see the mount."""
    if args.ownership is not None:
        cfg.ownership = args.ownership
        log.info("owners shown through uid map %s, gid map %s; uid %d may resolve images",
                 args.ownership.uids, args.ownership.gids, args.ownership.store_uid)
    if not args.rootless:
        return
    log.info("rootless store of uid %d: root %s, config %s, mountpoint %s", os.getuid(), args.root, args.config_path,
             args.mountpoint)
    cfg.mount = dataclasses.replace(cfg.mount, allow_other=False)
    warning = visibility_warning(Path(args.mountpoint).absolute())
    if warning:
        log.warning("%s", warning)


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
        format=LOG_FORMAT,
    )


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
        raise StartupError(f"another stargz-store (pid {holder}) is already using root {root} "
                           "(--takeover takes its mount over)") from None
    return _own_lock(f)


def _own_lock(f: IO[str]) -> IO[str]:
    """Write our pid into the held lock file (`stargz-store restart` signals it)."""
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_or_predecessor(root: Path, mountpoint: Path) -> tuple[IO[str], Predecessor | None]:
    """`--takeover`: the root lock if no store runs on `root`, else the running holder's mount and
    lock (`succession`); `StartupError` when neither can be had."""
    from ..commands import package_version

    def try_lock() -> IO[str] | None:
        try:
            return acquire_root_lock(root)
        except StartupError:
            return None

    try:
        got = wait_for_mount(root, mountpoint, package_version(), try_lock)
    except SuccessionError as e:
        raise StartupError(f"cannot take the mount over: {e}") from None
    if isinstance(got, Predecessor):
        return _own_lock(os.fdopen(got.lock_fd, "r+")), got
    return got, None


def prepare_mountpoint(mountpoint: Path) -> None:
    """Create the mountpoint; lazily unmount a dead FUSE mount left by a crashed run; refuse a live one.

    A dead mount is recognised by ENOTCONN from a readdir (a stat may still be answered from
    the kernel's attribute cache, since we ask for long cache timeouts).
    """
    from ..fuse import MountError, unmount

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
        try:
            unmount(str(mountpoint), lazy=True)
        except MountError as e:
            raise StartupError(f"cannot unmount stale mount at {mountpoint}: {e}") from None
        os.stat(mountpoint)


def build_store(cfg: StoreConfig, root: Path):
    """The object graph: registry client -> chunk cache -> layer resolver -> image pool -> model.
    Returns (pool, model, cache); the cache's temp-file sweep is the caller's (`start_cache_sweep`),
    once no earlier process of this root writes to the cache any more."""
    from ..cache.backing_files import BackingFileStore
    from ..cache.chunk_cache import ChunkCache
    from ..formats import estargz, zstd_chunked  # noqa: F401  (loaded now, not during the first lookup)
    from ..fs.model import StoreModel
    from ..fs.recorder import AccessRecorder
    from ..fuse import passthrough_permitted
    from ..layer.backing import BackingFiles
    from ..layer.resolver import LayerResolver
    from ..registry.client import RegistryClient
    from .pool import ImagePool

    client = RegistryClient(cfg.registry)
    cache = ChunkCache(root / "cache", memory_bytes=cfg.memory_cache_bytes)
    backing = None
    if cfg.mount.passthrough and passthrough_permitted():  # else nothing would use them
        backing = BackingFiles(BackingFileStore(root / "cache" / "files"), cache, min_size=cfg.passthrough_min_bytes)
    resolver = LayerResolver(client, cache, cfg.layer, backing=backing)
    pool = ImagePool(client, resolver, cfg.pool, metadata_dir=root / "pool")
    (root / "pool").mkdir(exist_ok=True)
    recorder = AccessRecorder(cfg.record_images, max_entries=cfg.record_max_entries)
    return pool, StoreModel(pool, pool_target=str(root / "pool"), log_file_access=cfg.log_file_access,
                            ownership=cfg.ownership, recorder=recorder), cache


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


M_ARENA_MAX = -8  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MALLOC_ARENAS = 2
# glibc's mmap threshold, fixed. Blocks above it get their own mapping, unmapped when freed: a TOC's
# JSON (15 MB on the python image), a coalesced or streamed request's buffer. Left to glibc, the
# threshold and the heap's trim threshold rise with each large block freed (up to 32 and 64 MiB),
# and freed buffers then stay in the arenas' heaps until the next `malloc_trim`. Measured, python
# image, unoptimized start, peak RSS of the store (holder + serving process), one run each: 161,
# 163, 164, 169, 169 MB left to glibc; 154, 155, 155 MB fixed at 256 KiB; 157 MB at 5 MiB. 5 MiB,
# not less: a 4 MiB chunk (inflated, or its compressed bytes) stays on the heap, reused at once; a
# fresh mapping of 4 MiB costs ~3 ms of page faults here against ~0.2 ms, per chunk on the read path.
MMAP_THRESHOLD = 5 << 20
TRIM_INTERVAL = 2.0  # seconds between checks of the trimmer
TRIM_AFTER_CPU = 0.05  # CPU seconds used since the last trim that make a trim worthwhile


def tune_malloc(arenas: int = MALLOC_ARENAS, mmap_threshold: int = MMAP_THRESHOLD) -> Callable[[], int] | None:
    """Cap glibc's malloc arenas and fix its mmap threshold (unless MALLOC_ARENA_MAX or
    MALLOC_MMAP_THRESHOLD_ is set); returns `malloc_trim(0)`, if any."""
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
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
            log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", mmap_threshold)
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


def server_args(args: argparse.Namespace, root: Path, mountpoint: Path) -> list[str]:
    """The serving process's flags: the daemon's own, with absolute paths."""
    out = ["--root", str(root), "--log-level", args.log_level]
    if args.config is not None:
        out += ["--config", str(Path(args.config).absolute())]
    if args.addr is not None:
        out += ["--addr", args.addr]  # as given (unix://PATH too); the server runs in the same directory
    if args.rootless:
        out.append("--rootless")
    for flag, value in (("--uidmap", args.uidmap), ("--gidmap", args.gidmap)):
        if value is not None:
            out += [flag, value]
    return out + [str(mountpoint)]


# "1": hold the mount in the process that mounted it instead of exec'ing `holder_main` (debugging)
IN_PROCESS_HOLDER_ENV = "STARGZ_STORE_IN_PROCESS_HOLDER"


def main(argv: list[str]) -> int:
    """The holder (`daemon.holder`): prepare, mount, run serving processes until a real stop."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    root = Path(args.root).absolute()
    mountpoint = Path(args.mountpoint).absolute()
    try:
        cfg = load_config(args.config_path, explicit=args.config_explicit)
        apply_rootless(cfg, args)
        prepare_root(root)
        if args.takeover:
            lock, predecessor = lock_or_predecessor(root, mountpoint)
        else:
            lock, predecessor = acquire_root_lock(root), None
        if predecessor is None:
            prepare_mountpoint(mountpoint)
        os.umask(PRIVATE_UMASK)  # after the mountpoint (and any parent it needed) was made 0755
    except (ConfigError, StartupError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    except OSError as e:
        log.error("cannot prepare %s: %s", root, e)
        return EXIT_USAGE

    from ..fs.fuse_adapter import mount_spec
    from ..fuse import MountError, mount
    from .holder_main import exec_holder, hold

    if predecessor is not None:
        log.info("taking the mount at %s over from holder pid %d (root %s)", mountpoint, predecessor.pid, root)
        fd = predecessor.fuse_fd
    else:
        log.info("mounting stargz-store at %s (root %s)", mountpoint, root)
        try:
            fd = mount(mount_spec(str(mountpoint), cfg.mount))
        except MountError as e:
            log.error("%s", e)
            lock.close()
            return EXIT_MOUNT_FAILED
    serving = server_args(args, root, mountpoint)
    ready_file = Path(args.ready_file).absolute() if args.ready_file else None
    if os.environ.get(IN_PROCESS_HOLDER_ENV) != "1":
        try:  # the holder in a fresh, small interpreter (holder_main's docstring says why)
            exec_holder(fd, lock.fileno(), mountpoint, root, _LEVELS[args.log_level], cfg.spare_server, serving,
                        predecessor=predecessor, ready_file=ready_file)
        except OSError as e:
            log.warning("cannot exec the holder (%s); holding the mount in this process", e)
    lock_fd = os.dup(lock.fileno())  # the holder's from now on (the same lock: flock belongs to the open file)
    lock.close()
    code = hold(fd, lock_fd, mountpoint, root, serving, standby=cfg.spare_server, predecessor=predecessor,
                ready_file=ready_file)
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
