"""What a Python module imports at its top level, read from its bytecode or its source: checked
against the interpreter's own compiler and disassembler, and never an exception on bad bytes."""
from __future__ import annotations

import dis
import glob
import importlib.util
import marshal
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargz_store.layer.pyimports import PYC_MAGIC_311, Import, imports_of

MODULE = '''"""A module.

import not_an_import_in_a_docstring
"""
import os, os.path as osp
from . import sibling
from .sub.deeper import (first,
    second as two)
from .. import up
from json import decoder, encoder  # comment
try:
    import optional_dependency
except ImportError:
    optional_dependency = None
if os.name == "nt":
    import ntpath_only
if os.name != "nt":
    import posix_only
if TYPE_CHECKING:
    import only_for_the_type_checker
else:
    import at_run_time
import a; import b


def later():
    import inside_a_function


class Thing:
    import inside_a_class


if __name__ == "__main__":
    import only_when_run_as_a_script
'''

TOP_LEVEL = [
    Import("os", 0, ()), Import("os.path", 0, ()), Import("", 1, ("sibling",)),
    Import("sub.deeper", 1, ("first", "second")), Import("", 2, ("up",)), Import("json", 0, ("decoder", "encoder")),
    Import("optional_dependency", 0, ()), Import("posix_only", 0, ()), Import("at_run_time", 0, ()),
    Import("a", 0, ()), Import("b", 0, ()),
]

needs_311 = pytest.mark.skipif(importlib.util.MAGIC_NUMBER != PYC_MAGIC_311, reason="bytecode of CPython 3.11 only")


def _pyc(source: str) -> bytes:
    code = compile(source, "pkg/mod.py", "exec")
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def _dis_imports(code) -> list[Import]:
    ins = [x for x in dis.get_instructions(code) if x.opname != "EXTENDED_ARG"]
    return [Import(x.argval, ins[i - 2].argval, tuple(ins[i - 1].argval or ())) for i, x in enumerate(ins)
            if x.opname == "IMPORT_NAME"]


def test_source_imports_at_the_top_level_only():
    assert imports_of("pkg/mod.py", MODULE.encode()) == TOP_LEVEL


@needs_311
def test_bytecode_imports_at_the_top_level_only():
    assert imports_of("pkg/__pycache__/mod.cpython-311.pyc", _pyc(MODULE)) == TOP_LEVEL


@needs_311
def test_bytecode_of_the_standard_library_as_the_disassembler_reads_it():
    """Every import we read is one the disassembler shows, in its order; the ones we leave out
    are in blocks that do not run on import (a few percent: `__main__` demos, Windows code)."""
    files = sorted(glob.glob(f"{sys.base_prefix}/lib/python3.11/**/__pycache__/*.cpython-311.pyc", recursive=True))
    if len(files) < 50:
        files = sorted(glob.glob("/usr/lib/python3.11/**/__pycache__/*.cpython-311.pyc", recursive=True))
    assert len(files) >= 50, "no compiled standard library to compare with"
    compared = kept = 0
    for path in files[::7]:
        with open(path, "rb") as f:
            data = f.read()
        expected = _dis_imports(marshal.loads(data[16:]))
        got = imports_of(path, data)
        assert got is not None, path
        rest = iter(expected)
        assert all(imp in rest for imp in got), path  # a subsequence: same imports, same order
        compared += len(expected)
        kept += len(got)
    assert compared > 100 and kept >= 0.9 * compared


def test_anything_else_is_no_hint():
    assert imports_of("lib/x.so", b"\x7fELF") is None
    assert imports_of("m.pyc", b"\x0d\x0d\r\n" + bytes(40)) is None  # another interpreter's bytecode
    assert imports_of("m.py", b"\xff\xfe not utf-8") is None
    assert imports_of("m.pyc", PYC_MAGIC_311 + bytes(12) + b"(" + (10**6).to_bytes(4, "little")) is None


@needs_311
def test_cut_and_nested_bytecode_is_no_hint():
    data = _pyc(MODULE)
    for n in range(17, len(data) - 1, 3):
        assert imports_of("m.pyc", data[:n]) is None  # every truncation: parsed past the end is malformed
    deep = PYC_MAGIC_311 + bytes(12) + b")\x01" * 100_000 + b"N"
    assert imports_of("m.pyc", deep) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_after_the_magic_never_raise(tail):
    result = imports_of("m.pyc", PYC_MAGIC_311 + bytes(12) + tail)
    assert result is None or all(isinstance(i, Import) for i in result)
    result = imports_of("m.py", tail)
    assert result is None or all(isinstance(i, Import) for i in result)


@needs_311
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_flipped_bytes_in_real_bytecode_never_raise(data):
    pyc = bytearray(_pyc(MODULE))
    for _ in range(data.draw(st.integers(1, 8))):
        pyc[data.draw(st.integers(16, len(pyc) - 1))] = data.draw(st.integers(0, 255))
    result = imports_of("m.pyc", bytes(pyc))
    assert result is None or all(isinstance(i, Import) for i in result)
