"""What a Python module imports when it is executed: read from its source or its bytecode.

An interpreter importing a library set is a chain of dependent reads: Python reads a module,
runs it, and only then asks for the modules it imports, one round trip each on a lazily pulled
image (hundreds of them for boto3 or a document toolchain). The modules a module imports at
its top level are written in it, so the store can read them there and fetch them all at once
(`layer.policies.imports`). Pure parsing of bytes handed over by a read, as `elf` is for
programs; nothing here touches a file or the network.

- Bytecode (`__pycache__/*.cpython-311.pyc`): the module's code object is walked with a small
  marshal reader of our own (bounded: never more objects than bytes, no recursion past
  `_MAX_DEPTH`), and its own instructions give each `IMPORT_NAME` with its level and from-list.
  Imports inside functions and classes are in nested code objects and are not followed: they
  run when called, maybe never. `marshal.loads` is not used: it is documented as unsafe on
  hostile data, and a `.pyc` in an image is data of whoever built the image. Only CPython 3.11's
  format is read (magic 3495, the one Debian 12 ships and the tests check); another version is
  no hint.
- Source (`*.py`, any version): the `import` and `from ... import` statements outside a `def` or
  `class` block, found line by line (statements under a top-level `try:` or `if` run at import,
  so they count; strings in triple quotes are skipped).
Anything else, or anything that does not parse, is no hint (None).
"""
from __future__ import annotations

import re
import struct
from typing import Any, NamedTuple

PYC_MAGIC_311 = (3495).to_bytes(2, "little") + b"\r\n"
_PYC_HEADER = 16
_MAX_DEPTH = 64  # nesting of marshalled objects followed (CPython's own limit is 2000)
_MAX_SOURCE = 4 << 20  # source bytes scanned (a module bigger than this is no hint)

# CPython 3.11 opcodes (Lib/opcode.py of 3.11)
_LOAD_CONST = 100
_LOAD_NAME = 101
_LOAD_ATTR = 106
_COMPARE_OP = 107
_IMPORT_NAME = 108
_POP_JUMP_FORWARD_IF_FALSE = 114
_LOAD_GLOBAL = 116
_EXTENDED_ARG = 144
_CACHE = 0
_EQUAL = 2  # COMPARE_OP's argument for ==
# `if __name__ == "__main__":` (a module's demo or command line), `if sys.platform == "win32":`,
# `if os.name == "nt":` ... guard blocks that do not run when a module is imported on Linux
_FALSE_WHEN_IMPORTED = frozenset({"__main__", "win32", "nt", "cygwin", "darwin", "java", "os2", "riscos"})


class Import(NamedTuple):
    """One import statement: `module` (dotted, '' for `from . import x`), `level` (0 absolute,
    1 for `.`, 2 for `..`), `names` (the from-list: names that may be submodules)."""

    module: str
    level: int
    names: tuple[str, ...]


def imports_of(name: str, data: bytes) -> list[Import] | None:
    """The top-level imports of file `name` with content `data` (a `.pyc` or `.py`), or None
    when it is neither or does not parse."""
    if name.endswith(".pyc"):
        return _pyc_imports(data)
    if name.endswith(".py"):
        return _source_imports(data)
    return None


# ---- bytecode -------------------------------------------------------------------------------


class _Code(NamedTuple):
    """What is kept of a code object (strings as bytes, as marshalled)."""

    code: bytes
    consts: tuple
    names: tuple


class _Malformed(Exception):
    pass


_INT32 = struct.Struct("<i")
_DIGIT = struct.Struct("<H")
# Bytes to skip for the fixed-size marshal types: 'g' binary float, 'y' binary complex.
_FIXED = {0x67: 8, 0x79: 16}
_CONSTANTS = {0x4E: None, 0x54: True, 0x46: False, 0x53: None, 0x2E: None}  # N T F S(topIteration) .(Ellipsis)
_TUPLE, _SKIPPED, _DICT, _CODE = range(4)
_CODE_FIELDS = 10  # objects of a 3.11 code object: code, consts, names, localsplusnames, localspluskinds,
                   # filename, name, qualname, (firstlineno: a raw int32), linetable, exceptiontable
_FIRSTLINENO_AFTER = 8


