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

from .cli import (DEFAULT_ROOT, EXIT_USAGE, PRIVATE_UMASK, MemoryTrimmer, build_parser, build_store, setup_logging,
                  start_cache_sweep, tune_malloc)
from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from .control import SOCKET_NAME as CONTROL_SOCKET_NAME
from .handover import PROTOCOL, Channel

log = logging.getLogger("stargz_store.daemon")

PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    parser.add_argument("--fuse-fd", type=int, required=True, help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, required=True, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def die_with_parent() -> None:
    """SIGKILL this process when the holder dies (checked again after: it may already be gone)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    die_with_parent()
    setup_logging(args.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the holder's (a terminal sends it to both)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=args.channel_fd))
    root = Path(args.root or DEFAULT_ROOT).absolute()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG_PATH, explicit=args.config is not None)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_USAGE
    os.umask(PRIVATE_UMASK)

    from ..cli import package_version
    from .control_ops import AddCredentials, start_control_socket
    from .lifecycle import Serving, block_signals

    trim = tune_malloc()
    block_signals()
    pool, model, cache = build_store(cfg, root)
    channel.send("prepared", pid=os.getpid(), version=package_version(), protocol=PROTOCOL)
    go = channel.receive()
    if go is None or go.get("op") != "go":
        log.info("not taken into service; exiting")
        _exit(0)
    start_cache_sweep(cache)  # only now: the previous server's writes are done

    def send_credentials(document: object) -> None:
        channel.send("credentials", document=document)

    def start_control():
        return start_control_socket(args.addr or root / CONTROL_SOCKET_NAME, pool, send_credentials)

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
