"""The program's command table: its name, version and subcommands (`stargz-store COMMAND ...`).

Kept apart from the dispatcher (`stargz_store.cli`) so that the daemon's own `--help` can list the
commands without importing the module that imports the daemon (no import circle), and so that a
command added to the table is both dispatched and listed.
"""
from __future__ import annotations

from dataclasses import dataclass

PROG = "stargz-store"
DISTRIBUTION = "stargz-store"  # the name in setup.cfg, for the version in the package metadata


@dataclass(frozen=True)
class Command:
    """A subcommand: `stargz-store NAME ARGS...` runs `MODULE.FUNCTION(ARGS)` (which returns the exit code)."""

    name: str
    synopsis: str
    summary: str
    module: str
    function: str = "main"


DAEMON_SYNOPSIS = "[flags] MOUNTPOINT"
DAEMON_SUMMARY = "mount the store at MOUNTPOINT (an existing directory) and serve until SIGINT/SIGTERM"

COMMANDS: tuple[Command, ...] = (
    Command("convert", "[flags] SRC DST", "make an eStargz or zstd:chunked copy of an image (see convert --help)",
            "stargz_store.convert.cli"),
    Command("auth-helper", "[--addr SOCKET | --root DIR]",
            "pass containers/image credentials on stdin to the running daemon (also stargz-store-helper)",
            "stargz_store.daemon.auth_helper"),
    Command("status", "[--json] [flags]",
            "what the running daemon serves: images, layers, how much is local, the cache (root only)",
            "stargz_store.daemon.status_cli"),
    Command("prune", "[--all | --to GB] [flags]",
            "remove cached chunks of layers not in use now, least recently used first (root only)",
            "stargz_store.daemon.status_cli", "prune_main"),
    Command("record", "[--start|--stop] REF",
            "print what a workload read first from REF through the running daemon (a --record-in file)",
            "stargz_store.daemon.record_cli"),
    Command("optimize", "[flags] SRC DST",
            "run a workload once through a private store and convert with what it read first (see optimize --help)",
            "stargz_store.optimize.cli"),
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
