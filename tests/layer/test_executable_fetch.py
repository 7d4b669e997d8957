"""The first miss on a multi-chunk executable also fetches the rest of it (behind the wanted chunk,
in the same streamed request): a mapped program is touched all over, one round trip per chunk."""
from __future__ import annotations

import random

from .conftest import lazy_config
from .helpers import build_layer


def _layer(tmp_path):
    rnd = random.Random(5)
    files = {"bin/tool": rnd.randbytes(400_000), "data/table": rnd.randbytes(400_000),
             "usr/lib/jvm/lib/server/libjvm.so": rnd.randbytes(400_000),
             "usr/lib/libfoo.so.1.2.13": rnd.randbytes(400_000),
             "usr/lib/libfoo.so.1.2.13.bak": rnd.randbytes(400_000)}
    return build_layer(tmp_path / "l", files, executables=("bin/tool",))


def test_a_program_comes_whole_after_its_first_miss(tmp_path, open_layer):
    built = _layer(tmp_path)
    layer, src = open_layer(built, config=lazy_config(executable_fetch_limit=8 << 20))
    tool = layer.toc.lookup("bin/tool")
    assert len(tool.chunks) > 3 and tool.mode & 0o111
    src.reset_counters()
    c1 = tool.chunks[1]
    assert layer.read(tool, c1.file_offset, 100) == built.files["bin/tool"][c1.file_offset:][:100]
    assert src.log == [(c1.blob_offset, tool.chunks[-1].blob_end - c1.blob_offset)]  # from the miss to the end
    assert layer.drain(30)
    src.reset_counters()
    for c in tool.chunks[1:]:
        layer.read(tool, c.file_offset, c.size)
    assert src.calls == 0
    assert layer.stats()["executable_chunks"] == len(tool.chunks) - 2


def test_a_shared_object_comes_whole_after_its_first_miss_whatever_its_mode(tmp_path, open_layer):
    """Most libraries are shipped 0644, and those a program `dlopen`s are in no DT_NEEDED list:
    their name says what they are."""
    built = _layer(tmp_path)
    for name in ("usr/lib/jvm/lib/server/libjvm.so", "usr/lib/libfoo.so.1.2.13"):
        layer, src = open_layer(built, config=lazy_config(executable_fetch_limit=8 << 20))
        lib = layer.toc.lookup(name)
        assert len(lib.chunks) > 3 and not lib.mode & 0o111
        src.reset_counters()
        assert layer.read(lib, 0, 64) == built.files[name][:64]
        assert src.log == [(lib.chunks[0].blob_offset, lib.chunks[-1].blob_end - lib.chunks[0].blob_offset)]
        assert layer.drain(30)
        src.reset_counters()
        for c in lib.chunks:
            assert layer.read(lib, c.file_offset, c.size) == built.files[name][c.file_offset:][:c.size]
        assert src.calls == 0
        assert layer.stats()["executable_chunks"] == len(lib.chunks) - 1


def test_plain_files_and_programs_over_the_limit_fetch_only_what_is_read(tmp_path, open_layer):
    built = _layer(tmp_path)
    for name, limit in (("data/table", 8 << 20), ("usr/lib/libfoo.so.1.2.13.bak", 8 << 20), ("bin/tool", 1000),
                        ("usr/lib/jvm/lib/server/libjvm.so", 1000)):
        layer, src = open_layer(built, config=lazy_config(executable_fetch_limit=limit))
        entry = layer.toc.lookup(name)
        src.reset_counters()
        c = entry.chunks[0]
        layer.read(entry, 0, 10)
        assert src.log == [(c.blob_offset, c.blob_end - c.blob_offset)]
