"""`stargz-store convert`: make an eStargz or zstd:chunked copy of an image.

    stargz-store convert [--format estargz|zstd-chunked] [--record-in FILE] [--chunk-size BYTES]
                         [--compression-level N] [--platform OS/ARCH | --all-platforms] [--insecure]
                         SRC DST

SRC and DST are `oci:DIR[:TAG]` (an OCI image layout) or `docker://HOST[:PORT]/REPO:TAG`. Every
failure ends in one line on stderr and a non-zero exit: 2 for bad usage, 1 for everything else,
130 when interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from typing import Callable, TextIO

from ..formats.errors import FormatError
from ..formats.layer_toc import FORMAT_ESTARGZ, FORMAT_ZSTD_CHUNKED
from ..registry import errors as registry_errors
from .converter import ConvertOptions, ConvertResult, ProgressCallback, ProgressEvent, convert_image
from .errors import ConvertError, LocationSyntaxError
from .location import Location, OciLocation, RegistryLocation, parse_location
from .oci_layout import OciLayoutDestination, OciLayoutSource
from .platform import platform_from_text
from .record import read_record

log = logging.getLogger(__name__)

PROG = "stargz-store convert"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_FORMATS = {"estargz": FORMAT_ESTARGZ, "zstd-chunked": FORMAT_ZSTD_CHUNKED, "zstd:chunked": FORMAT_ZSTD_CHUNKED}
_LEVELS = {FORMAT_ESTARGZ: (0, 9), FORMAT_ZSTD_CHUNKED: (1, 22)}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?)?\s*$", re.IGNORECASE)


class UsageError(Exception):
    """A bad command line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_size(text: str) -> int:
    """Bytes, or with a binary suffix: `4194304`, `4M`, `4MiB`, `512k`."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected bytes like 4194304 or 4M")
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[(m.group(2) or " ")[0].strip().lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Convert an image's layers to eStargz (default) or zstd:chunked so they can be pulled lazily. "
        "The result stays an ordinary OCI image that any runtime can pull.",
        epilog="SRC/DST: oci:DIR[:TAG] (OCI image layout) or docker://HOST[:PORT]/REPO:TAG (registry; "
        "plain HTTP for loopback hosts and with --insecure, HTTPS otherwise; credentials from the usual auth files).",
    )
    p.add_argument("--format", choices=sorted(_FORMATS), default="estargz", metavar="{estargz,zstd-chunked}",
                   help="layer format (default: estargz)")
    p.add_argument("--record-in", metavar="FILE",
                   help='JSON-lines file of paths to prioritize ({"path": "..."} per line, as nerdctl writes it; '
                        'with "layerIndex" on every line, as ctr-remote optimize and stargz-store record write it, '
                        'each layer gets the paths recorded from it)')
    p.add_argument("--chunk-size", metavar="BYTES", type=parse_size,
                   help="split files into chunks of this size (default: 4M)")
    p.add_argument("--compression-level", metavar="N", type=int,
                   help="gzip level 0-9 for estargz (default 6), zstd level 1-22 for zstd-chunked (default 3)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="which image of a multi-platform source to convert (default: this host's)")
    group.add_argument("--all-platforms", action="store_true", help="convert every platform and write an index")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and unverified TLS for the SRC and DST registries")
    p.add_argument("--authfile", metavar="FILE", help="credentials file (default: the usual containers/docker auth files)")
    p.add_argument("--jobs", "-j", metavar="N", type=int, default=os.cpu_count() or 1,
                   help="layers converted at once (default: number of CPUs)")
    p.add_argument("--executor", choices=("process", "thread"), default="process",
                   help="build layers in worker processes (default) or threads")
    p.add_argument("--verbose", "-v", action="count", default=0, help="log more (repeat for debug)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    return p


class TerminalProgress:
    """One line per layer on stderr, only when stderr is a terminal (pipes and logs stay clean)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        short = event.digest.split(":", 1)[-1][:12]
        if event.kind == "start":
            line = f"converting layer {short} ({_human(event.size)})"
        elif event.kind == "done" and event.result is not None:
            rate = event.result.diff_size / event.seconds if event.seconds > 0 else 0.0
            line = (f"[{event.done}/{event.total}] layer {short} -> {event.result.digest.split(':', 1)[1][:12]} "
                    f"({_human(event.result.size)}, {_human(rate)}/s)")
        elif event.kind == "manifest":
            line = f"manifest {short} written"
        else:
            return
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _registry_message(exc: registry_errors.RegistryError) -> str:
    if isinstance(exc, registry_errors.AuthError):
        return f"authentication failed: {exc}"
    if isinstance(exc, registry_errors.NotFoundError):
        return f"image not found: {exc}"
    if isinstance(exc, registry_errors.UnreachableError):
        return f"registry unreachable: {exc}"
    if isinstance(exc, registry_errors.RegistryTimeoutError):
        return f"registry timed out: {exc}"
    return f"registry error: {exc}"


