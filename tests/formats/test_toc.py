"""The format-neutral TOC model: names, times, tree building, chunk lookup, link counts."""
from __future__ import annotations

import pytest

from stargz_store.formats.errors import (
    BadEntryNameError,
    ChunkCoverageError,
    EntryEscapesRootError,
    InvalidTocError,
    MissingHardlinkTargetError,
    OutOfBoundsError,
)
from stargz_store.formats.toc import build_toc, normalize_name, parse_time_ns

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


@pytest.mark.parametrize(
    "raw, name",
    [("./a/b/", "a/b"), ("./", ""), (".", ""), ("/", ""), ("a/.hidden", "a/.hidden"), ("a/..b", "a/..b"), ("é/x", "é/x")],
)
def test_normalize_name(raw, name):
    assert normalize_name(raw) == name


@pytest.mark.parametrize("raw", ["a//b", "a/./b", "", "./a//", "././a", "a/.", "a/b//", "f\0.txt", "\0", "a/\0/b"])
def test_normalize_name_refuses_names_the_kernel_cannot_have(raw):
    with pytest.raises(BadEntryNameError):
        normalize_name(raw)


@pytest.mark.parametrize("raw", ["../a", "a/../../b", "a/..", "/etc/passwd"])
def test_normalize_name_refuses_escapes(raw):
    with pytest.raises(EntryEscapesRootError):
        normalize_name(raw)


@pytest.mark.parametrize(
    "text, ns",
    [
        ("", 0),
        ("0001-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:01Z", 1_000_000_000),
        ("2023-11-14T22:13:20Z", 1_700_000_000_000_000_000),
        ("1969-12-31T00:00:00Z", -86_400_000_000_000),
        ("2020-09-13T12:26:40.5Z", 1_600_000_000_500_000_000),
        ("2020-09-13T14:26:40+02:00", 1_600_000_000_000_000_000),
        ("2100-01-01T00:00:00Z", 4_102_444_800_000_000_000),
    ],
)
def test_parse_time(text, ns):
    assert parse_time_ns(text) == ns


def test_parse_time_refuses_garbage():
    with pytest.raises(InvalidTocError):
        parse_time_ns("yesterday")


def _file(name, size, offset, **extra):
    return {"name": name, "type": "reg", "size": size, "offset": offset, "chunkDigest": D1, **extra}


def test_tree_with_implicit_parents_and_link_counts():
    toc = build_toc(
        [
            {"name": "a/", "type": "dir", "mode": 0o40750, "uid": 5},
            {"name": "a/b/c/", "type": "dir"},
            _file("a/f", 10, 100),
            {"name": "a/h", "type": "hardlink", "linkName": "./a/f"},
            {"name": "x/h2", "type": "hardlink", "linkName": "a/h"},
            {"name": "a/s", "type": "symlink", "linkName": "../nowhere"},
        ],
        data_end=1000,
    )
    root, a, b = toc.lookup(""), toc.lookup("a"), toc.lookup("a/b")
    assert root.type == a.type == b.type == "dir"
    assert a.mode == 0o750 and a.uid == 5
    assert b.mode == 0o755 and b.mtime_ns == 0  # implicit: no metadata of its own
    assert root.nlink == 2 + 2 and a.nlink == 3 and b.nlink == 3
    assert toc.lookup("a/h") is toc.lookup("a/f") is toc.lookup("x/h2")
    assert toc.lookup("a/f").nlink == 3
    assert set(toc.children("a")) == {"b", "f", "h", "s"}
    assert toc.lookup("a/s").link_name == "../nowhere"
    inos = {e.ino for _, e in toc.entries()}
    assert len(inos) == len({id(e) for _, e in toc.entries()})  # one inode per distinct node


def test_chunks_cover_the_file_and_are_found_by_offset():
    toc = build_toc(
        [
            _file("big", 25, 100, chunkSize=10, digest=D3),
            {"name": "big", "type": "chunk", "offset": 200, "chunkOffset": 10, "chunkSize": 10, "chunkDigest": D2},
            {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 20, "chunkDigest": D3},
            _file("next", 1, 400),
        ],
        data_end=500,
    )
    big = toc.lookup("big")
    assert [(c.file_offset, c.size, c.blob_offset, c.blob_end) for c in big.chunks] == [
        (0, 10, 100, 200),
        (10, 10, 200, 300),
        (20, 5, 300, 400),
    ]
    assert [c.digest for c in big.chunks] == [D1, D2, D3]
    assert big.chunk_index_for_offset(0) == 0 and big.chunk_index_for_offset(19) == 1 and big.chunk_index_for_offset(24) == 2
    assert [c.file_offset for c in big.chunks_for_range(9, 2)] == [0, 10]
    assert big.chunks_for_range(25, 5) == () and big.chunks_for_range(0, 0) == ()
    assert toc.lookup("next").chunks[0].blob_end == 500  # the last piece ends where the TOC starts
    assert [e.name for e in toc.files_in_blob_order()] == ["big", "next"]


def test_inner_offsets_share_a_member():
    toc = build_toc(
        [
            _file("a", 5, 0, innerOffset=512),
            _file("b", 5, 0, innerOffset=1536),
            _file("c", 5, 90, innerOffset=0),
        ],
        data_end=200,
    )
    a, b = toc.lookup("a").chunks[0], toc.lookup("b").chunks[0]
    assert (a.blob_offset, a.blob_end, a.inner_offset) == (0, 90, 512)
    assert (b.blob_offset, b.blob_end, b.inner_offset) == (0, 90, 1536)


def test_validation_errors():
    with pytest.raises(ChunkCoverageError):
        build_toc([_file("f", 10, 100, chunkSize=4)], data_end=1000)
    with pytest.raises(OutOfBoundsError):
        build_toc([_file("f", 10, 1000)], data_end=1000)
    with pytest.raises(MissingHardlinkTargetError):
        build_toc([{"name": "h", "type": "hardlink", "linkName": "gone"}], data_end=1000)
    with pytest.raises(InvalidTocError):
        build_toc([{"name": "f", "type": "reg", "size": 3, "offset": 10}], data_end=1000)  # no digest at all
    with pytest.raises(InvalidTocError):
        build_toc([{"name": "a", "type": "reg"}, {"name": "a/b", "type": "reg"}], data_end=1000)
    with pytest.raises(InvalidTocError):
        build_toc([{"name": "d/", "type": "dir"}, {"name": "h", "type": "hardlink", "linkName": "d"}], data_end=1000)
    with pytest.raises(InvalidTocError):
        build_toc([{"name": "c", "type": "chunk", "offset": 5}], data_end=1000)


def test_empty_toc_has_a_root():
    toc = build_toc([], data_end=0)
    assert toc.root.type == "dir" and toc.root.mode == 0o755 and len(toc) == 1
