"""`stargz-store-helper` / `stargz-store auth-helper`: credentials from Podman and CRI-O to the daemon.

containers/image 5.32+ runs the program named by registries.conf's
`additional-layer-store-auth-helper` on every `docker://` source open, with no arguments, from
$PATH, and `{"<ref>": {"username": ..., "password": ..., "identityToken": ...}}` on stdin; a
non-zero exit only becomes a warning in its log (ALS spec §9.6). This passes the document to the
running daemon's control socket (`add-credentials`) and exits.

What must hold: it is quick and never holds a pull up for long (stdlib-only imports, a short
total timeout, a missing daemon is one line on stderr and exit 1, never a wait); it prints no
secret; it accepts the Go helper's command line (`stargz-store-helper [ADDRESS]`) and the
daemon's `--addr` form (`PATH` or `unix://PATH`), or `--root DIR` (the socket `DIR/store.sock`).

Exit status: 0 the daemon took the credentials; 1 no daemon answered, or it refused them;
2 bad usage or stdin that is not the helper's JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

from .control import DEFAULT_ROOT, SOCKET_NAME, ControlError, ControlUnavailable, call, json_object, socket_path

HELPER_TIMEOUT = 2.0
MAX_INPUT = 48 * 1024  # what fits a control request (64 KiB) with room for the envelope
EXIT_OK, EXIT_DAEMON, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Pass the credentials containers/image writes on stdin to the running stargz-store "
                               "(registries.conf: additional-layer-store-auth-helper)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--addr", "-addr", help="the daemon's control socket: PATH or unix://PATH "
                                               f"(default {DEFAULT_ROOT}/{SOCKET_NAME}, or --root's)")
    where.add_argument("--root", "-root", help=f"the daemon's --root; the socket is ROOT/{SOCKET_NAME}")
    parser.add_argument("--timeout", type=float, default=HELPER_TIMEOUT,
                        help=f"seconds to wait for the daemon in all (default {HELPER_TIMEOUT:g})")
    parser.add_argument("address", nargs="?", help="the socket, as the Go stargz-store-helper takes it")
    args = parser.parse_args(argv)
    if args.address and (args.addr or args.root):
        parser.error("give the socket once: as an argument, --addr or --root")
    return args


def socket_address(args: argparse.Namespace) -> str:
    if args.address or args.addr:
        return args.address or args.addr
    return os.path.join(args.root or DEFAULT_ROOT, SOCKET_NAME)


def read_credentials(stream, limit: int = MAX_INPUT) -> dict:
    """The JSON object on stdin; ValueError with a message that never quotes the input."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes on stdin")
    return json_object(data, "stdin", empty="nothing on stdin (containers/image writes the credentials there)",
                       kind="a JSON object of image reference -> credentials")


def default_prog() -> str:
    """How the user called it, for messages: `stargz-store auth-helper` or `stargz-store-helper`."""
    return "stargz-store auth-helper" if os.path.basename(sys.argv[0]) in ("stargz-store", "cli.py") \
        else "stargz-store-helper"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`stargz-store-helper ARGS` (console script) or `stargz-store auth-helper ARGS` (`main(ARGS)`)."""
    prog = prog or default_prog()
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        address = socket_path(socket_address(args))
        credentials = read_credentials(sys.stdin.buffer)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        call(address, "add-credentials", timeout=args.timeout, credentials=credentials)
    except ControlUnavailable as exc:
        print(f"{prog}: {exc}; credentials not passed (is stargz-store running?)", file=sys.stderr)
        return EXIT_DAEMON
    except ControlError as exc:
        print(f"{prog}: the daemon refused the credentials: {exc}", file=sys.stderr)
        return EXIT_DAEMON
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
