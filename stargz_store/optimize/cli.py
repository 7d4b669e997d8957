"""`stargz-store optimize`: an image whose workload's first reads are prefetched, without Go tools.

    stargz-store optimize [--entrypoint JSON] [--args JSON] [--env K=V]... [--mount SPEC]...
                          [--network MODE] [--timeout SECONDS] [--wait-line REGEX]
                          [--format estargz|zstd-chunked] [--record-out FILE] [--prefetch-list FILE]
                          [--insecure] [--authfile FILE] [--platform OS/ARCH] SRC DST

Runs the workload once with Podman through a private, recording store (see `optimizer`), then
converts SRC into DST with the files it read first placed before `.prefetch.landmark`, in the
order they were read, in the layer they were read from. Needs root (a FUSE mount, rootful Podman)
and Podman, docker-registry and fusermount3 installed. Prints what was prioritized and how long the
workload ran; DST's manifest digest goes to stdout. Exit status as `convert`'s: 0, 1 failure,
2 usage, 130 interrupted. A workload that fails or times out is not a failure: its record is used.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

from ..convert import cli as convert_cli
from ..convert.converter import ConvertOptions
from ..convert.errors import ConvertError
from ..convert.location import parse_location
from ..convert.platform import platform_from_text
from ..daemon.control import ControlError
from ..daemon.record_cli import write_record
from ..localenv.errors import LocalEnvError
from .optimizer import OptimizeRequest, optimize
from .workload import ENDED_EXIT, WorkloadSpec


PROG = "stargz-store optimize"
DEFAULT_TIMEOUT = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = convert_cli._Parser(
        prog=PROG,
        description="Run an image's workload once through a private, recording stargz-store and Podman, then "
        "convert it with the files the workload read first prioritized (prefetched at the next start): what "
        "`ctr-remote image optimize` does, with Podman and no Go tools.",
        epilog="SRC/DST as for `stargz-store convert`. Needs root, podman, docker-registry and fusermount3.",
    )
    p.add_argument("--entrypoint", metavar="JSON", help='the container\'s entrypoint, a JSON array (["/bin/sh", "-c"])')
    p.add_argument("--args", metavar="JSON", help="arguments after the image, a JSON array (default: the image's Cmd)")
    p.add_argument("--env", metavar="K=V", action="append", default=[], help="an environment variable (repeatable)")
    p.add_argument("--mount", metavar="SPEC", action="append", default=[],
                   help="a podman --mount (type=bind,src=...,dst=...; repeatable)")
    p.add_argument("--network", metavar="MODE", default="none", help="podman --network of the run (default: none)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT,
                   help=f"stop the workload after this long (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--wait-line", metavar="REGEX", help="stop the workload once a line of its output matches")
    p.add_argument("--format", choices=("estargz", "zstd-chunked"), default="estargz", help="DST's layer format")
    p.add_argument("--record-out", metavar="FILE", help="also write the record (JSON lines) to FILE")
    p.add_argument("--prefetch-list", metavar="FILE",
                   help="paths or glob patterns (one a line, # comments) to prioritize after the recorded ones")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="which image of a multi-platform SRC (default: this host's)")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP and unverified TLS for SRC and DST")
    p.add_argument("--authfile", metavar="FILE", help="credentials file for SRC and DST")
    p.add_argument("--workdir", metavar="DIR", help="where the private registry, store and Podman live (default: a "
                   "new directory under /var/tmp, removed at the end)")
    p.add_argument("--keep-workdir", action="store_true", help="keep --workdir's contents (logs) afterwards")
    p.add_argument("--jobs", "-j", metavar="N", type=int, default=os.cpu_count() or 1, help="layers converted at once")
    p.add_argument("--verbose", "-v", action="count", default=0, help="log more (repeat for debug)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    return p


def _json_list(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise convert_cli.UsageError(f"{flag} must be a JSON array of strings, e.g. '[\"/bin/sh\", \"-c\"]'") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise convert_cli.UsageError(f"{flag} must be a JSON array of strings")
    return value


def _prefetch_list(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise convert_cli.UsageError(f"cannot read --prefetch-list {path}: {exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def request_from_args(args: argparse.Namespace) -> OptimizeRequest:
    parse_location(args.src), parse_location(args.dst)  # a bad location is a usage error before any work
    if args.timeout <= 0:
        raise convert_cli.UsageError("--timeout must be positive")
    if args.jobs < 1:
        raise convert_cli.UsageError("--jobs must be at least 1")
    for item in args.env:
        if "=" not in item or item.startswith("="):
            raise convert_cli.UsageError(f"--env {item!r}: expected K=V")
    try:
        wait_line = re.compile(args.wait_line) if args.wait_line is not None else None
    except re.error as exc:
        raise convert_cli.UsageError(f"--wait-line is not a valid regular expression: {exc}") from None
    try:
        platform = platform_from_text(args.platform) if args.platform else None
    except ConvertError as exc:
        raise convert_cli.UsageError(str(exc)) from None
    spec = WorkloadSpec(entrypoint=_json_list(args.entrypoint, "--entrypoint"),
                        args=_json_list(args.args, "--args") or [], env=list(args.env), mounts=list(args.mount),
                        network=args.network, timeout=args.timeout, wait_line=wait_line)
    return OptimizeRequest(
        src=args.src, dst=args.dst, workload=spec, format=convert_cli._FORMATS[args.format],
        prefetch_patterns=_prefetch_list(args.prefetch_list),
        convert=ConvertOptions(platform=platform, jobs=args.jobs), insecure=args.insecure, authfile=args.authfile,
        workdir=Path(args.workdir) if args.workdir else None, keep_workdir=args.keep_workdir,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM too unwinds through optimize's cleanup (store unmounted, Podman removed)


def run(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    if os.geteuid() != 0:
        raise convert_cli.UsageError("optimize needs root: it mounts a private store (FUSE) and runs rootful Podman")
    signal.signal(signal.SIGTERM, _interrupt)
    result = optimize(request)
    if args.record_out:
        with open(args.record_out, "w", encoding="utf-8") as out:
            write_record(result.record, out)
    ran = result.run
    how = f"exited with {ran.exit_code}" if ran.ended == ENDED_EXIT else \
        ("stopped at its --wait-line" if ran.ended == "wait-line" else f"stopped at the {args.timeout:g} s timeout")
    if ran.ended == ENDED_EXIT and ran.exit_code:
        tail = "\n  ".join(ran.output_tail[-5:])
        sys.stderr.write(f"{PROG}: warning: the workload exited with {ran.exit_code}; its record is used anyway"
                         + (f"; its last output:\n  {tail}" if tail else "") + "\n")
    sys.stderr.write(f"workload ran {ran.seconds:.2f} s ({how}); prioritized {result.files} files, "
                     f"{convert_cli._human(result.bytes)}, in {len({e['layerIndex'] for e in result.record})} "
                     f"of {len(result.converted.layers)} layers\n")
    sys.stdout.write(result.converted.manifest.digest + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return convert_cli.command_main(PROG, build_parser, run, argv, failures=(LocalEnvError, ControlError))
