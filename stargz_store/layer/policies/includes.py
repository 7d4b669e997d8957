"""Where GCC finds the headers a file includes, in an image's merged layers (for import readahead).

GCC's search on a Debian system (`g++ -v -E`): a quoted include first in the including file's
directory, then, for both kinds, the C++ library's directories (C++ only) and the system ones:

    usr/include/c++/N, usr/include/<triple>/c++/N, usr/include/c++/N/backward,
    usr/lib/gcc/<triple>/N/include, usr/local/include, usr/include/<triple>, usr/include

N is the newest GCC the image has, the triple its architecture's. `-I` directories are on the
command line, not in the image: a project's own headers are found through quoted includes only.
"""
from __future__ import annotations

import posixpath
from typing import Any, Sequence

from ...formats.toc import DIR, TocEntry
from ..cincludes import Include
from .libraries import lookup_in_layers, resolve_in_layers

_TRIPLES = ("x86_64-linux-gnu", "aarch64-linux-gnu", "arm-linux-gnueabihf", "i386-linux-gnu", "powerpc64le-linux-gnu",
            "s390x-linux-gnu", "riscv64-linux-gnu")
_MAX_INCLUDES = 256  # names looked at per file


class IncludeFinder:
    """`files_included_by` over `layers` (topmost first); `memo` as for `ModuleFinder`."""

    def __init__(self, layers: Sequence[Any], memo: dict[tuple[str, ...], Any]) -> None:
        self.layers = layers
        self.memo = memo

    def files_included_by(self, path: str, includes: Sequence[Include], *, cxx: bool) -> list[tuple[Any, TocEntry]]:
        """(layer, entry) of each header of `includes` (made by the file at `path`, compiled as
        C++ when `cxx`) GCC would open."""
        here = posixpath.dirname(path.strip("/"))
        dirs = self._system_dirs(cxx)
        out: dict[tuple[int, int], tuple[Any, TocEntry]] = {}
        for inc in includes[:_MAX_INCLUDES]:
            if inc.name.startswith("/"):
                continue  # an absolute include names a file of the build host, not the image's
            for d in ([here] if inc.quoted else []) + dirs:
                hit = self._file(posixpath.normpath(f"{d}/{inc.name}") if d else posixpath.normpath(inc.name))
                if hit is not None:
                    out.setdefault((id(hit[0]), hit[1].ino), hit)
                    break
        return list(out.values())

    def _file(self, path: str) -> tuple[Any, TocEntry] | None:
        key = ("cfile", path)
        if key not in self.memo:
            self.memo[key] = resolve_in_layers(self.layers, path) if not path.startswith("..") else None
        return self.memo[key]

    def _system_dirs(self, cxx: bool) -> list[str]:
        key = ("cdirs", str(cxx))
        if key not in self.memo:
            self.memo[key] = self._find_system_dirs(cxx)
        return self.memo[key]

    def _find_system_dirs(self, cxx: bool) -> list[str]:
        triple = next((t for t in _TRIPLES if self._is_dir(f"usr/include/{t}") or self._is_dir(f"usr/lib/gcc/{t}")),
                      _TRIPLES[0])
        version = next((str(n) for n in range(20, 3, -1) if self._is_dir(f"usr/lib/gcc/{triple}/{n}")), "")
        dirs = []
        if cxx and version:
            dirs += [f"usr/include/c++/{version}", f"usr/include/{triple}/c++/{version}",
                     f"usr/include/c++/{version}/backward"]
        if version:
            dirs.append(f"usr/lib/gcc/{triple}/{version}/include")
        dirs += ["usr/local/include", f"usr/include/{triple}", "usr/include"]
        return [d for d in dirs if self._is_dir(d)]

    def _is_dir(self, path: str) -> bool:
        hit = lookup_in_layers(self.layers, path)
        return hit is not None and hit[1].type == DIR
