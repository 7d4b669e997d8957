"""The holder's own process image: `python -m stargz_store.daemon.holder_main`, exec'd by `stargz-store`.

Why a separate entry point: the holder lives as long as the mount, on every node, doing almost
nothing. `stargz-store` (daemon/cli.py) needs the whole package to check the config, prepare the
root and mount; if the same process then became the holder, it would keep every module the
server needs resident (35-40 MB of a Python heap that never serves a request). So once mounted,
cli.py execs this module with the `/dev/fuse` descriptor and the root lock inherited: same pid
(systemd, the lock file and `server.json` still name it), a fresh interpreter that imports only
the holder, the FUSE mount helpers and the hand-over channel (17 MB resident: the package loads
the FUSE session only on first use, and these modules avoid `dataclasses` and `ctypes.util`).

What must hold: nothing here imports registry, layer, cache or fs code (tests check the module
list); the flags are the holder's constructor arguments, nothing else is read (the config was
checked before the exec, the servers read it themselves).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from ..logs import LOG_FORMAT
from .handover import Channel
from .holder import Holder
from .succession import Predecessor

log = logging.getLogger("stargz_store.daemon")

MODULE = "stargz_store.daemon.holder_main"


def command(fd: int, lock_fd: int, mountpoint: Path, root: Path, log_level: int, standby: bool,
            server_args: list[str], *, predecessor: Predecessor | None = None,
            ready_file: Path | None = None) -> list[str]:
    """The argv that execs the holder (see `exec_holder`)."""
    extra = []
    if predecessor is not None:
        extra += ["--predecessor-fd", str(predecessor.channel.fileno()), "--predecessor-pid", str(predecessor.pid)]
    if ready_file is not None:
        extra += ["--ready-file", str(ready_file)]
    return [sys.executable, "-m", MODULE, "--fuse-fd", str(fd), "--lock-fd", str(lock_fd),
            "--mountpoint", str(mountpoint), "--root", str(root), "--log-level", str(log_level),
            "--standby" if standby else "--no-standby", *extra, "--", *server_args]


def exec_holder(fd: int, lock_fd: int, mountpoint: Path, root: Path, log_level: int, standby: bool,
                server_args: list[str], *, predecessor: Predecessor | None = None,
                ready_file: Path | None = None) -> None:
    """Replace this process with the holder; the mount's descriptor and the root lock stay open
    (flock belongs to the open file, which the exec keeps), and so does the channel to a
    predecessor holder (nothing is buffered on it yet: the predecessor speaks after `ready`).
    Returns only if the exec failed."""
    fds = [fd, lock_fd] + ([predecessor.channel.fileno()] if predecessor is not None else [])
    for inherited in fds:
        os.set_inheritable(inherited, True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = command(fd, lock_fd, mountpoint, root, log_level, standby, server_args, predecessor=predecessor,
                   ready_file=ready_file)
    os.execv(argv[0], argv)


def hold(fd: int, lock_fd: int, mountpoint: Path, root: Path, server_args: list[str], *, standby: bool,
         predecessor: Predecessor | None = None, ready_file: Path | None = None) -> int:
    """Run the holder until a real stop or a hand-over to a successor; close what it still holds."""
    holder = Holder(fd, mountpoint, root, server_args, standby=standby, lock_fd=lock_fd, predecessor=predecessor,
                    ready_file=ready_file)
    code = holder.run()
    if holder.handed_over:
        log.info("the mount at %s is served by the holder that took it over; exiting", mountpoint)
    elif predecessor is not None and holder.taking_over:
        log.info("the take-over did not happen; the previous holder keeps the mount")
    elif code == 0:
        log.info("unmounted %s; exiting", mountpoint)
    for still_held in (holder.fd, holder.lock_fd):
        if still_held >= 0:
            os.close(still_held)
    return code


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stargz-store (holder)", description=__doc__.splitlines()[0])
    p.add_argument("--fuse-fd", type=int, required=True)
    p.add_argument("--lock-fd", type=int, required=True)
    p.add_argument("--mountpoint", type=Path, required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--log-level", type=int, default=logging.INFO)
    p.add_argument("--standby", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--predecessor-fd", type=int, default=None)  # the channel to the holder we take over from
    p.add_argument("--predecessor-pid", type=int, default=0)
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument("server_args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format=LOG_FORMAT)
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    predecessor = None
    if args.predecessor_fd is not None:
        os.set_inheritable(args.predecessor_fd, False)
        sock = socket.socket(fileno=args.predecessor_fd)
        predecessor = Predecessor(Channel(sock), args.fuse_fd, args.lock_fd, args.predecessor_pid)
    for fd in (args.fuse_fd, args.lock_fd):
        os.set_inheritable(fd, False)  # the servers get the mount's descriptor explicitly (pass_fds)
    code = hold(args.fuse_fd, args.lock_fd, args.mountpoint, args.root, server_args, standby=args.standby,
                predecessor=predecessor, ready_file=args.ready_file)
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