def _options(args: argparse.Namespace) -> ConvertOptions:
    fmt = _FORMATS[args.format]
    if args.compression_level is not None:
        low, high = _LEVELS[fmt]
        if not low <= args.compression_level <= high:
            raise UsageError(f"--compression-level {args.compression_level} is out of range {low}-{high} for {args.format}")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    try:
        platform = platform_from_text(args.platform) if args.platform else None
    except ConvertError as exc:
        raise UsageError(str(exc)) from None
    record = read_record(args.record_in) if args.record_in else None
    if record is not None and not record.paths:
        log.warning("record file %s names no path: nothing is prioritized", args.record_in)
    by_layer = record.by_layer if record is not None and not args.all_platforms else None
    return ConvertOptions(
        format=fmt,
        prioritized=record.paths if record is not None and by_layer is None else (),
        layer_prioritized=by_layer,
        chunk_size=args.chunk_size,
        compression_level=args.compression_level,
        platform=platform,
        all_platforms=args.all_platforms,
        jobs=args.jobs,
        executor=args.executor,
    )


def _registry_client(insecure: bool, authfile: str | None, locations: list[Location]):
    from ..registry.client import RegistryClient
    from ..registry.config import RegistryConfig

    hosts = tuple(loc.reference.registry for loc in locations if isinstance(loc, RegistryLocation))
    config = RegistryConfig(insecure_hosts=hosts if insecure else (), auth_file=authfile)
    return RegistryClient(config)


def convert_locations(src: str, dst: str, options: ConvertOptions, *, insecure: bool = False,
                      authfile: str | None = None, progress: ProgressCallback | None = None) -> ConvertResult:
    """Convert the image at location text `src` into `dst` (both `oci:...` or `docker://...`)."""
    src_loc = parse_location(src)
    dst_loc = parse_location(dst)
    client = None
    if isinstance(src_loc, RegistryLocation) or isinstance(dst_loc, RegistryLocation):
        client = _registry_client(insecure, authfile, [src_loc, dst_loc])
    try:
        from .registry_store import RegistryDestination, RegistrySource

        source = OciLayoutSource(src_loc) if isinstance(src_loc, OciLocation) else RegistrySource(src_loc, client)
        destination = (OciLayoutDestination(dst_loc) if isinstance(dst_loc, OciLocation)
                       else RegistryDestination(dst_loc, client))
        return convert_image(source, destination, options, progress)
    finally:
        if client is not None:
            client.close()


def run(args: argparse.Namespace) -> int:
    options = _options(args)
    progress = TerminalProgress(sys.stderr) if sys.stderr.isatty() else None
    result = convert_locations(args.src, args.dst, options, insecure=args.insecure, authfile=args.authfile,
                               progress=progress)
    if progress is not None:
        sys.stderr.write(f"converted {args.src} -> {args.dst} ({result.manifest.digest})\n")
    sys.stdout.write(result.manifest.digest + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, build_parser, run, argv)


def command_main(prog: str, make_parser: Callable[[], argparse.ArgumentParser],
                 run_command: Callable[[argparse.Namespace], int], argv: list[str] | None,
                 failures: tuple[type[BaseException], ...] = ()) -> int:
    """Parse, set up logging (`--verbose`), run; every failure ends in one line on stderr and
    the exit codes of the module docstring. `failures` are further error types of exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"{prog}: error: {exc} (see --help)\n")
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format=f"{prog}: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run_command(args)
    except (UsageError, LocationSyntaxError) as exc:
        message, code = str(exc), EXIT_USAGE
    except (ConvertError, *failures) as exc:
        message, code = str(exc), EXIT_FAILURE
    except registry_errors.RegistryError as exc:
        message, code = _registry_message(exc), EXIT_FAILURE
    except FormatError as exc:
        message, code = f"invalid layer: {exc}", EXIT_FAILURE
    except OSError as exc:
        message, code = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), EXIT_FAILURE
    except KeyboardInterrupt:
        message, code = "interrupted", EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line for the user, the traceback with -vv
        log.debug("unexpected failure", exc_info=True)
        message, code = f"internal error: {type(exc).__name__}: {exc} (run with -vv for the traceback)", EXIT_FAILURE
    sys.stderr.write(f"{prog}: error: {message}\n")
    return code
