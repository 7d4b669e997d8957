"""Import readahead: when a Python, JavaScript or C/C++ file is read, fetch what it imports, and theirs.

Python imports one module at a time: it reads a module, runs it, and only then opens what that
module imports. On a lazily pulled image each of those opens is a miss and a round trip (pyaws's
start made 202 dependent requests; neighbour fetch brings a package's modules stored together,
not the next package's). The top-level imports of a module are written in it (`layer.pyimports`
reads them from the bytecode or the source), so as soon as a module's first bytes are read, a
worker finds the modules it imports where Python would (the module's own package for relative
imports; for absolute ones the importing file's top directory, then the interpreter's standard
library and site directories, in the image's merged layers) and starts fetching every one not
cached yet, all at once. It then reads each of them as it arrives and does the same with what
they import, so an import chain of hundreds of modules costs about as many round trips as it is
deep, not as it is long. Python then finds its modules cached or in flight.

Node.js is the same chain with `require`: a `.js` file's specifiers (`layer.jsrequires`) are
found as Node.js finds them (`policies.requires`: relative files, `node_modules` up the tree, the
global folders where Debian's `node-*` packages live); a package is reached through its
`package.json`, which the worker reads in turn for the entry point it names. A C or C++ compiler
is the same chain with `#include` (`layer.cincludes`, found on GCC's include path by
`policies.includes`; a header is searched as C++ when what included it was).

The worker looks at the files queued a wave at a time (what arrived together) and fetches what
the whole wave imports in one plan per layer, as at most `_BATCHES` multi-range requests: a C++
compile reads a thousand headers, and a request per header cost more store CPU than the round
trips it saved (cxx: 569 GETs and 1.07x the time without the policy; with waves 194 GETs, 0.91x).

An optimized image (a layer with prioritized files) gets none, as it gets no start fetch: its
prefetch is the record of its start, and reading every module it brings to find what the
prefetch brings anyway cost 1.3-1.5x the start time there (three runs each, python, pynopyc and
pyaws optimized: the worker's CPU on two cores, and its requests between the pieces).

What is followed is what runs at import: statements at a module's top level, under `try:` and
`if` included, except blocks that do not run on import here (`if TYPE_CHECKING:`, `if __name__ ==
"__main__":`, Windows-only branches) and standard library modules CPython keeps frozen; imports
inside functions and classes are not (they may never run). A module that
is not there (an optional dependency) costs nothing. A wrong guess costs a module's bytes, never
a wait: nothing waits on this but the worker, and reads of the modules it fetches are not misses
(no neighbours, no further policies). Bounded: modules of at most `_MODULE_MAX` compressed bytes,
`_MAX_QUEUED` files waiting to be read, each file looked at once.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import weakref
from typing import Any, Callable, NamedTuple, Sequence

from ...formats.toc import DIR, TocEntry
from ..blob_index import stored_size
from ..cincludes import includes_of, is_c_source, is_cxx
from ..jsrequires import package_main, requires_of
from ..pyimports import Import, imports_of
from .base import FetchPolicy, HintWorker, PolicyHost, SharedWorker
from .includes import IncludeFinder
from .libraries import lookup_in_layers, resolve_in_layers
from .requires import RequireFinder

log = logging.getLogger(__name__)

_MODULE_MAX = 2 << 20  # compressed bytes of the largest module fetched ahead
_READ_MAX = 4 << 20  # bytes of the largest module read to find its imports
_MAX_QUEUED = 4096
_GAP = 8 << 10  # module files this close in the blob (a tar header apart) share a request
_BATCHES = 2  # requests one wave's imports go out in per layer: each a multi-range GET, so one round
              # trip either way; with the layer's eight, python unoptimized made 224 GETs in 7.0 s,
              # with two 206 in 6.6 s (three runs each, before waves)
_WAVE = 64  # queued files looked at before their imports are fetched together
_MEMOS = 16  # images whose module lookups are remembered
_PYC = re.compile(r"(?P<module>[^.]+)\.(?P<tag>[a-z]+-(?P<major>\d)(?P<minor>\d+))(?:\.opt-\d)?\.pyc$")
_VERSION_DIR = re.compile(r"python(\d)\.(\d+)$")
# Standard library modules CPython 3.11 and later keep frozen in the interpreter (`_imp.is_frozen`):
# imported without reading their files. importlib's _bootstrap modules are the frozen
# `_frozen_importlib*` under another name.
_FROZEN = frozenset({"abc", "codecs", "io", "_collections_abc", "_sitebuiltins", "genericpath", "ntpath", "posixpath",
                     "os", "site", "stat", "importlib.util", "importlib.machinery", "runpy", "zipimport",
                     "importlib._bootstrap", "importlib._bootstrap_external"})


class ModuleFile(NamedTuple):
    """Where a module file sits: the directory of its source (`pkg` for `pkg/__pycache__/m.pyc`),
    its module name (`m`), the bytecode tag of the interpreter that wrote it (`cpython-311`, ''
    for a source) and that interpreter's version (`3.11`, '' when the path does not say)."""

    directory: str
    module: str
    tag: str
    version: str


