"""Start fetch: once every layer of an image is open, fetch what its configured command reads first.

Every container begins by exec'ing the command its image config names (Entrypoint + Cmd): the
program, its ELF interpreter and the libraries it loads, the script it runs, the commands of
that script and the files the command line names. On an unoptimized image each of these is a
miss, and the misses come one after another (the loader opens a library only once it has read
the last one; a shell runs its next command only when the last one ended). They are also known
before the container exists: podman spends 0.5-1.5 s between looking up the layers and running
the command (the rest of the pull, creating the container), with the link idle.

So when the last layer of an image is open, a worker thread reads the config's command and, in
the merged view of the image's layers (whiteouts honoured, symlinks followed):
1. resolves the program (PATH from the config's Env, else the default one; WorkingDir for a
   relative path) and starts fetching it whole; for an ELF file its interpreter (PT_INTERP) and
   its DT_NEEDED libraries, and theirs in turn; for a script its `#!` interpreter, and the script
   is read as in 2. Through a wrapper (`tini --`, `env A=1`, `nice -n 5`) the command it runs
   too; after an entrypoint script, its first argument when that is a program (`exec "$@"`);
2. takes the words of the command line: a path (absolute, or relative with a `/`; also the
   parts of `a.jar:b.jar` and the value of `--opt=/path`) naming a regular file; the words in
   command position of a shell's `-c` string, resolved like the program. A small text file it
   names (a script) is read, and the programs and paths in it are taken the same way, one level
   deep, never further;
3. for a Python interpreter run with `-c CODE` or `-m MODULE`, hands the modules that code
   imports to import readahead (policies/imports.py), which fetches them and what they import
   in turn, when that policy is on;
4. starts the programs, then at once the files the command line names, in the order named and
   one piece after another (`Layer.fetch_files_in_turn`: they are read in that order, the first
   as soon as the program is exec'd; several requests at once would share the link and bring
   every file late), then what the programs load, found by reading their headers (which waits
   for their first chunk: the files' requests do not). The files named in a script come last,
   once the programs and libraries are in (bounded wait).

An optimized image (a layer with a `.prefetch.landmark`) gets none: its prioritized files are the
record of its start and are prefetched already.

Everything is a guess made from the image alone (podman may run another command: then the bytes
are fetched early for nothing, as the background fetch would later), so it is bounded:
`start_fetch_limit` compressed bytes per image, each file at most `library_fetch_limit`, a
script read at most `_MAX_SCRIPT` bytes, at most `_MAX_FILES` files. Directories named on the
command line are not fetched. Nothing waits on this, and nothing it does fails a read: errors
end the plan with a debug line.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import shlex
import threading
import time
from dataclasses import dataclass, field
from itertools import dropwhile
from typing import Any, Sequence

from ..formats.toc import REG, TocEntry
from .blob_index import stored_size
from .config import LayerConfig
from .elf import ELF_MAGIC, dynamic_info
from .errors import LayerReadError
from .policies.imports import ModuleFile, shared_import_worker
from .policies.libraries import find_libraries, resolve_in_layers
from .pyimports import Import, imports_of

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELLS = frozenset({"sh", "dash", "bash", "ash", "ksh", "mksh", "zsh", "busybox"})
_MAX_FILES = 256
_MAX_SCRIPT = 64 << 10       # a named text file larger than this is fetched, not read for more names
_MAX_LIBRARY_DEPTH = 8
_WAIT_PROGRAMS = 10.0        # seconds the plan waits for the programs before it starts the other files
# Shell words after which the next word is a command again.
_KEYWORDS = frozenset({"then", "do", "else", "elif", "if", "while", "until", "!", "time", "exec", "command", "{"})
# Programs that run the command given after their own options (and, for `env`, assignments):
# fetched themselves, and that command too. An init like tini is often the Entrypoint.
WRAPPERS = frozenset({"env", "nice", "nohup", "timeout", "stdbuf", "setsid", "xargs", "tini", "dumb-init",
                      "catatonit"})
_WRAPPER_ARGUMENT = re.compile(r"^(?:-.*|[A-Za-z_][A-Za-z0-9_]*=.*|\d+(?:\.\d+)?[smhd]?)$")  # an option, NAME=V, 5, 10s
_CONTROL = frozenset({";", "&&", "||", "|", "&", "(", ")", ";;", "|&", "`"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATOR_CHARS = frozenset(";&|()<>")
_SHELL_SHEBANG = re.compile(r"#!\s*\S*/(?:env\s+)?(?:" + "|".join(sorted(SHELLS)) + r")\b")
_PYTHON = re.compile(r"python(?:\d(?:\.\d+)?)?$")
_PYTHON_VERSION = re.compile(r"python(\d\.\d+)$")
_PATH_IN_TEXT = re.compile(r"(?<![\w.~$/-])/(?:[\w.+@-]+/)*[\w.+@-]+")


@dataclass(frozen=True)
class StartCommand:
    """What the image config says the container runs: argv, the PATH it is resolved in, its cwd."""

    argv: tuple[str, ...]
    path: tuple[str, ...]
    workdir: str = "/"

    @classmethod
    def from_config(cls, config_raw: bytes) -> StartCommand | None:
        """The command of an OCI/Docker image config (None without one, or if it is not JSON)."""
        try:
            doc = json.loads(config_raw)
        except (ValueError, UnicodeDecodeError):
            return None
        conf = doc.get("config") if isinstance(doc, dict) else None
        if not isinstance(conf, dict):
            return None
        argv = [w for part in ("Entrypoint", "Cmd") if isinstance(conf.get(part), list)
                for w in conf[part] if isinstance(w, str)]
        if not argv:
            return None
        path = DEFAULT_PATH
        for item in conf.get("Env") or []:
            if isinstance(item, str) and item.startswith("PATH="):
                path = item[5:]
        workdir = conf.get("WorkingDir") if isinstance(conf.get("WorkingDir"), str) and conf.get("WorkingDir") else "/"
        return cls(tuple(argv), tuple(d for d in path.split(":") if d.startswith("/")), workdir)


@dataclass
class StartPlanReport:
    """What one image's start fetch did (for the log and the tests)."""

    programs: list[str] = field(default_factory=list)   # programs, interpreters and libraries, in order
    files: list[str] = field(default_factory=list)      # other files the command names
    started_bytes: int = 0                               # compressed bytes of the files it fetched
    skipped: list[str] = field(default_factory=list)    # files left out by a limit
    modules: int = 0                                     # module files of `python -c`/`-m` handed to import readahead


