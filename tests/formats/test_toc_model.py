"""The TOC model's structure beyond the basics: identity, inode numbering, lazy child maps, shared
values, type checks on every field. (The GC pause around builds is the layer's: tests/layer/test_trees.py.)"""
from __future__ import annotations

import pytest

from stargz_store.formats.errors import DuplicateEntryError, InvalidTocError, OutOfBoundsError
from stargz_store.formats.toc import DIR, REG, Chunk, TocEntry, build_toc

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _file(name, size=1, offset=10, **extra):
    return {"name": name, "type": "reg", "size": size, "offset": offset, "digest": D1, "chunkDigest": D1, **extra}


def test_entries_and_chunks_are_immutable_values():
    toc = build_toc([_file("f")], data_end=100)
    f = toc.lookup("f")
    with pytest.raises(AttributeError):
        f.size = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        f.chunks[0].digest = D2  # type: ignore[misc]
    assert f == TocEntry(**{k: getattr(f, k) for k in TocEntry._fields})
    assert f.chunks == (Chunk(0, 1, 10, 100, 0, D1),)


def test_inode_numbers_root_first_then_toc_order_then_implicit_dirs():
    toc = build_toc(
        [
            _file("x/y/f", offset=10),
            {"name": "d/", "type": "dir"},
            {"name": "x/h", "type": "hardlink", "linkName": "x/y/f"},
            {"name": "s", "type": "symlink", "linkName": "d"},
        ],
        data_end=100,
    )
    assert toc.root.ino == 1
    assert [toc.lookup(n).ino for n in ("x/y/f", "d", "s")] == [2, 3, 4]
    assert {toc.lookup("x").ino, toc.lookup("x/y").ino} == {5, 6}
    assert toc.lookup("x/h") is toc.lookup("x/y/f") and toc.lookup("x/h").nlink == 2
    assert toc.root.nlink == 2 + 2 and toc.lookup("x").nlink == 3 and toc.lookup("x/y").nlink == 2
    assert len(toc) == 7


def test_explicit_root_later_in_the_toc_keeps_its_metadata():
    toc = build_toc([_file("a"), {"name": "./", "type": "dir", "mode": 0o700, "uid": 3}, {"name": "/", "type": "dir"}], data_end=100)
    assert (toc.root.mode, toc.root.uid, toc.root.ino) == (0o700, 3, 1)  # the root is always inode 1
    assert toc.lookup("a").ino == 2


def test_hardlink_targets_around_an_explicit_root():
    toc = build_toc(
        [
            _file("a", offset=10),
            {"name": "./", "type": "dir"},
            _file("b", offset=20),
            {"name": "h", "type": "hardlink", "linkName": "b"},
            {"name": "h2", "type": "hardlink", "linkName": "h"},
            {"name": "s", "type": "symlink", "linkName": "a"},
            {"name": "hs", "type": "hardlink", "linkName": "s"},
        ],
        data_end=100,
    )
    a, b, s = toc.lookup("a"), toc.lookup("b"), toc.lookup("s")
    assert (a.nlink, b.nlink, s.nlink) == (1, 3, 2)
    assert toc.lookup("h") is toc.lookup("h2") is b and toc.lookup("hs") is s
    assert [e.ino for e in (toc.root, a, b, s)] == [1, 2, 3, 4]
    assert [e for e in toc.files_in_blob_order()] == [a, b] and toc.files_in_blob_order()[1] is b
    assert set(toc.children("")) == {"a", "b", "h", "h2", "s", "hs"}