def module_file(path: str) -> ModuleFile | None:
    """What `path` (a `.py` or `.pyc` file) is as a module; None for anything else."""
    parent, _, base = path.strip("/").rpartition("/")
    m = _PYC.match(base)
    if m is not None and parent.rpartition("/")[2] == "__pycache__":
        return ModuleFile(parent.rpartition("/")[0], m["module"], m["tag"], f"{m['major']}.{m['minor']}")
    if base.endswith(".py") and len(base) > 3:
        version = next((f"{v[1]}.{v[2]}" for part in parent.split("/") if (v := _VERSION_DIR.match(part))), "")
        return ModuleFile(parent, base[:-3], "", version)
    return None


class ModuleFinder:
    """Finds module files in an image's merged layers the way CPython's path finder does, for
    the modules one file imports. `layers` topmost first."""

    def __init__(self, layers: Sequence[Any], memo: dict[tuple[str, ...], Any] | None = None) -> None:
        """`memo`: answers of earlier finders on the same `layers` (a layer's tree never
        changes), so a module every file imports is looked up once."""
        self.layers = layers
        self.memo = {} if memo is None else memo

    def files_imported_by(self, where: ModuleFile, imports: Sequence[Import]) -> list[tuple[Any, TocEntry]]:
        """(layer, entry) of every module file `imports` (made by the module `where`) makes
        Python read: each package on the way to a module, the module, and from-list names that
        are submodules; in import order, each once."""
        version = where.version or self._version()
        tag = where.tag or (f"cpython-{version.replace('.', '')}" if version else "")
        roots = [self._top_directory(where, tag)]
        if version:  # (without an interpreter in the image, only the importing file's own tree)
            roots += [f"usr/lib/python{version}", f"usr/local/lib/python{version}/dist-packages",
                      "usr/lib/python3/dist-packages", f"usr/local/lib/python{version}/site-packages",
                      f"usr/lib/python{version}/site-packages"]
        found: dict[tuple[int, int], tuple[Any, TocEntry]] = {}
        for imp in imports:
            if imp.level:
                base = where.directory.split("/")
                if imp.level - 1 >= len(base):
                    continue
                base = base[: len(base) - (imp.level - 1)]
                hits = self._module(["/".join(base)], imp.module, imp.names, tag)
            else:
                hits = self._module(list(dict.fromkeys(roots)), imp.module, imp.names, tag)
            for layer, entry in hits:
                if not self._frozen(entry.name, version):
                    found.setdefault((id(layer), entry.ino), (layer, entry))
        return list(found.values())

    @staticmethod
    def _frozen(name: str, version: str) -> bool:
        """Whether file `name` is a standard library module interpreter `version` has frozen."""
        stdlib = f"usr/lib/python{version}/"
        if not name.startswith(stdlib) or not version.startswith("3.") or int(version[2:]) < 11:
            return False
        where = module_file(name)
        if where is None:
            return False
        package = where.directory[len(stdlib):].replace("/", ".")
        dotted = package if where.module == "__init__" else f"{package}.{where.module}".lstrip(".")
        return dotted in _FROZEN

    def _module(self, roots: list[str], dotted: str, names: tuple[str, ...], tag: str) -> list[tuple[Any, TocEntry]]:
        """Files read importing `dotted` (from `names`): from the first of `roots` holding its top
        package or module; failing that, from the first holding a directory of that name (a
        namespace package, which Python takes only when no root has a regular one)."""
        parts = [p for p in dotted.split(".") if p]
        if not parts:  # `from . import x`: the package itself is imported already
            return [hit for n in names if (hit := self._step(roots[0], n, tag)[0]) is not None]
        for root in roots:
            if self._step(root, parts[0], tag)[0] is not None:
                return self._walk(root, parts, names, tag)
        for root in roots:
            if self._step(root, parts[0], tag)[1] is not None:
                return self._walk(root, parts, names, tag)
        return []

    def _walk(self, root: str, parts: list[str], names: tuple[str, ...], tag: str) -> list[tuple[Any, TocEntry]]:
        """The files of each package on the way from `root` down `parts`, then the from-list's submodules."""
        out = []
        directory: str | None = root
        for part in parts:
            hit, directory = self._step(directory, part, tag)
            if hit is not None:
                out.append(hit)
            if directory is None:  # a plain module (nothing below it), or nothing
                return out
        return out + [hit for n in names if (hit := self._step(directory, n, tag)[0]) is not None]

    def _step(self, directory: str | None, name: str, tag: str) -> tuple[tuple[Any, TocEntry] | None, str | None]:
        """Module `name` in `directory`: (the file Python reads, the package directory to go on
        in (None for a plain module or nothing))."""
        if directory is None:
            return None, None
        key = ("step", directory, name, tag)
        answer = self.memo.get(key)
        if answer is None:
            answer = self.memo[key] = self._find_step(directory, name, tag)
        return answer

    def _find_step(self, directory: str, name: str, tag: str) -> tuple[tuple[Any, TocEntry] | None, str | None]:
        path = f"{directory}/{name}" if directory else name
        hit = self._first_file(f"{path}/__pycache__/__init__.{tag}.pyc" if tag else "", f"{path}/__init__.py")
        if hit is not None:  # a package
            return hit, path
        hit = self._first_file(f"{directory}/__pycache__/{name}.{tag}.pyc" if tag else "", f"{path}.py")
        if hit is not None:  # a module
            return hit, None
        found = lookup_in_layers(self.layers, path.strip("/"))
        if found is not None and found[1].type == DIR:  # a namespace package
            return None, path
        return None, None

    def _first_file(self, *candidates: str) -> tuple[Any, TocEntry] | None:
        """The first of `candidates` ('' skipped) that is a regular file in the layers: the
        bytecode, then the source."""
        return next((hit for c in candidates if c and (hit := resolve_in_layers(self.layers, c)) is not None), None)

    def _top_directory(self, where: ModuleFile, tag: str) -> str:
        """The directory on `sys.path` the importing file was found in: the first above its
        directory that is not a package."""
        key = ("top", where.directory, tag)
        answer = self.memo.get(key)
        if answer is None:
            answer = self.memo[key] = self._find_top_directory(where.directory, tag)
        return answer

    def _find_top_directory(self, directory: str, tag: str) -> str:
        while directory and (resolve_in_layers(self.layers, f"{directory}/__init__.py") is not None
                             or resolve_in_layers(self.layers, f"{directory}/__pycache__/__init__.{tag}.pyc") is not None):
            directory = directory.rpartition("/")[0]
        return directory

    def _version(self) -> str:
        """The interpreter's version when the importing file's path does not say: the newest
        `usr/lib/python3.N` in the image."""
        answer = self.memo.get(("version",))
        if answer is None:
            answer = self.memo[("version",)] = self._find_version()
        return answer

    def _find_version(self) -> str:
        for minor in range(20, 5, -1):
            found = lookup_in_layers(self.layers, f"usr/lib/python3.{minor}")
            if found is not None and found[1].type == DIR:
                return f"3.{minor}"
        return ""