class StartFetch:
    """One image's plan: `run()` resolves, starts and waits as the module says (call it on a
    thread of its own). `layers` are the image's open layers, topmost first."""

    def __init__(self, layers: Sequence[Any], command: StartCommand, *, limit: int, file_limit: int,
                 wait_programs: float = _WAIT_PROGRAMS) -> None:
        self.layers = list(layers)
        self.command = command
        self.limit = limit
        self.file_limit = file_limit
        self.wait_programs = wait_programs
        self.report = StartPlanReport()
        self._seen: set[tuple[int, str]] = set()
        self._started: list[tuple[Any, TocEntry]] = []  # programs, libraries, scripts: waited for
        self._exec_scripts: list[tuple[Any, TocEntry]] = []  # programs that turned out to be `#!` scripts

    # ---- the plan ------------------------------------------------------------------------------

    def run(self) -> StartPlanReport:
        programs: list[tuple[Any, TocEntry]] = []
        scripts: list[tuple[Any, TocEntry, bool]] = []  # (layer, entry, shell source)
        data: list[tuple[Any, TocEntry]] = []
        argv = list(self.command.argv)
        while True:  # the program, and through wrappers (`tini --`, `env A=1`) the command they run
            program = self._resolve_command(argv[0])
            if program is not None:
                programs.append(program)
            if posixpath.basename(argv[0]) not in WRAPPERS:
                break
            rest = list(dropwhile(_WRAPPER_ARGUMENT.match, argv[1:]))
            if not rest:
                break
            argv = rest
        shell = posixpath.basename(argv[0]) in SHELLS
        words = argv[1:]
        if words and not shell and words[0][:1] != "-" and "/" not in words[0]:
            # `ENTRYPOINT ["/docker-entrypoint.sh"]` with `CMD ["postgres"]`: an entrypoint script
            # runs its first argument when that is a program (`exec "$@"`)
            hit = self._resolve_command(words[0])
            if hit is not None and hit[1].mode & 0o111:
                programs.append(hit)
        at = next((i for i, w in enumerate(words[:3]) if w[:1] == "-" and w[1:2] != "-" and "c" in w[1:]), None)
        if shell and at is not None:  # `sh -c TEXT`, `bash -lc TEXT`, `sh -ec TEXT`
            text = words[at + 1] if at + 1 < len(words) else ""
            words = words[:at]
            self._take_shell_text(text, programs, data, scripts)
        operand = True  # a command's first file operand is its script (or its first input)
        for word in words:
            for layer, entry in self._paths_in_word(word):
                if operand:
                    scripts.append((layer, entry, shell))
                    operand = False
                else:
                    data.append((layer, entry))
        # The programs first, then at once the files the command line names, in the order named
        # (one piece after another: they are read in that order, by a command that is exec'd as
        # soon as its program is in); then what the programs load, found by reading them.
        taken = [(layer, entry) for layer, entry in programs if self._start(layer, entry, self.report.programs)]
        self._start_in_turn(data)
        self._start_programs(taken, started=True)
        if _PYTHON.match(posixpath.basename(argv[0])):
            self._python_imports(argv[0], words)
        found: list[tuple[Any, TocEntry]] = []
        # Scripts run as programs (an entrypoint script, found by its `#!`: started already) are
        # read like a shell's script operand.
        for layer, entry in list(self._exec_scripts):
            if entry.size <= _MAX_SCRIPT:
                self._scan_script(layer, entry, False, found, data)
        for layer, entry, is_shell in scripts:
            if entry.size > _MAX_SCRIPT:
                data.append((layer, entry))
            elif self._start(layer, entry, self.report.files):
                self._scan_script(layer, entry, is_shell, found, data)
        self._start_programs(found)
        self._wait_for(list(self._started))
        self._start_in_turn(data)  # (the files the scripts name)
        return self.report

    def _take(self, layer: Any, entry: TocEntry, names: list[str], *, waited_for: bool = True) -> bool:
        """Count `entry` of `layer` as started, once, within the limits; True if this call took it.
        `waited_for`: the files named in scripts start only once it is in."""
        key = (id(layer), entry.name)
        if key in self._seen:
            return False
        if len(self._seen) >= _MAX_FILES:
            self.report.skipped.append("/" + entry.name)
            return False
        size = stored_size(entry)
        if size > self.file_limit or self.report.started_bytes + size > self.limit:
            self.report.skipped.append("/" + entry.name)
            return False
        self._seen.add(key)
        self.report.started_bytes += size
        names.append("/" + entry.name)
        if waited_for:
            self._started.append((layer, entry))
        return True

    def _start(self, layer: Any, entry: TocEntry, names: list[str]) -> bool:
        """Fetch `entry` of `layer` whole, once, within the limits; True if this call took it."""
        if not self._take(layer, entry, names):
            return False
        layer.fetch_ahead(entry, counter="start_chunks")
        return True

    def _start_in_turn(self, files: list[tuple[Any, TocEntry]]) -> None:
        """Fetch `files` whole, once, within the limits, in the order given, one piece after
        another in each layer (`Layer.fetch_files_in_turn`)."""
        by_layer: dict[int, tuple[Any, list[TocEntry]]] = {}
        for layer, entry in files:
            if self._take(layer, entry, self.report.files, waited_for=False):
                by_layer.setdefault(id(layer), (layer, []))[1].append(entry)
        for layer, entries in by_layer.values():
            layer.fetch_files_in_turn(entries, "start_chunks")

    def _wait_for(self, hits: list[tuple[Any, TocEntry]]) -> None:
        """Wait (bounded) until the last byte of each file is in: the others start after them."""
        deadline = time.monotonic() + self.wait_programs
        for layer, entry in hits:
            if time.monotonic() >= deadline or entry.size == 0:
                continue
            try:
                layer.read(entry, entry.size - 1, 1)
            except (LayerReadError, OSError) as e:
                log.debug("start fetch: /%s not in: %s", entry.name, e)

    def _python_imports(self, program: str, words: list[str]) -> None:
        """`python3 -c CODE` or `python3 -m MODULE`: start fetching the modules the interpreter
        imports first (import readahead follows what they import); a script operand is followed
        when Python reads it, as any module."""
        config = getattr(self.layers[0], "config", None)
        if not isinstance(config, LayerConfig) or not config.policy_enabled("import_readahead"):
            return
        imports: list[Import] | None = None
        for i, word in enumerate(words[:-1]):
            if word == "-m":
                imports = [Import(words[i + 1], 0, ())]
            elif word[:1] == "-" and word[1:2] != "-" and word.endswith("c"):  # -c, -Bc, -uc
                imports = imports_of("-c.py", words[i + 1].encode())
            elif word[:1] == "-":
                continue
            break
        if not imports:
            return
        hit = self._resolve_command(program)
        version = _PYTHON_VERSION.search(hit[1].name) if hit is not None else None
        where = ModuleFile(self.command.workdir.strip("/"), "__main__", "", version[1] if version else "")
        worker = getattr(self.layers[0], "import_worker", None) or shared_import_worker()
        layers = self.layers
        self.report.modules = worker.fetch_imports(lambda: layers, where, imports, "the command line")

    # ---- programs ------------------------------------------------------------------------------

    def _resolve_command(self, word: str) -> tuple[Any, TocEntry] | None:
        """The regular file command `word` runs: a path as given, else the first hit on PATH."""
        if "/" in word:
            return self._resolve(word)
        for d in self.command.path:
            hit = self._resolve(f"{d}/{word}")
            if hit is not None and hit[1].mode & 0o111:
                return hit
        return None

    def _resolve(self, path: str) -> tuple[Any, TocEntry] | None:
        if not path.startswith("/"):
            path = posixpath.join(self.command.workdir, path)
        return resolve_in_layers(self.layers, path)

    def _start_programs(self, programs: list[tuple[Any, TocEntry]], *, started: bool = False) -> None:
        """Start each program, then what it needs in turn (breadth first): for an ELF file its
        interpreter (PT_INTERP) and DT_NEEDED libraries, for a script its `#!` interpreter.
        `started`: `programs` were started already (what they need was not)."""
        queue = [(layer, entry, 0) for layer, entry in programs]
        while queue:
            layer, entry, depth = queue.pop(0)
            took = (started and depth == 0) or self._start(layer, entry, self.report.programs)
            if not took or depth >= _MAX_LIBRARY_DEPTH:
                continue
            for hit in self._needs(layer, entry):
                queue.append((*hit, depth + 1))

    def _needs(self, layer: Any, entry: TocEntry) -> list[tuple[Any, TocEntry]]:
        try:
            head = layer.read(entry, 0, 256)
        except (LayerReadError, OSError) as e:
            log.debug("start fetch: cannot read /%s: %s", entry.name, e)
            return []
        found: list[tuple[Any, TocEntry] | None] = []
        if head[:4] == ELF_MAGIC:
            info = dynamic_info(lambda offset, size: layer.read(entry, offset, size))
            if info is None:
                return []
            if info.interpreter:
                found.append(self._resolve(info.interpreter))
            found += find_libraries(self.layers, info, entry)
        elif head[:2] == b"#!":
            self._exec_scripts.append((layer, entry))
            words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
            if words:
                found.append(self._resolve(words[0]))
                if posixpath.basename(words[0]) == "env" and len(words) > 1:
                    found.append(self._resolve_command(words[1]))
        return [hit for hit in found if hit is not None]

    # ---- words, scripts ------------------------------------------------------------------------

    def _paths_in_word(self, word: str) -> list[tuple[Any, TocEntry]]:
        """Regular files a command-line word names: itself, its `:`-separated parts, or the
        value after `=` (`--config=/etc/app.conf`)."""
        if any(c.isspace() for c in word):  # program text (`python3 -c CODE`): the paths in it
            return [hit for path in _PATH_IN_TEXT.findall(word) for hit in self._paths_in_word(path)]
        candidates = [word]
        if "=" in word:
            candidates.append(word.split("=", 1)[1])
        hits = []
        for cand in candidates:
            for part in cand.split(":") if ":" in cand else [cand]:
                if "/" not in part or part.startswith(("-", "$")) or len(part) > 4096:
                    continue
                hit = self._resolve(part)
                if hit is not None and hit[1].type == REG:
                    hits.append(hit)
        return hits

    def _take_shell_text(self, text: str, programs: list, data: list, scripts: list | None) -> None:
        """The commands and paths of shell source `text`: the words in command position resolved
        as programs (to `programs`), the files other words name (to `data`; the first file
        operand of a shell to `scripts`, unless that is None: scripts are read one level deep)."""
        for line in text.splitlines():
            try:
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                lexer.commenters = "#"
                tokens = list(lexer)
            except ValueError:  # unbalanced quotes and the like: words as they are
                tokens = line.split()
            command_position, shell_operand, skip, wrapped = True, False, False, False
            for tok in tokens:
                if skip:  # what a `>` writes to is not read
                    skip = False
                    continue
                if wrapped and _WRAPPER_ARGUMENT.match(tok):  # a wrapper's options: its command comes next
                    continue
                wrapped = False
                if tok in _CONTROL or set(tok) <= _OPERATOR_CHARS:
                    skip = ">" in tok
                    command_position = not ("<" in tok or ">" in tok)
                    shell_operand = False
                    continue
                if command_position:
                    if _ASSIGNMENT.match(tok):
                        data.extend(self._paths_in_word(tok))
                        continue
                    if tok in _KEYWORDS:
                        continue
                    hit = self._resolve_command(tok)
                    if hit is not None and hit[1].mode & 0o111:
                        programs.append(hit)
                    if posixpath.basename(tok) in WRAPPERS:
                        wrapped = True
                        continue
                    command_position = False
                    shell_operand = posixpath.basename(tok) in SHELLS
                    continue
                for layer, entry in self._paths_in_word(tok):
                    if shell_operand and scripts is not None:
                        scripts.append((layer, entry, True))
                    else:
                        data.append((layer, entry))
                    shell_operand = False

    def _scan_script(self, layer: Any, entry: TocEntry, is_shell: bool, programs: list, data: list) -> None:
        """Read a small text file the command runs and take the programs and paths it names
        (a shell script's commands too; not the scripts those name: one level deep)."""
        try:
            raw = layer.read(entry, 0, entry.size)
        except (LayerReadError, OSError) as e:
            log.debug("start fetch: cannot read /%s: %s", entry.name, e)
            return
        if b"\0" in raw[:4096]:
            return
        text = raw.decode(errors="replace")
        if is_shell or _SHELL_SHEBANG.match(text):
            self._take_shell_text(text, programs, data, None)
            return
        for word in _PATH_IN_TEXT.findall(text):
            data.extend(self._paths_in_word(word))