def _read_marshal(data: bytes, pos: int) -> Any:
    """The object marshalled at `pos` (format 4, CPython 3.11), read without recursion: one loop
    and a stack of open containers, strings kept as bytes. Only what finding imports needs is
    kept (ints, strings, bytes, tuples, code objects); the rest is parsed past and read as None.
    Bounded: a count larger than the bytes left, a reference to nothing, nesting deeper than
    `_MAX_DEPTH` or a cut stream is `_Malformed`. About 0.4 ms per 10 KB of bytecode."""
    refs: list[Any] = []
    stack: list[list[Any]] = []  # [kind, objects still to come, items, ref slot or -1]
    end = len(data)
    unpack_int = _INT32.unpack_from
    while True:
        if pos >= end:
            raise _Malformed("truncated")
        code = data[pos]
        t = code & 0x7F
        pos += 1
        if t == 0x5A or t == 0x7A:  # 'Z', 'z': short ASCII string
            if pos >= end:
                raise _Malformed("truncated")
            stop = pos + 1 + data[pos]
            value: Any = data[pos + 1 : stop]
            pos = stop
            if code & 0x80:
                refs.append(value)
        elif t == 0x72:  # 'r': a reference to an earlier object
            if pos + 4 > end:
                raise _Malformed("truncated")
            i = unpack_int(data, pos)[0]
            pos += 4
            if not 0 <= i < len(refs):
                raise _Malformed("bad ref")
            value = refs[i]
        elif t in (0x28, 0x29, 0x3C, 0x3E, 0x5B, 0x7B, 0x63):  # ( ) < > [ { c: open a container
            if len(stack) >= _MAX_DEPTH:
                raise _Malformed("too deep")
            slot = -1
            if code & 0x80:
                slot = len(refs)
                refs.append(None)  # (reserved before the children, as marshal.c does)
            if t == 0x29:  # ')': small tuple
                if pos >= end:
                    raise _Malformed("truncated")
                n, kind = data[pos], _TUPLE
                pos += 1
            elif t == 0x63:  # 'c'
                if pos + 20 > end:
                    raise _Malformed("truncated")
                pos += 20  # argcount, posonlyargcount, kwonlyargcount, stacksize, flags
                n, kind = _CODE_FIELDS, _CODE
            elif t == 0x7B:  # '{': pairs until a '0'
                n, kind = -1, _DICT
            else:
                if pos + 4 > end:
                    raise _Malformed("truncated")
                n = unpack_int(data, pos)[0]
                pos += 4
                if n < 0 or n > end - pos:  # every element takes at least a byte
                    raise _Malformed("bad count")
                kind = _TUPLE if t == 0x28 else _SKIPPED
            if n != 0:
                stack.append([kind, n, [], slot])
                continue
            value = () if kind == _TUPLE else None
            if slot >= 0:
                refs[slot] = value
        elif t == 0x30 and stack and stack[-1][0] == _DICT:  # '0': the end of a dict
            slot = stack.pop()[3]
            value = None
            if slot >= 0:
                refs[slot] = value
        else:
            if t in _CONSTANTS or t == 0x30:
                value = _CONSTANTS.get(t)
            elif t == 0x73 or t in (0x74, 0x75, 0x61, 0x41):  # s (bytes), t u a A (strings)
                if pos + 4 > end:
                    raise _Malformed("truncated")
                n = unpack_int(data, pos)[0]
                if n < 0 or pos + 4 + n > end:
                    raise _Malformed("truncated")
                value = data[pos + 4 : pos + 4 + n]
                pos += 4 + n
            elif t == 0x69:  # 'i'
                if pos + 4 > end:
                    raise _Malformed("truncated")
                value = unpack_int(data, pos)[0]
                pos += 4
            elif t == 0x6C:  # 'l': sign and count, then 15-bit digits
                if pos + 4 > end:
                    raise _Malformed("truncated")
                n = unpack_int(data, pos)[0]
                digits = abs(n)
                if pos + 4 + 2 * digits > end:
                    raise _Malformed("truncated")
                value = 0
                for i in range(digits - 1, -1, -1):
                    value = (value << 15) | _DIGIT.unpack_from(data, pos + 4 + 2 * i)[0]
                value = -value if n < 0 else value
                pos += 4 + 2 * digits
            elif t in _FIXED:
                pos += _FIXED[t]
                if pos > end:
                    raise _Malformed("truncated")
                value = None
            elif t == 0x66 or t == 0x78:  # 'f', 'x': floats as text (one or two, length-prefixed)
                for _ in range(1 if t == 0x66 else 2):
                    if pos >= end:
                        raise _Malformed("truncated")
                    pos += 1 + data[pos]
                if pos > end:
                    raise _Malformed("truncated")
                value = None
            else:
                raise _Malformed(f"type {t:#x}")
            if code & 0x80:
                refs.append(value)
        # hand `value` to the containers it completes
        while stack:
            frame = stack[-1]
            kind = frame[0]
            if kind != _SKIPPED:
                frame[2].append(value)
            if kind == _DICT:
                break
            frame[1] -= 1
            if kind == _CODE and frame[1] == _CODE_FIELDS - _FIRSTLINENO_AFTER:
                pos += 4  # firstlineno
                if pos > end:
                    raise _Malformed("truncated")
            if frame[1] > 0:
                break
            stack.pop()
            if kind == _TUPLE:
                value = tuple(frame[2])
            elif kind == _CODE:
                co, consts, names = frame[2][0], frame[2][1], frame[2][2]
                if not (isinstance(co, bytes) and isinstance(consts, tuple) and isinstance(names, tuple)):
                    raise _Malformed("bad code object")
                value = _Code(co, consts, names)
            else:
                value = None
            if frame[3] >= 0:
                refs[frame[3]] = value
        else:
            return value


