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
from dataclasses import dataclass

PROG = "stargz-store"
DISTRIBUTION = "stargz-store"  # the name in setup.cfg, for the version in the package metadata


@dataclass(frozen=True)
class Command:
    """A subcommand: `stargz-store NAME ARGS...` runs `MODULE.main(ARGS)` (which returns the exit code)."""

    name: str
    synopsis: str
    summary: str
    module: str


DAEMON_SYNOPSIS = "[flags] MOUNTPOINT"
DAEMON_SUMMARY = "mount the store at MOUNTPOINT (an existing directory) and serve until SIGINT/SIGTERM"

COMMANDS: tuple[Command, ...] = (
    Command("convert", "[flags] SRC DST", "make an eStargz or zstd:chunked copy of an image (see convert --help)",
            "stargz_store.convert.cli"),
    Command("auth-helper", "[--addr SOCKET | --root DIR]",
            "pass containers/image credentials on stdin to the running daemon (also stargz-store-helper)",
            "stargz_store.daemon.auth_helper"),
    Command("restart", "[--root DIR] [--timeout S]",
            "replace the serving process (after an upgrade too) without unmounting; running containers keep reading",
            "stargz_store.daemon.restart"),
)


def package_version() -> str:
    """The installed distribution's version; a source tree that was never installed says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def overview() -> str:
    """The command list of `stargz-store --help`: the daemon mode first, then one line per command."""
    rows = [(f"{PROG} {DAEMON_SYNOPSIS}", DAEMON_SUMMARY)]
    rows += [(f"{PROG} {c.name} {c.synopsis}", c.summary) for c in COMMANDS]
    width = max(len(usage) for usage, _ in rows)
    lines = ["commands:"] + [f"  {usage.ljust(width)}  {summary}" for usage, summary in rows]
    return "\n".join(lines)


def command_named(word: str) -> Command | None:
    return next((c for c in COMMANDS if c.name == word), None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = command_named(args[0]) if args else None
    if command is not None:
        return importlib.import_module(command.module).main(args[1:])
    from .daemon.cli import main as daemon_main

    return daemon_main(args)


if __name__ == "__main__":
    sys.exit(main())
