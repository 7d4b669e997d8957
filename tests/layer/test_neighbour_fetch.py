"""A miss on a file also fetches the small files stored around it (half the window before, half
after) that share its directory or its suffix, in the same request; around a big file any small
file; a neighbour larger than 16 KiB never. So programs that read files stored together
(imports, includes, require chains across package subdirectories) pay one round trip, not one
per file or per directory, without fetching the unlike files stored between them."""
from __future__ import annotations

import random

from .conftest import lazy_config
from .helpers import build_layer

_TEXT = lambda n: b"".join(b"%d some text\n" % i for i in range(n))  # noqa: E731


def _files() -> dict[str, bytes]:
    rnd = random.Random(3)
    return {  # stored in this order
        "pkg/a.py": _TEXT(300),
        "pkg/b.py": _TEXT(200),
        "pkg/c.py": _TEXT(250),
        "pkg/d.py": _TEXT(100),
        "other/x.py": _TEXT(150),     # another directory, same suffix as the pkg modules
        "other/x.txt": _TEXT(160),    # another directory and another suffix
        "pkg2/big.bin": rnd.randbytes(200_000),
        "pkg2/after.py": _TEXT(100),
    }


def _compressed(layer, name: str) -> int:
    e = layer.toc.lookup(name)
    return e.chunks[-1].blob_end - e.chunks[0].blob_offset


def _read(layer, built, name: str) -> None:
    e = layer.toc.lookup(name)
    assert layer.read(e, 0, e.size) == built.files[name]


def test_a_file_brings_the_files_around_it_of_its_directory_or_suffix_in_one_request(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    src.reset_counters()
    _read(layer, built, "pkg/c.py")
    assert src.calls == 1
    assert layer.drain(30)
    src.reset_counters()
    for name in ("pkg/a.py", "pkg/b.py", "pkg/d.py", "other/x.py"):  # before and after it; x.py: a .py elsewhere
        _read(layer, built, name)
    assert src.calls == 0
    assert not layer.cache.contains(layer.toc.lookup("other/x.txt").chunks[0].digest)  # unlike: not fetched
    _read(layer, built, "other/x.txt")
    assert src.calls == 1


def test_a_file_of_its_suffix_in_a_far_directory_stays_behind(tmp_path, open_layer):
    """Same suffix, but two levels apart below what the directories share (`__pycache__` of
    another subpackage): not fetched; one in a sibling's subdirectory is."""
    files = {"usr/lib/pkg/a.pyc": _TEXT(120), "usr/lib/pkg/sub/b.pyc": _TEXT(130),
             "usr/lib/other/deep/c.pyc": _TEXT(140)}
    built = build_layer(tmp_path / "l", files)
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    _read(layer, built, "usr/lib/pkg/sub/b.pyc")
    assert layer.drain(30)
    src.reset_counters()
    _read(layer, built, "usr/lib/pkg/a.pyc")  # the parent directory
    assert src.calls == 0
    assert not layer.cache.contains(layer.toc.lookup("usr/lib/other/deep/c.pyc").chunks[0].digest)


def test_the_reach_is_half_the_window_on_each_side(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    probe, _ = open_layer(built)
    # Reading b: a ends where b starts, c starts where b ends, d after c: a reach short of c's
    # size takes a and c (a file counts when it reaches into the reach), not d.
    half = _compressed(probe, "pkg/c.py") - 8
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=2 * half))
    _read(layer, built, "pkg/b.py")
    assert layer.drain(30)
    src.reset_counters()
    _read(layer, built, "pkg/a.py")
    _read(layer, built, "pkg/c.py")
    assert src.calls == 0  # within half the window before and after b
    _read(layer, built, "pkg/d.py")
    assert src.calls == 1  # beyond it


def test_neighbours_over_16_kib_are_skipped_and_the_walk_goes_on_past_them(tmp_path, open_layer):
    rnd = random.Random(9)
    files = {"m/a.js": _TEXT(100), "m/big.js": rnd.randbytes(24 << 10), "m/c.js": _TEXT(100)}
    built = build_layer(tmp_path / "l", files)
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=128 << 10))
    src.reset_counters()
    _read(layer, built, "m/a.js")
    assert layer.drain(30)
    big, c = layer.toc.lookup("m/big.js"), layer.toc.lookup("m/c.js")
    assert layer.cache.contains(c.chunks[0].digest)        # past the big one
    assert not layer.cache.contains(big.chunks[0].digest)  # a 24 KiB bet on one round trip: not taken
    assert src.bytes_read < (24 << 10)  # requests cut around it, not spanning it


