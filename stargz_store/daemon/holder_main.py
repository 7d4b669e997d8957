"""The holder's own process image: `python -m stargz_store.daemon.holder_main`, exec'd by `stargz-store`.

Why a separate entry point: the holder lives as long as the mount, on every node, doing almost
nothing. `stargz-store` (daemon/cli.py) needs the whole package to check the config, prepare the
root and mount; if the same process then became the holder, it would keep every module the
server needs resident (35-40 MB of a Python heap that never serves a request). So once mounted,
cli.py execs this module with the `/dev/fuse` descriptor and the root lock inherited: same pid
(systemd, the lock file and `server.json` still name it), a fresh interpreter that imports only
the holder, the FUSE mount helpers and the hand-over channel (~15 MB).

What must hold: nothing here imports registry, layer, cache or fs code (tests check the module
list); the flags are the holder's constructor arguments, nothing else is read (the config was
checked before the exec, the servers read it themselves).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .holder import Holder

log = logging.getLogger("stargz_store.daemon")

MODULE = "stargz_store.daemon.holder_main"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def command(fd: int, lock_fd: int, mountpoint: Path, root: Path, log_level: int, standby: bool,
            server_args: list[str]) -> list[str]:
    """The argv that execs the holder (see `exec_holder`)."""
    return [sys.executable, "-m", MODULE, "--fuse-fd", str(fd), "--lock-fd", str(lock_fd),
            "--mountpoint", str(mountpoint), "--root", str(root), "--log-level", str(log_level),
            "--standby" if standby else "--no-standby", "--", *server_args]


def exec_holder(fd: int, lock_fd: int, mountpoint: Path, root: Path, log_level: int, standby: bool,
                server_args: list[str]) -> None:
    """Replace this process with the holder; the mount's descriptor and the root lock stay open
    (flock belongs to the open file, which the exec keeps). Returns only if the exec failed."""
    os.set_inheritable(fd, True)
    os.set_inheritable(lock_fd, True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = command(fd, lock_fd, mountpoint, root, log_level, standby, server_args)
    os.execv(argv[0], argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stargz-store (holder)", description=__doc__.splitlines()[0])
    p.add_argument("--fuse-fd", type=int, required=True)
    p.add_argument("--lock-fd", type=int, required=True)
    p.add_argument("--mountpoint", type=Path, required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--log-level", type=int, default=logging.INFO)
    p.add_argument("--standby", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("server_args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format=LOG_FORMAT)
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    for fd in (args.fuse_fd, args.lock_fd):
        os.set_inheritable(fd, False)  # the servers get the mount's descriptor explicitly (pass_fds)
    code = Holder(args.fuse_fd, args.mountpoint, args.root, server_args, standby=args.standby).run()
    if code == 0:
        log.info("unmounted %s; exiting", args.mountpoint)
    os.close(args.fuse_fd)
    os.close(args.lock_fd)
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
