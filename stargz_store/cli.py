"""`stargz-store`: the daemon (`stargz-store [flags] MOUNTPOINT`) and its tools (`stargz-store COMMAND ...`).

A first argument that names a command in `COMMANDS` runs that command with the rest; anything
else is the daemon's command line. The daemon's `--help` is the program's overview: it lists the
daemon mode and every entry of `COMMANDS` with one line each, so a command added to the table
is both dispatched and listed. Nothing here imports more than the chosen command needs, so
`--help` and `--version` stay quick and touch no file.
"""
from __future__ import annotations

import importlib
import sys

from .commands import COMMANDS, PROG, Command, command_named, overview, package_version

__all__ = ["COMMANDS", "PROG", "Command", "command_named", "main", "overview", "package_version"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = command_named(args[0]) if args else None
    if command is not None:
        return getattr(importlib.import_module(command.module), command.function)(args[1:])
    from .daemon.cli import main as daemon_main

    return daemon_main(args)


if __name__ == "__main__":
    sys.exit(main())
