"""What shared libraries an ELF program or library will load: its DT_NEEDED names and search paths.

The dynamic loader opens a program's libraries one after another, and a lazily pulled library is
a round trip each; knowing the list as soon as the program's dynamic section is in lets the store
fetch them all at once (`layer.policies.libraries`). Pure parsing of bytes handed over by a `read`
callback; any malformed or unusual file gives None (this is only ever a hint).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29
_MAX_PHNUM = 256
_MAX_DYNAMIC = 64 << 10
_MAX_NAME = 4096

# e_machine -> Debian multiarch directory name
MULTIARCH = {
    3: "i386-linux-gnu",
    8: "mips64el-linux-gnuabi64",
    20: "powerpc-linux-gnu",
    21: "powerpc64le-linux-gnu",
    22: "s390x-linux-gnu",
    40: "arm-linux-gnueabihf",
    62: "x86_64-linux-gnu",
    183: "aarch64-linux-gnu",
    243: "riscv64-linux-gnu",
}


@dataclass(frozen=True)
class DynamicInfo:
    needed: tuple[str, ...]
    search_paths: tuple[str, ...]  # DT_RUNPATH (else DT_RPATH) entries, unexpanded ($ORIGIN...)
    machine: int
    is_64: bool
    interpreter: str = ""  # PT_INTERP: the dynamic loader the kernel maps first ("" when none)


def dynamic_info(read: Callable[[int, int], bytes]) -> DynamicInfo | None:
    """The DT_NEEDED libraries of the ELF file `read(offset, size)` returns bytes of, or None."""
    try:
        return _parse(read)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError):
        return None


def _parse(read: Callable[[int, int], bytes]) -> DynamicInfo | None:
    ident = read(0, 64)
    if len(ident) < 52 or ident[:4] != ELF_MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return None
    is_64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if is_64:
        machine, phoff, phentsize, phnum = (*struct.unpack_from(end + "H", ident, 18),
                                            *struct.unpack_from(end + "Q", ident, 32),
                                            *struct.unpack_from(end + "HH", ident, 54))
        ph_fmt, ph_fields = end + "IIQQQQQQ", "type flags offset vaddr paddr filesz memsz align"
        dyn_fmt = end + "qQ"
    else:
        machine, phoff, phentsize, phnum = (*struct.unpack_from(end + "H", ident, 18),
                                            *struct.unpack_from(end + "I", ident, 28),
                                            *struct.unpack_from(end + "HH", ident, 42))
        ph_fmt, ph_fields = end + "IIIIIIII", "type offset vaddr paddr filesz memsz flags align"
        dyn_fmt = end + "iI"
    names = ph_fields.split()
    if not 0 < phnum <= _MAX_PHNUM or phentsize < struct.calcsize(ph_fmt):
        return None
    table = read(phoff, phnum * phentsize)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interp: tuple[int, int] | None = None
    for i in range(phnum):
        ph = dict(zip(names, struct.unpack_from(ph_fmt, table, i * phentsize)))
        if ph["type"] == _PT_LOAD:
            loads.append((ph["vaddr"], ph["offset"], ph["filesz"]))
        elif ph["type"] == _PT_DYNAMIC:
            dynamic = (ph["offset"], min(ph["filesz"], _MAX_DYNAMIC))
        elif ph["type"] == _PT_INTERP:
            interp = (ph["offset"], min(ph["filesz"], _MAX_NAME))
    if dynamic is None:
        return None  # static: loads nothing
    raw = read(*dynamic)
    step = struct.calcsize(dyn_fmt)
    needed: list[int] = []
    paths: dict[int, int] = {}
    strtab = strsz = 0
    for pos in range(0, len(raw) - step + 1, step):
        tag, value = struct.unpack_from(dyn_fmt, raw, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag == _DT_STRTAB:
            strtab = value
        elif tag == _DT_STRSZ:
            strsz = value
        elif tag in (_DT_RPATH, _DT_RUNPATH):
            paths[tag] = value
    if not needed or not strtab or strsz <= 0:
        return None
    offset = next((off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size), None)
    if offset is None:
        return None

    def string(at: int) -> str:  # one name at a time: the table also holds every symbol name (MBs)
        if not 0 <= at < strsz:
            raise ValueError("string outside the string table")
        raw = read(offset + at, min(_MAX_NAME, strsz - at))
        return raw[: raw.index(b"\0")].decode()

    interpreter = read(*interp).split(b"\0", 1)[0].decode() if interp is not None else ""
    search = string(paths[_DT_RUNPATH]) if _DT_RUNPATH in paths else string(paths[_DT_RPATH]) if _DT_RPATH in paths else ""
    return DynamicInfo(
        needed=tuple(n for n in map(string, needed) if n and "/" not in n),
        search_paths=tuple(p for p in search.split(":") if p),
        machine=machine,
        is_64=is_64,
        interpreter=interpreter,
    )


def library_dirs(info: DynamicInfo, origin: str) -> list[str]:
    """Where the loader looks for `info.needed`, in its order (without ld.so.cache and
    LD_LIBRARY_PATH): the file's run path ($ORIGIN = `origin`), then the distribution defaults."""
    dirs = [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in info.search_paths]
    dirs = [d for d in dirs if "$" not in d]
    triplet = MULTIARCH.get(info.machine)
    if triplet:
        dirs += [f"/lib/{triplet}", f"/usr/lib/{triplet}"]
    if info.is_64:
        dirs += ["/lib64", "/usr/lib64"]
    dirs += ["/lib", "/usr/lib", "/usr/local/lib"]
    return dirs
