"""`python -m stargz_store.daemon.server [daemon flags] --fuse-fd N --channel-fd M MOUNTPOINT`: a serving process.

Started by the holder (`daemon.holder`), never by hand: it inherits the mount's `/dev/fuse`
descriptor and its end of the hand-over channel. It builds the store (the heavy part: registry
client, caches, image pool), reports `prepared`, waits for `go`, and serves (`lifecycle.Serving`)
until it is told to stop or shut down. The root lock, the mountpoint and the unmount are the
holder's. It dies with the holder (PR_SET_PDEATHSIG): a store whose holder was killed is a
crashed store, and its mount must not be served by an orphan nobody can restart.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from .cli import (EXIT_USAGE, PRIVATE_UMASK, MemoryTrimmer, apply_mode, apply_rootless, build_parser, build_store,
                  setup_logging, start_cache_sweep, tune_malloc)
from .config import ConfigError, load_config
from .control import SOCKET_NAME as CONTROL_SOCKET_NAME
from .handover import PROTOCOL, Channel

log = logging.getLogger("stargz_store.daemon")

PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    parser.add_argument("--fuse-fd", type=int, required=True, help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, required=True, help=argparse.SUPPRESS)
    parser.add_argument("--holder-pid", type=int, default=None, help=argparse.SUPPRESS)  # older holders: none
    args = parser.parse_args(argv)
    problem = apply_mode(args)  # the holder's mode, from the same flags (rootless, id maps)
    if problem:
        parser.error(problem)
    return args


def die_with_parent(holder_pid: int | None) -> None:
    """SIGKILL this process when the holder dies (checked again after: it may already be gone,
    and this process reparented). The holder says its pid: in a container it is PID 1 itself,
    so a parent pid of 1 alone does not mean an orphan (an older holder does not say it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    orphan = os.getppid() != holder_pid if holder_pid is not None else os.getppid() == 1
    if orphan:
        os._exit(1)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    die_with_parent(args.holder_pid)
    setup_logging(args.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the holder's (a terminal sends it to both)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=args.channel_fd))
    root = Path(args.root).absolute()
    try:
        cfg = load_config(args.config_path, explicit=args.config_explicit)
        apply_rootless(cfg, args)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_USAGE
    os.umask(PRIVATE_UMASK)

    from ..commands import package_version
    from .control_ops import AddCredentials, start_control_socket
    from .lifecycle import Serving, block_signals
    from .operations import start_operations

    trim = tune_malloc()
    block_signals()
    pool, model, cache = build_store(cfg, root)
    channel.send("prepared", pid=os.getpid(), version=package_version(), protocol=PROTOCOL)
    go = channel.receive()
    if go is None or go.get("op") != "go":
        log.info("not taken into service; exiting")
        _exit(0)
    start_cache_sweep(cache)  # only now: the previous server's writes are done
    # Only now too: the cache janitor must not run in two processes, and the metrics port is the
    # serving process's (the previous one lets it go as it stops; `start_metrics` retries).
    ops = start_operations(cfg, pool)

    def send_credentials(document: object) -> None:
        channel.send("credentials", document=document)

    def start_control():
        return start_control_socket(args.addr or root / CONTROL_SOCKET_NAME, pool, ops.control_operations(),
                                    recorder=model.recorder, on_credentials=send_credentials)

    serving = Serving(args.fuse_fd, channel, pool, model, root, Path(args.mountpoint).absolute(), cfg.mount,
                      start_control=start_control)
    trimmer = MemoryTrimmer(trim) if trim is not None else None
    if trimmer is not None:
        trimmer.start()
    serving.take_over(go, AddCredentials(pool))
    serving.ended.wait()
    _exit(serving.exit_code)
    return 0


def _exit(code: int) -> None:
    """Worker threads may still sit in registry requests until their own timeouts: do not wait."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