def test_child_maps_are_built_on_demand_and_include_everything():
    toc = build_toc(
        [
            {"name": "a/b/c/", "type": "dir"},
            _file("a/b/f"),
            {"name": "a/b/.wh.gone", "type": "char"},
            {"name": "a/b/.wh..wh..opq", "type": "reg"},
            {"name": "a/h", "type": "hardlink", "linkName": "a/b/f"},
            _file("top"),
        ],
        data_end=100,
    )
    assert set(toc.children("")) == {"a", "top"}
    assert set(toc.children("a")) == {"b", "h"}
    assert toc.children("a")["h"] is toc.lookup("a/b/f")
    assert set(toc.children("a/b")) == {"c", "f", ".wh.gone", ".wh..wh..opq"}
    assert toc.children("a/b") is toc.children("a/b")  # cached
    assert dict(toc.children("a/b/c")) == {} and dict(toc.children("top")) == {} and dict(toc.children("nope")) == {}


def test_interleaved_directories_on_a_larger_tree():
    raw = [{"name": f"d{i:02d}/", "type": "dir"} for i in range(20)]
    raw += [_file(f"d{i % 20:02d}/sub/f{i}", offset=10 + i) for i in range(2000)]
    raw += [{"name": f"d{i % 20:02d}/l{i}", "type": "symlink", "linkName": "sub"} for i in range(2000)]
    toc = build_toc(raw, data_end=10_000)
    assert len(toc) == 1 + 20 + 20 + 4000
    assert sum(len(toc.children(f"d{i:02d}")) for i in range(20)) == 20 + 2000
    assert sum(len(toc.children(f"d{i:02d}/sub")) for i in range(20)) == 2000
    assert all(toc.lookup(f"d{i:02d}").nlink == 3 for i in range(20))
    assert len({e.ino for _, e in toc.entries()}) == len(toc)
    # Each piece's compressed extent ends where the next file's data starts.
    assert toc.lookup("d05/sub/f5").chunks[0].blob_end == 16
    assert toc.lookup("d19/sub/f1999").chunks[0].blob_end == 10_000


def test_repeated_values_are_shared_objects():
    toc = build_toc([_file(f"f{i}", offset=10 + i, mode=0o100644, modtime="2023-11-14T22:13:20Z") for i in range(3)], data_end=100)
    a, b = toc.lookup("f0"), toc.lookup("f2")
    assert a.type is REG and toc.root.type is DIR
    assert a.digest is b.digest and a.chunks[0].digest is a.digest
    assert a.mode is b.mode and a.mtime_ns is b.mtime_ns == 1_700_000_000_000_000_000


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "f", "type": "reg", "mode": "0644"},
        {"name": "f", "type": "reg", "uid": True},
        {"name": "f", "type": "reg", "size": 1.5},
        {"name": "f", "type": "reg", "digest": 5},
        {"name": "f", "type": "reg", "digest": []},
        {"name": "f", "type": "reg", "digest": "sha256:short"},
        {"name": "f", "type": "reg", "modtime": 5},
        {"name": "f", "type": "dir", "modtime": "yesterday"},
        {"name": "s", "type": "symlink", "linkName": 3},
        {"name": "c", "type": "char", "devMajor": "1"},
        {"name": "f", "type": "reg", "xattrs": {"user.a": "!!"}},
        {"name": 7, "type": "reg"},
        {"name": "f", "type": ["reg"]},
        {"name": "f"},
        {"name": "", "type": "reg"},
        {"name": "/", "type": "symlink", "linkName": "x"},
    ],
)
def test_wrong_field_types_are_invalid_toc_errors(entry):
    with pytest.raises(InvalidTocError):
        build_toc([entry], data_end=100)


def test_null_fields_mean_their_zero_value():
    toc = build_toc([{"name": "f", "type": "reg", "mode": None, "uid": None, "modtime": None, "digest": None, "size": None}], data_end=100)
    f = toc.lookup("f")
    assert (f.mode, f.uid, f.mtime_ns, f.digest, f.size, f.chunks) == (0, 0, 0, "", 0, ())


def test_duplicates_and_out_of_bounds_offsets():
    with pytest.raises(DuplicateEntryError):
        build_toc([_file("a/f"), _file("./a/f/")], data_end=100)
    with pytest.raises(OutOfBoundsError):
        build_toc([_file("f"), {"name": "f", "type": "chunk", "offset": 100, "chunkOffset": 1}], data_end=100)
