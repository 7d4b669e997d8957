"""What a C or C++ source or header includes: its `#include` lines.

A compiler reads a file, and opens each header it includes as the preprocessor reaches the line,
one after another: `#include <iostream>` alone is some hundred headers, one round trip each on a
lazily pulled image. The names are written in the file, so the store reads them there and fetches
the headers at once (`layer.policies.includes`). An `#include` counts unless it sits in a group a
compile with the compiler's defaults leaves out for sure (`#if __cplusplus > 201703L`, the C++
library's debug and parallel modes, other systems: `_off`); any other condition needs the
compiler's macros, so its headers count, and one behind a false `#if` costs its bytes. Pure
parsing of bytes handed over by a read.
"""
from __future__ import annotations

import re
from typing import NamedTuple

_MAX_SOURCE = 4 << 20
_INCLUDE = re.compile(rb'[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]{1,256})[>"]')
_DIRECTIVE = re.compile(rb"^[ \t]*#[ \t]*(if|ifdef|ifndef|elif|else|endif|include)\b([^\n]*)", re.MULTILINE)
# Macros a plain GCC compile on Linux does not define (the library's optional modes, other systems)
_UNDEFINED = frozenset({b"_GLIBCXX_DEBUG", b"_GLIBCXX_PARALLEL", b"_GLIBCXX_PROFILE", b"_GLIBCXX_ASSERTIONS",
                        b"_WIN32", b"_WIN64", b"_MSC_VER", b"__APPLE__", b"__MINGW32__", b"__CYGWIN__", b"__FreeBSD__",
                        b"__NetBSD__", b"__OpenBSD__", b"__sun", b"_AIX", b"__HAIKU__", b"__EMSCRIPTEN__"})
_DEFINED = re.compile(rb"defined\s*\(?\s*(\w+)\s*\)?")
_CPLUSPLUS = re.compile(rb"__cplusplus\s*(>=|>)\s*(\d+)L?")
_CXX_DEFAULT = 201703  # GCC 11 and 12 compile C++ as gnu++17 unless told otherwise
_SOURCE_SUFFIXES = frozenset({"c", "cc", "cpp", "cxx", "c++", "h", "hh", "hpp", "hxx", "h++", "tcc", "ipp", "inl", "tpp"})
_CXX_SUFFIXES = frozenset({"cc", "cpp", "cxx", "c++", "hh", "hpp", "hxx", "h++", "tcc", "ipp", "tpp"})


class Include(NamedTuple):
    """`#include "name"` (`quoted`: looked for beside the including file first) or `<name>`."""

    name: str
    quoted: bool


def is_c_source(path: str) -> bool:
    """A C or C++ source or header by its name: a known suffix, or a file without one in an
    `include` tree (the C++ library's `<vector>`)."""
    base = path.rpartition("/")[2]
    if "." in base:
        return base.rpartition(".")[2] in _SOURCE_SUFFIXES
    return "/include/" in f"/{path}"


def is_cxx(path: str) -> bool:
    """C++ rather than C: its suffix, or a C++ library header (`include/c++/`)."""
    base = path.rpartition("/")[2]
    return "/c++/" in path or ("." in base and base.rpartition(".")[2] in _CXX_SUFFIXES) or "." not in base


def includes_of(data: bytes) -> list[Include] | None:
    """The `#include`s of `data`, in order, each once, except in groups a compile without special
    flags leaves out (`_off`); None for a file too big to be a hint."""
    if len(data) > _MAX_SOURCE:
        return None
    out: dict[Include, None] = {}
    groups: list[bool | None] = []  # per open #if: False when known off, True when its #else is known off, else None
    for m in _DIRECTIVE.finditer(data):
        word, rest = m.group(1), m.group(2)
        if word in (b"if", b"ifdef", b"ifndef"):
            groups.append(False if _off(word, rest) else None)
        elif word in (b"else", b"elif"):
            if groups:
                groups[-1] = True if groups[-1] is False and word == b"else" else None
        elif word == b"endif":
            if groups:
                groups.pop()
        elif word == b"include" and False not in groups:
            inc = _INCLUDE.match(m.group(0))
            if inc is not None:
                try:
                    out.setdefault(Include(inc.group(2).decode("utf-8").strip(), inc.group(1) == b'"'))
                except UnicodeDecodeError:
                    continue
    return list(out)


def _off(word: bytes, condition: bytes) -> bool:
    """Whether an `#if`/`#ifdef`/`#ifndef` group is off in a compile with the compiler's defaults
    on Linux: a newer C++ standard than GCC 12's default (C++17), the library's debug, parallel
    and profile modes, another operating system or compiler. Anything else may be on."""
    condition = condition.split(b"//")[0].strip()
    if word == b"ifdef":
        return condition in _UNDEFINED
    if word == b"ifndef":
        return False
    m = _DEFINED.fullmatch(condition)
    if m is not None:
        return m.group(1) in _UNDEFINED
    m = _CPLUSPLUS.fullmatch(condition)
    return m is not None and int(m.group(2)) > _CXX_DEFAULT - (m.group(1) == b">")