def test_a_big_file_brings_the_small_files_stored_right_after_it(tmp_path, open_layer):
    """A library or program larger than the window: the small files stored at its edges come
    along whatever their kind (the Go store's block holding a file's last bytes brings them)."""
    built = build_layer(tmp_path / "l", _files())
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    src.reset_counters()
    _read(layer, built, "pkg2/big.bin")
    assert layer.drain(30)
    src.reset_counters()
    _read(layer, built, "pkg2/after.py")
    _read(layer, built, "other/x.txt")  # before it: another directory and suffix, still within reach
    assert src.calls == 0


def test_the_file_adjacent_to_a_big_one_may_be_as_large_as_the_window(tmp_path, open_layer):
    """`libgcc_s` (56 KB) stored right after `libc`: read by every C++ program after it, fetched
    with it; a file of that size one further away is not."""
    rnd = random.Random(11)
    files = {"lib/libc.so.6": rnd.randbytes(300_000), "lib/libgcc_s.so.1": rnd.randbytes(40 << 10),
             "lib/libgcc_s.so.2": rnd.randbytes(40 << 10)}
    built = build_layer(tmp_path / "l", files)
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=128 << 10))
    _read(layer, built, "lib/libc.so.6")
    assert layer.drain(30)
    src.reset_counters()
    _read(layer, built, "lib/libgcc_s.so.1")
    assert src.calls == 0
    assert not layer.cache.contains(layer.toc.lookup("lib/libgcc_s.so.2").chunks[0].digest)


def test_the_off_switch_fetches_only_what_is_read(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    off, offsrc = open_layer(built, config=lazy_config(neighbour_fetch_size=0))
    offsrc.reset_counters()
    b = off.toc.lookup("pkg/b.py")
    off.read(b, 0, b.size)
    assert offsrc.log == [(b.chunks[0].blob_offset, b.chunks[0].blob_end - b.chunks[0].blob_offset)]


def _tree(dirs: int, *, unread_kb: int = 0) -> dict[str, bytes]:
    """Package directories stored one after another, each a `package.json`, an `index.js` and a
    `lib/` subdirectory of two modules a program reads in turn; with `unread_kb`, each followed
    by type declarations nobody reads (`.d.ts`, three files of that many KiB, compressible)."""
    files: dict[str, bytes] = {}
    for i in range(dirs):
        files[f"m/p{i:02}/index.js"] = b"module.exports = require('./lib/a.js');\n" * 10
        for name in ("a", "b"):
            files[f"m/p{i:02}/lib/{name}.js"] = b"".join(b"exports.f%d = %d;\n" % (k, k * i) for k in range(60))
        files[f"m/p{i:02}/package.json"] = b'{"name": "p%d", "main": "index.js"}\n' % i
        if unread_kb:
            for name in ("x", "y", "z"):
                files[f"m/p{i:02}/types/{name}.d.ts"] = b"".join(
                    b"declare const v%d: number; // %d\n" % (k, k * i) for k in range(unread_kb * 32))
    return files


def _read_packages(layer, built, dirs: int) -> None:
    for i in range(dirs):
        for name in ("package.json", "index.js", "lib/a.js", "lib/b.js"):
            _read(layer, built, f"m/p{i:02}/{name}")


def test_module_trees_across_subdirectories_cost_few_round_trips(tmp_path, open_layer):
    """node's require chains: `package.json`, `index.js`, then `lib/` of each package. The
    directory rule cost a round trip per directory (40 here); like files across directories
    come along, so a few misses cover the tree."""
    dirs = 20
    built = build_layer(tmp_path / "l", _tree(dirs))
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10))
    src.reset_counters()
    _read_packages(layer, built, dirs)
    assert layer.stats()["cache_misses"] <= 10, layer.stats()
    needed = sum(_compressed(layer, n) for n in built.files)
    assert src.bytes_read <= needed + (64 << 10)


def test_unlike_files_between_them_are_not_fetched(tmp_path, open_layer):
    """The same tree with type declarations beside every package that nobody reads: they have
    another suffix, so they stay behind (requests go around them) while the modules come along."""
    dirs = 20
    built = build_layer(tmp_path / "l", _tree(dirs, unread_kb=12))
    layer, src = open_layer(built, config=lazy_config(neighbour_fetch_size=64 << 10, coalesce_gap=0))
    src.reset_counters()
    _read_packages(layer, built, dirs)
    ts = [layer.toc.lookup(n) for n in built.files if n.endswith(".d.ts")]
    assert not any(layer.cache.contains(e.chunks[0].digest) for e in ts)
    assert layer.stats()["cache_misses"] <= 2 * dirs, layer.stats()  # not 4 per package
