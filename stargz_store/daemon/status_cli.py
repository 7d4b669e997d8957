"""`stargz-store status` and `stargz-store prune`: ask the running daemon, over its control socket.

Both need root (or the daemon's user): the socket is 0600 in the 0700 data root, and the daemon
checks the peer (see `control`). `--json` prints the daemon's answer as is, for scripts; without
it, a table for people. Exit status: 0 answered; 1 no daemon, or it refused; 2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..sizes import size_text
from .control import DEFAULT_ROOT, SOCKET_NAME, ControlError, ControlUnavailable, call

EXIT_OK, EXIT_DAEMON, EXIT_USAGE = 0, 1, 2
# A status measures the whole disk cache (a stat per file): seconds for a large one.
TIMEOUT = 120.0


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--addr", "-addr", help=f"the daemon's control socket (default {DEFAULT_ROOT}/{SOCKET_NAME})")
    where.add_argument("--root", "-root", help=f"the daemon's --root; the socket is ROOT/{SOCKET_NAME}")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds to wait (default {TIMEOUT:g})")
    return parser


def _address(args: argparse.Namespace) -> str:
    return args.addr or os.path.join(args.root or DEFAULT_ROOT, SOCKET_NAME)


def _ask(prog: str, args: argparse.Namespace, op: str, **fields: Any) -> dict[str, Any] | None:
    try:
        reply = call(_address(args), op, timeout=args.timeout, **fields)
    except ControlUnavailable as exc:
        print(f"{prog}: {exc} (is stargz-store running? is this its --root?)", file=sys.stderr)
        return None
    except ControlError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    reply.pop("ok", None)
    return reply


def format_status(doc: dict[str, Any]) -> str:
    cache = doc.get("cache", {})
    lines = [f"stargz-store pid {doc.get('pid')}, up {doc.get('uptime_sec', 0):.0f} s"]
    limit = cache.get("limit")
    lines.append(f"cache {cache.get('root')}: {size_text(cache.get('size'))}"
                 f" (limit {size_text(limit) if limit else 'none'}), {size_text(cache.get('in_use'))} in use,"
                 f" {size_text(cache.get('could_free'))} could be freed (stargz-store prune)")
    if doc.get("metrics_address"):
        lines.append(f"metrics at http://{doc['metrics_address']}/metrics")
    images = doc.get("images", [])
    lines.append(f"images: {len(images)}")
    lines += [f"  {ref}" for ref in images]
    layers = doc.get("layers", [])
    lines.append(f"layers open: {len(layers)}")
    if layers:
        lines.append(f"  {'LAYER':<19} {'LOCAL':>17} {'FETCHED':>10} {'PINS':>4} {'USES':>4} {'READS':>5}  IMAGE")
        for layer in layers:
            total = layer.get("content_bytes") or 0
            local = layer.get("local_bytes") or 0
            share = f"{100 * local / total:.0f}%" if total else "-"
            lines.append(f"  {layer['layer'][:19]:<19} {share + ' of ' + size_text(total):>17} "
                         f"{size_text(layer.get('fetched_bytes')):>10} {layer.get('pins', 0):>4} "
                         f"{layer.get('uses', 0):>4} {layer.get('holds', 0):>5}  {layer.get('image')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`stargz-store status [--json] [--addr SOCKET | --root DIR]`."""
    prog = "stargz-store status"
    args = _parser(prog, "What the running daemon serves: images, open layers (what holds them, how much of "
                         "each is local), the disk cache (size, limit, in use, what prune could free).").parse_args(
        sys.argv[1:] if argv is None else argv)
    doc = _ask(prog, args, "status")
    if doc is None:
        return EXIT_DAEMON
    print(json.dumps(doc, indent=1, sort_keys=True) if args.json else format_status(doc))
    return EXIT_OK


def prune_main(argv: list[str] | None = None) -> int:
    """`stargz-store prune [--all | --to GB] [--json] [--addr SOCKET | --root DIR]`."""
    prog = "stargz-store prune"
    parser = _parser(prog, "Remove least recently used cache files of layers not in use now: down to 90% of "
                           "[store] cache_max_size_gb, or everything not in use when no limit is set. Chunks of "
                           "layers in use (a container's overlay, an open file) are never removed.")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--all", action="store_true", help="remove everything not in use")
    amount.add_argument("--to", type=float, metavar="GB", help="remove until the cache is at most GB GiB")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.to is not None and args.to < 0:
        parser.error("--to must be >= 0")
    fields: dict[str, Any] = {}
    if args.all:
        fields["target"] = 0
    elif args.to is not None:
        fields["target"] = int(args.to * (1 << 30))
    doc = _ask(prog, args, "prune", **fields)
    if doc is None:
        return EXIT_DAEMON
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print(f"removed {doc.get('removed_files', 0)} file(s), {size_text(doc.get('removed_bytes'))}; cache "
              f"{size_text(doc.get('size_before'))} -> {size_text(doc.get('size_after'))} "
              f"({size_text(doc.get('in_use_bytes'))} in use, kept)")
        for error in doc.get("errors") or []:
            print(f"  could not remove {error}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
