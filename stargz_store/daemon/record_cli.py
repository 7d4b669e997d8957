"""`stargz-store record`: what a workload read through the running daemon, as a record file.

    stargz-store record [--addr SOCKET | --root DIR] REF > record.jsonl     print REF's record
    stargz-store record --start [--clear] REF|'*'                           record REF from now on
    stargz-store record --stop REF|'*'                                      stop recording

The record is the nerdctl/ctr-remote format (`estargz.md` §8.4): one JSON object a line, in the
order the files were first read, with `path`, `manifestDigest` and `layerIndex` as ctr-remote
writes them and our own `layerDigest`, `kind`, `size` and `seconds` (since the image's first
lookup). `stargz-store convert --record-in record.jsonl` takes it as it is.

Recording is off unless the config names images (`[record] images`) or `--start` asked for one.
Exit status: 0 done; 1 no daemon answered, or it refused; 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from .control import DEFAULT_ROOT, SOCKET_NAME, ControlError, ControlUnavailable, call, socket_path

PROG = "stargz-store record"
RECORD_TIMEOUT = 60.0  # the image may have to be resolved first (a registry round trip or a few)
EXIT_OK, EXIT_DAEMON, EXIT_USAGE = 0, 1, 2


def fetch_record(address: str, image: str, *, timeout: float = RECORD_TIMEOUT) -> list[dict[str, Any]]:
    """Every record line of `image` from the daemon at `address`, page by page. Raises ControlError."""
    entries: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        reply = call(address, "record", timeout=timeout, image=image, offset=offset)
        page = reply.get("entries")
        if not isinstance(page, list):
            raise ControlError("the daemon sent a record reply without entries")
        entries.extend(e for e in page if isinstance(e, dict) and isinstance(e.get("path"), str))
        following = reply.get("next")
        offset = following if isinstance(following, int) and following > offset else None
    return entries


def write_record(entries: list[dict[str, Any]], out: TextIO) -> None:
    for entry in entries:
        out.write(json.dumps(entry, separators=(",", ":")) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Print the files a workload read first from an image served by the running "
                               "stargz-store, in order (the nerdctl/ctr-remote record format), or start/stop "
                               "recording. Feed it to `stargz-store convert --record-in`.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--addr", help=f"the daemon's control socket: PATH or unix://PATH "
                                      f"(default {DEFAULT_ROOT}/{SOCKET_NAME}, or --root's)")
    where.add_argument("--root", help=f"the daemon's --root; the socket is ROOT/{SOCKET_NAME}")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--start", action="store_true", help="record REF ('*': every image) from now on")
    action.add_argument("--stop", action="store_true", help="stop recording REF ('*': everything)")
    parser.add_argument("--clear", action="store_true", help="with --start: forget what REF recorded before")
    parser.add_argument("--timeout", type=float, default=RECORD_TIMEOUT,
                        help=f"seconds to wait for the daemon (default {RECORD_TIMEOUT:g})")
    parser.add_argument("image", metavar="REF", help="the image reference as Podman named it (e.g. host/repo:tag)")
    args = parser.parse_args(argv)
    if args.clear and not args.start:
        parser.error("--clear goes with --start")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        address = socket_path(args.addr or os.path.join(args.root or DEFAULT_ROOT, SOCKET_NAME))
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.start:
            reply = call(address, "record-start", timeout=args.timeout, image=args.image, clear=args.clear)
            print(f"recording {reply.get('image')}", file=sys.stderr)
        elif args.stop:
            reply = call(address, "record-stop", timeout=args.timeout, image=args.image)
            state = "stopped" if reply.get("was_recording") else "was not recording"
            print(f"{reply.get('image')}: {state}", file=sys.stderr)
        else:
            write_record(fetch_record(address, args.image, timeout=args.timeout), sys.stdout)
    except ControlUnavailable as exc:
        print(f"{PROG}: {exc} (is stargz-store running?)", file=sys.stderr)
        return EXIT_DAEMON
    except ControlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_DAEMON
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
