"""A miss on a small file also fetches the files stored next to it in the same directory (one
request), so programs that read a directory's files one after another (imports, includes) pay
one round trip instead of one per file; nothing outside that directory or the byte window."""
from __future__ import annotations

import random

from .conftest import lazy_config
from .helpers import build_layer


def _files() -> dict[str, bytes]:
    rnd = random.Random(3)
    text = lambda n: b"".join(b"%d some text\n" % i for i in range(n))  # noqa: E731
    return {
        "pkg/a.py": text(300),
        "pkg/b.py": text(200),
        "pkg/c.py": text(250),
        "pkg/d.py": text(100),
        "other/x.py": text(150),
        "pkg2/big.bin": rnd.randbytes(200_000),
        "pkg2/after.py": text(100),
    }


def _compressed(layer, name: str) -> int:
    e = layer.toc.lookup(name)
    return e.chunks[-1].blob_end - e.chunks[0].blob_offset


def test_a_small_file_brings_its_directory_neighbours_in_the_same_request(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    src.reset_counters()
    b = layer.toc.lookup("pkg/b.py")
    assert layer.read(b, 0, b.size) == built.files["pkg/b.py"]
    assert src.calls == 1
    assert layer.drain(30)
    src.reset_counters()
    for name in ("pkg/a.py", "pkg/c.py", "pkg/d.py"):  # before and after it, same directory
        e = layer.toc.lookup(name)
        assert layer.read(e, 0, e.size) == built.files[name]
    assert src.calls == 0
    x = layer.toc.lookup("other/x.py")  # another directory: not fetched with them
    assert layer.read(x, 0, x.size) == built.files["other/x.py"]
    assert src.calls == 1
    assert layer.stats()["neighbour_chunks"] == 3


def test_the_window_bounds_what_comes_along(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    probe, _ = open_layer(built)
    # Three quarters of the window go after the file read: room for b and c after a, not d.
    window = (_compressed(probe, "pkg/b.py") + _compressed(probe, "pkg/c.py")) * 4 // 3 + 8
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=window))
    a = layer.toc.lookup("pkg/a.py")
    layer.read(a, 0, a.size)
    assert layer.drain(30)
    src.reset_counters()
    b = layer.toc.lookup("pkg/b.py")
    layer.read(b, 0, b.size)
    assert src.calls == 0  # right after a: within the window
    d = layer.toc.lookup("pkg/d.py")
    layer.read(d, 0, d.size)
    assert src.calls == 1  # beyond it


def test_big_files_and_an_off_switch_fetch_only_what_is_read(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    big = layer.toc.lookup("pkg2/big.bin")
    src.reset_counters()
    layer.read(big, 0, 10)  # larger than the window: no neighbours
    assert src.log == [(big.chunks[0].blob_offset, big.chunks[0].blob_end - big.chunks[0].blob_offset)]
    off, offsrc = open_layer(built, config=lazy_config(neighbour_fetch_size=0))
    offsrc.reset_counters()
    b = off.toc.lookup("pkg/b.py")
    off.read(b, 0, b.size)
    assert offsrc.log == [(b.chunks[0].blob_offset, b.chunks[0].blob_end - b.chunks[0].blob_offset)]


def _tree(dirs: int, *, unread_kb: int = 0) -> dict[str, bytes]:
    """Directories stored one after another, each with two small modules a program reads in
    turn (`m/dNN/a.js`, `m/dNN/b.js`); with `unread_kb`, each followed by a directory of sources
    nobody reads (incompressible, three files of that many KiB)."""
    rnd = random.Random(5)
    files: dict[str, bytes] = {}
    for i in range(dirs):
        for name in ("a", "b"):
            files[f"m/d{i:02}/{name}.js"] = b"".join(b"exports.f%d = %d;\n" % (k, k * i) for k in range(60))
        if unread_kb:
            for name in ("x", "y", "z"):
                files[f"m/d{i:02}src/{name}.ts"] = rnd.randbytes(unread_kb << 10)
    return files


def _read_modules(layer, built, dirs: int) -> None:
    for i in range(dirs):
        for name in ("a", "b"):
            e = layer.toc.lookup(f"m/d{i:02}/{name}.js")
            assert layer.read(e, 0, e.size) == built.files[e.name]


def test_a_layer_read_in_blob_order_brings_the_next_directories_along(tmp_path, open_layer):
    """Module trees read one directory after another in the order they are stored (node's
    require chains, a package's subpackages): the misses fall right after the previous fetch,
    so neighbours come from the next directories too, not one round trip per directory."""
    dirs = 20
    built = build_layer(tmp_path / "l", _tree(dirs))
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    src.reset_counters()
    _read_modules(layer, built, dirs)
    assert layer.stats()["cache_misses"] <= 8, layer.stats()  # the directory rule alone: one per directory (20)
    needed = sum(_compressed(layer, n) for n in built.files)
    assert src.bytes_read <= needed + (64 << 10)


def test_directories_nobody_reads_stop_the_crossing(tmp_path, open_layer):
    """Read in blob order, but every other directory is never opened (sources beside compiled
    files): what the crossing brought is not read, so it stops after a trial and the directory
    rule takes over again."""
    dirs = 30
    built = build_layer(tmp_path / "l", _tree(dirs, unread_kb=16))
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    src.reset_counters()
    _read_modules(layer, built, dirs)
    needed = sum(_compressed(layer, n) for n in built.files if n.endswith(".js"))
    unread_per_dir = 3 * (16 << 10)
    assert src.bytes_read <= needed + (256 << 10) + 2 * unread_per_dir  # the trial, not 30 directories' worth