class ImportReadahead(HintWorker):
    """One worker thread for every layer's import lookups; `module_read` only queues (it is
    called on the read path). `modules` counts the files looked at, `started` the module files
    it started fetching."""

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()
        self._memos: dict[tuple[int, ...], dict[tuple[str, ...], Any]] = {}  # per image (its layers' ids)
        self._cxx: dict[tuple[int, int], bool] = {}  # headers queued: whether what included them is C++
        self._lock = threading.Lock()
        self.modules = 0
        self.started = 0
        super().__init__("import-readahead", _MAX_QUEUED)

    def module_read(self, image_layers: Callable[[], Sequence[Any]], layer: Any, entry: TocEntry) -> bool:
        """Look at module file `entry` of `layer`, once per file (True: this time)."""
        if not self._first_time(layer, entry):
            return False
        self._put(image_layers, layer, entry)
        return True

    def _first_time(self, layer: Any, entry: TocEntry) -> bool:
        with self._lock:
            seen = self._seen.setdefault(layer, set())
            if entry.ino in seen:
                return False
            seen.add(entry.ino)
            return True

    def _run(self) -> None:
        """Look at the queued files a wave at a time: what waits in the queue when the worker
        gets to it (up to `_WAVE` files, which arrived together) is read, and what all of them
        import is fetched in one plan per layer, so a wide tree of small files (C++ headers)
        costs a request per wave, not one per file."""
        while True:
            wave = [self._queue.get()]
            while wave[-1] is not None and len(wave) < _WAVE:
                try:
                    wave.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            hits: dict[int, tuple[Callable[[], Sequence[Any]], list[tuple[Any, TocEntry]], str]] = {}
            for item in wave:
                if item is None:
                    continue
                try:
                    found = self._follow(*item)
                except Exception as e:  # a hint: never let it take the worker down
                    log.debug("import readahead for %s failed: %s", item[2].name, e)
                    continue
                if found:
                    hits.setdefault(id(item[0]), (item[0], [], item[2].name))[1].extend(found)
            for image_layers, found, first in hits.values():
                try:
                    self.fetch_and_follow(image_layers, found, first)
                except Exception as e:
                    log.debug("import readahead after %s failed: %s", first, e)
            if wave[-1] is None:
                return

    def _follow(self, image_layers: Callable[[], Sequence[Any]], layer: Any, entry: TocEntry) -> list[tuple[Any, TocEntry]]:
        """The files module `entry` of `layer` imports (read, waiting for its bytes if they are on their way)."""
        name = entry.name
        kind = module_kind(name)
        if kind is None or entry.size > _READ_MAX or layer.reader.closed.is_set():
            return []
        if layer.config.policy_enabled("prefetch") and any(x.toc.prefetch_landmark_offset is not None
                                                           for x in image_layers()):
            return []  # an optimized image: its prioritized files are the record of its start, prefetched already
        data = layer.read(entry, 0, entry.size, keep_in_memory=False)  # (the interpreter's own read keeps it)
        layers = image_layers()
        if kind == "python":
            imports = imports_of(name, data)
            where = module_file(name)
            if not imports or where is None:
                return []
            hits = ModuleFinder(layers, self._memo(layers)).files_imported_by(where, imports)
        elif kind == "javascript":
            specifiers = requires_of(data)
            if not specifiers:
                return []
            hits = RequireFinder(layers, self._memo(layers)).files_required_by(name, specifiers)
        elif kind == "c":
            includes = includes_of(data)
            if not includes:
                return []
            cxx = self._cxx.pop((id(layer), entry.ino), None)  # a header is compiled as what includes it
            cxx = is_cxx(name) if cxx is None else cxx
            hits = IncludeFinder(layers, self._memo(layers)).files_included_by(name, includes, cxx=cxx)
            if len(self._cxx) > _MAX_QUEUED:
                self._cxx.clear()
            for owner, header in hits:
                self._cxx.setdefault((id(owner), header.ino), cxx)
        else:  # a package.json: the package's entry point
            hit = RequireFinder(layers, self._memo(layers)).package_entry(name, package_main(data))
            hits = [hit] if hit is not None else []
        self.modules += 1
        return hits

    def fetch_imports(self, image_layers: Callable[[], Sequence[Any]], where: ModuleFile, imports: Sequence[Import],
                      what: str) -> int:
        """Start fetching the module files `imports` (made by `where`) reads and queue them to be
        looked at in turn; how many were started. `what` names the importer in the log."""
        layers = image_layers()
        return self.fetch_and_follow(image_layers, ModuleFinder(layers, self._memo(layers)).files_imported_by(where, imports),
                                     what)

    def fetch_and_follow(self, image_layers: Callable[[], Sequence[Any]], hits: Sequence[tuple[Any, TocEntry]],
                         what: str) -> int:
        """Start fetching the files `hits` not looked at yet, one plan per layer, and queue them
        to be looked at in turn; how many were started. `what` names the importer in the log."""
        wanted: dict[int, tuple[Any, list[TocEntry]]] = {}  # per layer holding some
        for owner, module in hits:
            if module.chunks and stored_size(module) <= _MODULE_MAX and self._first_time(owner, module):
                wanted.setdefault(id(owner), (owner, []))[1].append(module)
        started = 0
        for owner, modules in wanted.values():
            # one plan: neighbours share a range, and the ranges at most _BATCHES multi-range requests
            started += len(owner.fetch_files_ahead(modules, "import_chunks", gap=_GAP, batches=_BATCHES))
            for module in modules:
                self._put(image_layers, owner, module)  # cached or on its way: its imports next
        if started:
            self.started += started
            log.debug("%s imports %d module file(s) not cached: fetching them ahead", what, started)
        return started

    def _memo(self, layers: Sequence[Any]) -> dict[tuple[str, ...], Any]:
        """The lookups remembered for the image made of `layers`."""
        key = tuple(id(x) for x in layers)
        memo = self._memos.get(key)
        if memo is None:
            if len(self._memos) >= _MEMOS:  # (images come and go: keep the recent ones)
                self._memos.pop(next(iter(self._memos)))
            memo = self._memos[key] = {}
        return memo


def module_kind(name: str) -> str | None:
    """'python', 'javascript', 'package' (a package.json) or 'c' (a C or C++ source or header)
    for a file import readahead reads; None for any other."""
    if name.endswith((".py", ".pyc")):
        return "python"
    if name.endswith((".js", ".cjs", ".mjs")):
        return "javascript"
    if name.endswith("/package.json") or name == "package.json":
        return "package"
    if is_c_source(name):
        return "c"
    return None


shared_import_worker = SharedWorker(ImportReadahead)  # the process's import readahead worker


class ImportReadaheadPolicy(FetchPolicy):
    name = "import_readahead"

    def __init__(self, layer: PolicyHost) -> None:
        self.layer = layer
        self.worker: ImportReadahead = layer.import_worker or shared_import_worker()

    def on_data(self, entry: TocEntry, offset: int, data: bytes) -> None:
        if offset != 0 or module_kind(entry.name) in (None, "package"):
            return
        if self.worker.module_read(self.layer.image_layers, self.layer, entry):
            self.layer.counters.add("modules_read")
