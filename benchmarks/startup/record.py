"""The `--record-in` file for the optimized images: the files the workload opens, in first-open order.

The workload is run once, chrooted in the image's union root filesystem under
`strace -f` (open, openat, openat2, execve, execveat). The trace starts with the
host-side `chroot` binary, so everything before its successful `chroot()` call is
skipped. A relative path (a server that chdir'ed to its document root, a compiler
opening a source beside it) is taken from strace's `-y` decoration of the returned
descriptor, the path the kernel opened. Each successfully opened or executed path
is followed through its symlinks inside the root (the link and its target are both
recorded), the ELF
interpreter of each executed binary is added (the kernel loads it without a
traced call), and only paths that exist in the image's layers are kept. The
result is the nerdctl/ctr-remote record format: one `{"path": "..."}` per line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .rootfs import elf_interpreter, resolve_in_root

# `1234 openat(AT_FDCWD, "/usr/lib/x", O_RDONLY) = 3`, possibly split by -f into
# `... <unfinished ...>` and `<... openat resumed>...) = 3`.
_CALL_RE = re.compile(r'^(\d+)\s+(chroot|open|openat|openat2|execve|execveat)\((.*)$')
_RESUMED_RE = re.compile(r'^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$')
_PATH_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
# `= 3`, or with strace -y `= 3</host/path/of/the/file>`
_RESULT_RE = re.compile(r'\)\s+=\s+(-?\d+)(?:<(.*)>)?\s*$')


def _decode(text: str) -> str:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "replace")


def traced_paths(strace_text: str, root: Path | None = None) -> list[str]:
    """Paths opened or executed successfully after the chroot, in order, as the process saw them.

    A relative path is replaced by the path the returned descriptor names (strace -y), made
    relative to the chroot `root` again; without that decoration it is kept as it was.
    """
    prefix = str(Path(root).resolve()).rstrip("/") + "/" if root is not None else None
    chrooted = False
    pending: dict[str, tuple[str, str]] = {}
    events: list[str] = []

    def finish(call: str, args: str, rest: str) -> None:
        nonlocal chrooted
        result = _RESULT_RE.search(rest)
        if result is None or int(result.group(1)) < 0:
            return
        paths = _PATH_RE.findall(args)
        if call == "chroot":
            chrooted = True
            return
        if not chrooted or not paths:
            return
        # openat(dirfd, "path", ...) and execveat(dirfd, "path", ...): the first quoted string is the path
        path = _decode(paths[0])
        opened = result.group(2)
        if not path.startswith("/") and prefix is not None and opened and opened.startswith(prefix):
            path = "/" + _decode(opened)[len(prefix):]
        events.append(path)

    for line in strace_text.splitlines():
        m = _CALL_RE.match(line)
        if m:
            pid, call, rest = m.groups()
            if rest.endswith("<unfinished ...>"):
                pending[pid] = (call, rest)
                continue
            finish(call, rest, rest)
            continue
        m = _RESUMED_RE.match(line)
        if m and m.group(1) in pending:
            call, args = pending.pop(m.group(1))
            finish(call, args + m.group(3), m.group(3))
    return events


def build_record(strace_text: str, root: Path, image_paths: set[str]) -> list[str]:
    """The ordered, de-duplicated image paths to prioritize."""
    ordered: dict[str, None] = {}
    for raw in traced_paths(strace_text, root):
        if raw.startswith("/proc/") or raw.startswith("/dev/") or raw.startswith("/sys/"):
            continue
        resolved = resolve_in_root(root, raw)
        for path in resolved:
            ordered.setdefault(path, None)
        if resolved:
            interp = elf_interpreter(root / resolved[-1])
            if interp:
                for path in resolve_in_root(root, interp):
                    ordered.setdefault(path, None)
    return [p for p in ordered if p in image_paths]


def write_record(paths: list[str], out: Path) -> None:
    out.write_text("".join(json.dumps({"path": p}) + "\n" for p in paths))
