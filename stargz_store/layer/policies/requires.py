"""Where Node.js finds what a module requires, in an image's merged layers (for import readahead).

CommonJS resolution as Node.js 18 does it (modules.md, "All together"), the parts that name
files: a relative or absolute specifier is a file (as given, then `.js`, `.json`, `.cjs`,
`.mjs`) or a directory (its `package.json`, whose entry point is resolved once that file is
read, else `index.js`); a bare one (`express`, `lodash/fp`, `@scope/pkg/sub`) is looked for in
the `node_modules` of the requiring file's directory and each above it, then in the global
folders (Debian's `node-*` packages live in `/usr/share/nodejs`). Core modules (`fs`,
`node:path`) are in the binary. A name it cannot place is no hint.
"""
from __future__ import annotations

import posixpath
from typing import Any, Sequence

from ...formats.toc import DIR, TocEntry
from .libraries import lookup_in_layers, resolve_in_layers

# Node.js's module search after the node_modules chain, with Debian's additions (nodejs 18).
GLOBAL_FOLDERS = ("usr/local/lib/nodejs", "usr/local/share/nodejs", "usr/lib/x86_64-linux-gnu/nodejs",
                  "usr/lib/aarch64-linux-gnu/nodejs", "usr/share/nodejs", "usr/lib/nodejs", "usr/local/lib/node_modules",
                  "usr/lib/node_modules")
CORE = frozenset("""assert async_hooks buffer child_process cluster console constants crypto dgram
diagnostics_channel dns domain events fs http http2 https inspector module net os path perf_hooks process
punycode querystring readline repl stream string_decoder sys timers tls trace_events tty url util v8 vm
wasi worker_threads zlib""".split())
_EXTENSIONS = ("", ".js", ".json", ".cjs", ".mjs")
_MAX_SPECIFIERS = 256  # names looked at per module


class RequireFinder:
    """`files_required_by` and `package_entry` over `layers` (topmost first); `memo` as for
    `ModuleFinder` (a layer's tree never changes)."""

    def __init__(self, layers: Sequence[Any], memo: dict[tuple[str, ...], Any]) -> None:
        self.layers = layers
        self.memo = memo

    def files_required_by(self, path: str, specifiers: Sequence[str]) -> list[tuple[Any, TocEntry]]:
        """(layer, entry) of the file each of `specifiers` (required by the module at `path`)
        makes Node.js read first: the module, or a package's `package.json` or `index.js`."""
        directory = posixpath.dirname(path.strip("/"))
        out: dict[tuple[int, int], tuple[Any, TocEntry]] = {}
        for spec in specifiers[:_MAX_SPECIFIERS]:
            hit = self._specifier(directory, spec)
            if hit is not None:
                out.setdefault((id(hit[0]), hit[1].ino), hit)
        return list(out.values())

    def package_entry(self, manifest: str, main: str | None) -> tuple[Any, TocEntry] | None:
        """The file a package loads: `main` of its `package.json` at `manifest` (a file or a
        directory), else its `index.js`."""
        directory = posixpath.dirname(manifest.strip("/"))
        if main:
            target = posixpath.normpath(posixpath.join(directory, main))
            hit = self._file(target) or self._index(target)
            if hit is not None:
                return hit
        return self._index(directory)

    def _specifier(self, directory: str, spec: str) -> tuple[Any, TocEntry] | None:
        if spec.startswith("node:") or spec.split("/", 1)[0] in CORE:
            return None
        if spec.startswith(("./", "../", "/")) or spec in (".", ".."):
            target = posixpath.normpath(posixpath.join(directory, spec)).lstrip("/")
            return self._file(target) or self._directory(target)
        parts = spec.split("/")
        package = "/".join(parts[:2]) if spec.startswith("@") else parts[0]
        rest = spec[len(package):].lstrip("/")
        root = self._package_root(directory, package)
        if root is None:
            return None
        if rest:
            target = f"{root}/{rest}"
            return self._file(target) or self._directory(target)
        return self._directory(root)

    def _package_root(self, directory: str, package: str) -> str | None:
        key = ("npm", directory, package)
        if key in self.memo:
            return self.memo[key]
        found = None
        parts = directory.split("/") if directory else []
        candidates = [f"{'/'.join(parts[:i])}/node_modules".lstrip("/") for i in range(len(parts), -1, -1)
                      if not parts[:i] or parts[i - 1] != "node_modules"]
        for base in (*candidates, *GLOBAL_FOLDERS):
            hit = lookup_in_layers(self.layers, f"{base}/{package}")
            if hit is not None and hit[1].type in (DIR, "symlink"):
                found = f"{base}/{package}"
                break
        self.memo[key] = found
        return found

    def _file(self, target: str) -> tuple[Any, TocEntry] | None:
        key = ("jsfile", target)
        if key not in self.memo:
            self.memo[key] = next((hit for ext in _EXTENSIONS if (hit := resolve_in_layers(self.layers, target + ext))), None)
        return self.memo[key]

    def _directory(self, target: str) -> tuple[Any, TocEntry] | None:
        """A directory's package.json (its entry point is resolved when that is read), else index.js."""
        return resolve_in_layers(self.layers, f"{target}/package.json") or self._index(target)

    def _index(self, target: str) -> tuple[Any, TocEntry] | None:
        return resolve_in_layers(self.layers, f"{target}/index.js") or resolve_in_layers(self.layers, f"{target}/index.json")
