"""What a C or C++ file includes, read from its `#include` lines."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stargz_store.layer.cincludes import Include, includes_of, is_c_source, is_cxx

SOURCE = b"""#include <iostream>
#  include "app.h"
#include\t<bits/c++config.h>
// #include <commented.h> is not at the start of a line
#if defined(_WIN32)
#include <windows.h>
#endif
#include <iostream>
#define X "#include <in_a_macro.h>"
"""


def test_every_include_in_order_each_once():
    assert includes_of(SOURCE) == [Include("iostream", False), Include("app.h", True), Include("bits/c++config.h", False)]


GROUPS = b"""#include <a>
#if __cplusplus > 201703L
#include <only_cxx20>
#else
#include <cxx17_and_before>
#endif
#ifdef _GLIBCXX_DEBUG
# include <debug/map>
#endif
#if defined(_WIN32)
#include <windows.h>
#elif defined(__linux__)
#include <linux.h>
#endif
#if __cplusplus >= 201103L
#include <cxx11>
#endif
#if SOME_PROJECT_MACRO
#include <maybe.h>
#endif
#ifndef GUARD
#include <guarded.h>
#endif
"""


def test_groups_a_default_compile_leaves_out_are_skipped_and_unknown_ones_kept():
    assert [i.name for i in includes_of(GROUPS)] == ["a", "cxx17_and_before", "linux.h", "cxx11", "maybe.h", "guarded.h"]


def test_what_is_a_c_source_and_what_is_cxx():
    assert is_c_source("src/app/main.cpp") and is_cxx("src/app/main.cpp")
    assert is_c_source("usr/include/stdio.h") and not is_cxx("usr/include/stdio.h")
    assert is_c_source("usr/include/c++/12/vector") and is_cxx("usr/include/c++/12/vector")
    assert not is_c_source("usr/bin/gcc") and not is_c_source("etc/motd") and not is_c_source("app/main.py")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(data):
    found = includes_of(data)
    assert found is not None and all(isinstance(i, Include) for i in found)
