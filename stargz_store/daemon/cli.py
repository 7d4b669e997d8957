"""`stargz-store [--config PATH] [--root DIR] [--log-level LEVEL] MOUNTPOINT`: the store daemon.

Same flags and defaults as the Go stargz-store (`-flag` and `--flag`, with `=` or a space), so
units and scripts can switch. Exit codes: 0 after a clean unmount (SIGINT/SIGTERM), 1 when the
mount fails, 2 for usage, configuration, lock or mountpoint problems.

Counters: SIGUSR1 writes `<root>/stats.json` (atomically). The signal is taken by a dedicated
thread with `sigwait`, because Python signal handlers cannot run while the main thread sits in
libfuse's loop.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from .config import DEFAULT_CONFIG_PATH, ConfigError, StoreConfig, load_config

log = logging.getLogger("stargz_store.daemon")

DEFAULT_ROOT = "/var/lib/stargz-store"
EXIT_OK, EXIT_MOUNT_FAILED, EXIT_USAGE = 0, 1, 2
LOCK_NAME = "stargz-store.lock"
LOOP_ENDED_BY_SIGNAL = 8
_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL,
}


class StartupError(Exception):
    """Something that stops the daemon before it mounts; the message is for the operator."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stargz-store", description="Additional Layer Store for lazily pulled eStargz/zstd:chunked layers")
    parser.add_argument("--config", "-config", default=None, help=f"TOML config (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--root", "-root", default=DEFAULT_ROOT, help=f"data directory (default {DEFAULT_ROOT})")
    parser.add_argument("--log-level", "-log-level", default="info", choices=sorted(_LEVELS), help="log level (default info)")
    parser.add_argument("--addr", "-addr", default=None, help="credential socket of the Go store; accepted and ignored")
    parser.add_argument("mountpoint", help="where to mount the store (created if absent)")
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=_LEVELS[level],
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if _LEVELS[level] > logging.DEBUG:
        logging.getLogger("mfusepy").setLevel(logging.WARNING)


def acquire_root_lock(root: Path) -> IO[str]:
    """Hold an exclusive lock on `<root>/stargz-store.lock` for the life of the process."""
    path = root / LOCK_NAME
    f = open(path, "a+")
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
    from ..fs.model import StoreModel
    from ..layer.resolver import LayerResolver
    from ..registry.client import RegistryClient
    from .pool import ImagePool

    client = RegistryClient(cfg.registry)
    cache = ChunkCache(root / "cache", memory_bytes=cfg.memory_cache_bytes)
    resolver = LayerResolver(client, cache, cfg.layer)
    pool = ImagePool(client, resolver, cfg.pool, metadata_dir=root / "pool")
    (root / "pool").mkdir(exist_ok=True)
    return pool, StoreModel(pool, pool_target=str(root / "pool"))


def write_stats(pool, root: Path) -> None:
    path = root / "stats.json"
    tmp = root / ".stats.json.tmp"
    tmp.write_text(json.dumps(pool.stats(), indent=1, sort_keys=True))
    tmp.replace(path)


def _stats_thread(pool, root: Path) -> None:
    while True:
        signal.sigwait({signal.SIGUSR1})
        try:
            write_stats(pool, root)
        except Exception:
            log.exception("writing stats failed")


def _ready(mountpoint: Path) -> None:
    log.info("stargz-store is serving at %s", mountpoint)
    notify_systemd("READY=1")


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


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    root = Path(args.root).absolute()
    mountpoint = Path(args.mountpoint).absolute()
    if args.addr:
        log.info("--addr %s ignored: this store takes credentials from resolver.auth_file", args.addr)
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG_PATH, explicit=args.config is not None)
        root.mkdir(parents=True, exist_ok=True)
        lock = acquire_root_lock(root)
        prepare_mountpoint(mountpoint)
    except (ConfigError, StartupError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    except OSError as e:
        log.error("cannot prepare %s: %s", root, e)
        return EXIT_USAGE

    from ..fs.fuse_adapter import mount

    # Block SIGUSR1 before any thread exists so every thread inherits the mask; one thread sigwaits.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    pool, model = build_store(cfg, root)
    threading.Thread(target=_stats_thread, args=(pool, root), name="stats", daemon=True).start()
    log.info("mounting stargz-store at %s (root %s)", mountpoint, root)
    try:
        mount(model, str(mountpoint), cfg.mount, on_ready=lambda: _ready(mountpoint))
    except RuntimeError as e:
        # fuse_main_real: 1-7 = could not parse/create/mount/daemonize; 8 = the loop ended with an
        # error, which is how libfuse reports leaving it on SIGINT/SIGTERM (already unmounted then).
        code = e.args[0] if e.args else None
        if code != LOOP_ENDED_BY_SIGNAL:
            log.error("FUSE mount at %s failed (libfuse code %s)", mountpoint, code)
            return EXIT_MOUNT_FAILED
    finally:
        pool.close()
        lock.close()
    notify_systemd("STOPPING=1")
    log.info("unmounted %s; exiting", mountpoint)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