def _pyc_imports(data: bytes) -> list[Import] | None:
    if len(data) <= _PYC_HEADER or data[:4] != PYC_MAGIC_311:
        return None
    try:
        top = _read_marshal(data, _PYC_HEADER)
    except _Malformed:
        return None
    if not isinstance(top, _Code):
        return None
    return _bytecode_imports(top)


def _bytecode_imports(code: _Code) -> list[Import]:
    """Each IMPORT_NAME of `code`'s own instructions, with the level and from-list of the two
    LOAD_CONSTs the compiler puts before it; none in a block that never runs at import here
    (`if TYPE_CHECKING:`, `if __name__ == "__main__":`, `if sys.platform == "win32":`: the
    condition, then a forward jump past the block when it is false)."""
    out: list[Import] = []
    consts: list[Any] = []  # values of the LOAD_CONSTs right before the current instruction
    ext = 0
    raw = code.code
    guard = False  # the last instruction was a condition that is false here
    skip_to = 0  # offset of the end of a block that never runs
    for i in range(0, len(raw) - 1, 2):
        op, arg = raw[i], raw[i + 1] | ext
        if op == _EXTENDED_ARG:
            ext = arg << 8
            continue
        if op == _CACHE:
            continue
        ext = 0
        if op == _POP_JUMP_FORWARD_IF_FALSE:
            if guard:
                skip_to = max(skip_to, i + 2 + 2 * arg)
            guard = False
            consts = []
            continue
        if op in (_LOAD_NAME, _LOAD_ATTR, _LOAD_GLOBAL):
            index = arg >> 1 if op == _LOAD_GLOBAL else arg
            guard = index < len(code.names) and code.names[index] == b"TYPE_CHECKING"
            consts = []
            continue
        if op == _COMPARE_OP:
            last = consts[-1] if consts else None
            guard = arg == _EQUAL and isinstance(last, bytes) and last.decode("ascii", "replace") in _FALSE_WHEN_IMPORTED
            consts = []
            continue
        guard = False
        if op == _LOAD_CONST:
            consts = [*consts[-1:], code.consts[arg] if arg < len(code.consts) else None]
            continue
        if i < skip_to:
            consts = []
            continue
        if op == _IMPORT_NAME and arg < len(code.names) and isinstance(code.names[arg], bytes) and len(consts) == 2:
            level, fromlist = consts
            if isinstance(level, int) and not isinstance(level, bool) and 0 <= level < 64:
                names = tuple(n.decode("utf-8", "replace") for n in fromlist if isinstance(n, bytes)) \
                    if isinstance(fromlist, tuple) else ()
                out.append(Import(code.names[arg].decode("utf-8", "replace"), level, names))
        consts = []
    return out


# ---- source ---------------------------------------------------------------------------------

_IMPORT = re.compile(r"import\s+(.+)")
_FROM = re.compile(r"from\s+(\.*)\s*([\w.]*)\s+import\s+(.+)")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_BLOCKS_NOT_RUN = ("def ", "async def ", "class ", "@")
_GUARD_NOT_RUN = re.compile(r"if\s.*(?:TYPE_CHECKING|==\s*['\"](?:" + "|".join(sorted(_FALSE_WHEN_IMPORTED)) + r")['\"])")


def _source_imports(data: bytes) -> list[Import] | None:
    if len(data) > _MAX_SOURCE:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out: list[Import] = []
    in_block_not_run = False
    quote: str | None = None  # the triple quote of a string spanning lines, while in one
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if quote is not None:
            if line.count(quote) % 2 == 1:
                quote = None
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        for q in ('"""', "'''"):
            if stripped.count(q) % 2 == 1:
                quote = q
        if line[0] not in " \t":
            in_block_not_run = stripped.startswith(_BLOCKS_NOT_RUN) or _GUARD_NOT_RUN.match(stripped) is not None
        if in_block_not_run or quote is not None:
            continue
        statement = stripped.split("#", 1)[0]
        if statement.rstrip().endswith(("(", "\\")) or ("(" in statement and ")" not in statement):
            while i < len(lines) and ")" not in statement and len(statement) < 4096:  # a from-list over lines
                statement = statement.rstrip().rstrip("\\") + " " + lines[i].split("#", 1)[0].strip()
                i += 1
        for part in statement.split(";"):
            out.extend(_statement_imports(part.strip()))
    return out


def _statement_imports(statement: str) -> list[Import]:
    m = _FROM.match(statement)
    if m is not None:
        dots, module, names = m.groups()
        if module and not _DOTTED.match(module):
            return []
        listed = [n.strip().split(" as ")[0].strip() for n in names.strip("() \\").split(",")]
        return [Import(module, len(dots), tuple(n for n in listed if n.isidentifier()))]
    m = _IMPORT.match(statement)
    if m is None:
        return []
    out = []
    for part in m.group(1).split(","):
        module = part.strip().split(" as ")[0].strip()
        if _DOTTED.match(module):
            out.append(Import(module, 0, ()))
    return out
