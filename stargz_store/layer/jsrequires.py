"""What a JavaScript module loads: the string literals of its `require()` calls and `import` /
`export ... from` statements, and the entry point a `package.json` names.

Node.js loads a module, runs it, and only then resolves what it requires, one file at a time:
on a lazily pulled image a `require` chain through a package tree is a round trip per file
(express alone is some fifty). The names are written in the module, so the store reads them
there and fetches the files at once (`layer.policies.requires`). Pure parsing of bytes handed over
by a read; a name built at run time (`require(name)`) is no hint, nor anything that does not parse.
"""
from __future__ import annotations

import json
import re

_MAX_SOURCE = 4 << 20  # bytes of a module scanned (a bigger one, a bundle, is no hint)
_MAX_MANIFEST = 1 << 20
# require('x'), require("x"); import ... from 'x'; import 'x'; export ... from 'x'; import('x')
_SPECIFIER = re.compile(
    rb"""(?:\brequire\s*\(\s*|\bimport\s*\(\s*|\bfrom\s+|\bimport\s+)(['"])([^'"\n\\]{1,256})\1""")
_LINE_COMMENT = re.compile(rb"^\s*//.*$", re.MULTILINE)


def requires_of(data: bytes) -> list[str] | None:
    """The module specifiers `data` (a `.js`, `.cjs` or `.mjs` file) names, in order, each once;
    None for a file too big to be a hint."""
    if len(data) > _MAX_SOURCE:
        return None
    text = _LINE_COMMENT.sub(b"", data)
    out: dict[str, None] = {}
    for m in _SPECIFIER.finditer(text):
        try:
            out.setdefault(m.group(2).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return list(out)


def package_main(data: bytes) -> str | None:
    """The entry point a `package.json` names (`main`, else a string `exports` or its "."
    entry's `require`/`default`), or None."""
    if len(data) > _MAX_MANIFEST:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    main = doc.get("main")
    if isinstance(main, str) and main:
        return main
    exports = doc.get("exports")
    if isinstance(exports, dict):
        exports = exports.get(".", exports)
    if isinstance(exports, dict):
        exports = exports.get("require") or exports.get("default") or exports.get("node")
    return exports if isinstance(exports, str) and exports else None