def start_image(layers: Sequence[Any], config_raw: bytes, *, name: str = "") -> threading.Thread | None:
    """Run the start fetch of an image (`layers` topmost first) on a daemon thread, with the
    limits of its layers' `LayerConfig`; None when switched off or the config names no command.
    The thread logs what it did."""
    config = getattr(layers[0], "config", None) if layers else None
    if not isinstance(config, LayerConfig) or config.start_fetch_limit <= 0:
        return None
    limit, file_limit = config.start_fetch_limit, config.library_fetch_limit
    if config.policy_enabled("prefetch") and any(layer.toc.prefetch_landmark_offset is not None for layer in layers):
        # An optimized image: its prioritized files are a record of its start, already being
        # prefetched; a guess adds nothing there but competition (five-run A/B, optimized
        # corpus: 1.015x the time with the guess, none of its cells faster).
        log.debug("%s: no start fetch: the image has prioritized files, prefetched", name)
        return None
    command = StartCommand.from_config(config_raw)
    if command is None:
        return None

    def run() -> None:
        began = time.monotonic()
        try:
            report = StartFetch(layers, command, limit=limit, file_limit=file_limit).run()
        except Exception as e:  # a guess: never let it take anything down
            log.debug("%s: start fetch failed: %s", name, e)
            return
        log.info("%s: start fetch of %d program(s) and %d file(s), %.1f MB, in %.2f s%s%s", name,
                 len(report.programs), len(report.files), report.started_bytes / 1e6, time.monotonic() - began,
                 f" ({len(report.skipped)} over the limits)" if report.skipped else "",
                 f"; {report.modules} Python module(s) the command imports handed to import readahead"
                 if report.modules else "")
        log.debug("%s: start fetch programs %s; files %s", name, report.programs, report.files)

    thread = threading.Thread(target=run, name="start-fetch", daemon=True)
    thread.start()
    return thread
