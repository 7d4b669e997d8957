"""Library readahead: the DT_NEEDED list of an ELF file, libraries found the way the loader finds
them in an image's merged layers, and fetched before the loader asks for them."""
from __future__ import annotations

import random
import shutil
import tarfile
from pathlib import Path

import pytest

from stargz_store.layer.policies.libraries import LibraryReadahead, resolve_in_layers
from stargz_store.formats.toc import build_toc
from stargz_store.layer.elf import MULTIARCH, dynamic_info, library_dirs

from .conftest import lazy_config
from .helpers import layer_of, tar_member, wait_until

PROGRAM = Path(shutil.which("ls") or "/bin/ls").resolve()  # any dynamically linked system program


def _read_file(path: Path):
    data = path.read_bytes()
    return lambda offset, size: data[offset : offset + size]


def test_dynamic_info_of_a_system_program():
    info = dynamic_info(_read_file(PROGRAM))
    assert info is not None and "libc.so.6" in info.needed
    assert info.machine in MULTIARCH and info.is_64
    dirs = library_dirs(info, "/usr/bin")
    assert dirs.index(f"/lib/{MULTIARCH[info.machine]}") < dirs.index("/usr/lib")


@pytest.mark.parametrize("data", [b"", b"#!/bin/sh\necho hi\n", b"\x7fELF" + bytes(60), b"\x7fELF\x02\x01" + bytes(200)])
def test_anything_else_is_no_hint(data):
    assert dynamic_info(lambda offset, size: data[offset : offset + size]) is None


def test_a_truncated_program_is_no_hint():
    data = PROGRAM.read_bytes()[:4096]  # headers, but the dynamic section is gone
    assert dynamic_info(lambda offset, size: data[offset : offset + size]) is None


class _Layer:
    def __init__(self, entries):
        self.toc = build_toc(entries, data_end=10**9)


def test_paths_resolve_through_symlinks_and_stop_at_whiteouts():
    lower = _Layer([
        {"name": "usr/", "type": "dir"}, {"name": "usr/lib/", "type": "dir"},
        {"name": "usr/lib/libx.so.1", "type": "symlink", "linkName": "libx.so.1.2"},
        {"name": "usr/lib/libx.so.1.2", "type": "reg"},
        {"name": "usr/lib/liby.so", "type": "reg"},
        {"name": "opt/", "type": "dir"}, {"name": "opt/libz.so", "type": "reg"},
    ])
    upper = _Layer([
        {"name": "lib", "type": "symlink", "linkName": "usr/lib"},  # a merged-/usr image
        {"name": "usr/", "type": "dir"}, {"name": "usr/lib/", "type": "dir"},
        {"name": "usr/lib/.wh.liby.so", "type": "reg"},
        {"name": "usr/lib/abs.so", "type": "symlink", "linkName": "/opt/libz.so"},
    ])
    layers = [upper, lower]
    found = resolve_in_layers(layers, "/lib/libx.so.1")
    assert found is not None and found[0] is lower and found[1].name == "usr/lib/libx.so.1.2"
    assert resolve_in_layers(layers, "/lib/liby.so") is None  # deleted in the upper layer
    assert resolve_in_layers([lower], "/usr/lib/liby.so")[1].name == "usr/lib/liby.so"
    assert resolve_in_layers(layers, "/usr/lib/abs.so")[1].name == "opt/libz.so"
    assert resolve_in_layers(layers, "/usr/lib/../lib/libx.so.1.2")[1].name == "usr/lib/libx.so.1.2"
    assert resolve_in_layers(layers, "/usr/lib") is None  # a directory, not a file
    loop = _Layer([{"name": "a", "type": "symlink", "linkName": "b"}, {"name": "b", "type": "symlink", "linkName": "a"}])
    assert resolve_in_layers([loop], "/a") is None


def test_reading_a_program_fetches_its_libraries_before_the_loader_asks(tmp_path, open_layer):
    program = PROGRAM.read_bytes()
    info = dynamic_info(_read_file(PROGRAM))
    libdir = f"usr/lib/{MULTIARCH[info.machine]}"
    libc = random.Random(1).randbytes(150_000)
    lower = layer_of(tmp_path / "lower", [
        tar_member("usr", tarfile.DIRTYPE, mode=0o755), tar_member("usr/lib", tarfile.DIRTYPE, mode=0o755),
        tar_member(libdir, tarfile.DIRTYPE, mode=0o755), tar_member(f"{libdir}/libc.so.6", size=len(libc)),
    ], {f"{libdir}/libc.so.6": libc})
    upper = layer_of(tmp_path / "upper", [
        tar_member("lib", tarfile.SYMTYPE, link="usr/lib"),
        tar_member("usr", tarfile.DIRTYPE, mode=0o755), tar_member("usr/bin", tarfile.DIRTYPE, mode=0o755),
        tar_member("usr/bin/prog", size=len(program), mode=0o755),
    ], {"usr/bin/prog": program})
    config = lazy_config(library_readahead=True)  # the policy alone
    readahead = LibraryReadahead()
    bottom, bottom_src = open_layer(lower, config=config, library_worker=readahead)
    top, _ = open_layer(upper, config=config, library_worker=readahead)
    try:
        top.attach_image(lambda: [top, bottom])  # as the daemon does once the image's layers are open
        bottom_src.reset_counters()
        prog = top.toc.lookup("usr/bin/prog")
        assert top.read(prog, 0, 4096) == program[:4096]  # what the kernel reads first when it execs
        wait_until(lambda: readahead.libraries > 0)  # looked up on a readahead thread
        assert readahead.programs == 1 and readahead.libraries == 1  # libc here; libselinux is not in the image
        assert bottom.drain(30)
        assert bottom_src.calls == 1
        lib = bottom.toc.lookup(f"{libdir}/libc.so.6")
        assert bottom.read(lib, 0, lib.size) == libc
        assert bottom_src.calls == 1  # the loader's read finds it cached
        top.read(prog, 0, 4096)
        assert readahead.programs == 1  # a program is looked at once
        assert top.stats()["programs_read"] == 1 and bottom.stats()["ahead_chunks"] == len(lib.chunks)
    finally:
        readahead.close()
