"""The two entry points of the one TOC builder give the same tree and the same errors.

`parse_toc_document` decodes JSON straight into typed records (msgspec); `build_toc` converts
entries already decoded as dicts into the same records. Both must agree on every valid TOC
(entries, inode numbers, link counts, child maps, landmark) and raise the same typed error on
every invalid one. The JSON is decoded a batch of entries at a time (`toc_records.RecordBatches`),
so each case is also parsed with batches of one and two entries: a file's chunk entries, a
hardlink and its target, a directory and its children then sit in different batches.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stargz_store.formats import toc_records
from stargz_store.formats.errors import FormatError, InvalidTocError
from stargz_store.formats.estargz import parse_footer
from stargz_store.formats.toc_member import extract_toc_json
from stargz_store.formats.toc import Toc, build_toc, parse_toc_document

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
TESTDATA = Path(__file__).resolve().parents[1] / "data"


def _file(name, size=1, offset=10, **extra):
    return {"name": name, "type": "reg", "size": size, "offset": offset, "chunkDigest": D1, **extra}


VALID = {
    "tree": [
        {"name": "a/", "type": "dir", "mode": 0o40750, "uid": 5, "gid": 7, "modtime": "2023-11-14T22:13:20Z"},
        {"name": "a/b/c/", "type": "dir"},
        _file("a/f", 10, 100, digest=D1, xattrs={"user.k": "AAH+/w=="}),
        {"name": "a/h", "type": "hardlink", "linkName": "./a/f"},
        {"name": "x/h2", "type": "hardlink", "linkName": "a/h"},
        {"name": "a/s", "type": "symlink", "linkName": "../nowhere"},
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o20666},
        {"name": "dev/fifo", "type": "fifo"},
        {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 150, "chunkDigest": D2},
        {"name": "a/b/.wh..wh..opq", "type": "reg"},
    ],
    "chunks": [
        _file("big", 25, 100, chunkSize=10, digest=D2),
        {"name": "big", "type": "chunk", "offset": 200, "chunkOffset": 10, "chunkSize": 10, "chunkDigest": D2},
        {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 20, "chunkDigest": D1, "chunkType": "zeros"},
        _file("next", 1, 400, endOffset=450),
    ],
    "root_later": [_file("a"), {"name": "./", "type": "dir", "mode": 0o700}, {"name": "/", "type": "dir"}],
    "links_around_root": [
        _file("a", 1, 10),
        {"name": "./", "type": "dir"},
        _file("b", 1, 20),
        {"name": "h", "type": "hardlink", "linkName": "b"},
        {"name": "h2", "type": "hardlink", "linkName": "h"},
        {"name": "h3", "type": "hardlink", "linkName": "a"},
        {"name": "s", "type": "symlink", "linkName": "a"},
        {"name": "hs", "type": "hardlink", "linkName": "s"},
    ],
    "nulls": [{"name": "f", "type": "reg", "mode": None, "uid": None, "modtime": None, "digest": None, "size": None}],
    "inner": [_file("a", 5, 0, innerOffset=512), _file("b", 5, 0, innerOffset=1536), _file("c", 5, 90)],
    "empty": [],
    "no_prefetch": [{"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": 0, "chunkDigest": D1}],
    # One-piece files (the builder's inline path) against the general chunk rules.
    "one_piece": [
        _file("tight", 4, 100, endOffset=150, chunkSize=4),
        _file("loose", 4, 200, endOffset=499, chunkOffset=0),
        _file("at_start", 4, 300, endOffset=300),
        {"name": "file_digest_only", "type": "reg", "size": 2, "offset": 400, "digest": D2},
        _file("zeros", 3, 450, chunkType="zeros", innerOffset=7),
    ],
    "chunk_after_empty_file": [
        {"name": "e", "type": "reg", "size": 0, "offset": 5},
        {"name": "e", "type": "chunk", "offset": 20, "chunkSize": 3, "chunkDigest": D1},
        _file("f", 1, 10),
        _file("g", 1, 30),
    ],
    "root_middle_then_more": [
        _file("a", 1, 10),
        {"name": "./", "type": "dir", "uid": 9},
        _file("b", 1, 20),
        {"name": "d/", "type": "dir"},
    ],
    "root_last": [{"name": "d/", "type": "dir"}, _file("d/f", 1, 20), {"name": "/", "type": "dir", "mode": 0o711}],
}

INVALID = {
    "coverage": [_file("f", 10, 100, chunkSize=4)],
    "bounds": [_file("f", 10, 1000)],
    "missing_link": [{"name": "h", "type": "hardlink", "linkName": "gone"}],
    "no_digest": [{"name": "f", "type": "reg", "size": 3, "offset": 10}],
    "file_parent": [{"name": "a", "type": "reg"}, {"name": "a/b", "type": "reg"}],
    "link_to_dir": [{"name": "d/", "type": "dir"}, {"name": "h", "type": "hardlink", "linkName": "d"}],
    "loose_chunk": [{"name": "c", "type": "chunk", "offset": 5}],
    "escape": [{"name": "../x", "type": "reg"}],
    "duplicate": [_file("a/f"), _file("./a/f")],
    "bad_type": [{"name": "f", "type": "sock"}],
    "bad_mode": [{"name": "f", "type": "dir", "mode": "0755"}],
    "bool_uid": [{"name": "f", "type": "dir", "uid": False}],
    "bad_digest": [{"name": "f", "type": "reg", "digest": "md5:00"}],
    "bad_time": [{"name": "f", "type": "dir", "modtime": "noon"}],
    "bad_xattr": [{"name": "f", "type": "dir", "xattrs": {"user.a": "not base64!"}}],
    "not_object": ["f"],
    "negative_size": [{"name": "f", "type": "reg", "size": -1}],
    "root_file": [{"name": "./", "type": "reg"}],
    "root_file_later": [_file("a"), {"name": "/", "type": "reg"}],
    "root_then_file_root": [{"name": "./", "type": "dir"}, {"name": "/", "type": "reg"}],
    "one_piece_negative_inner": [_file("f", 4, 100, innerOffset=-1)],
    "one_piece_negative_offset": [_file("f", 4, -5)],
    "one_piece_late_start": [_file("f", 4, 100, chunkOffset=1)],
    "one_piece_too_long": [_file("f", 4, 100, chunkSize=5)],
    "one_piece_no_digest": [{"name": "f", "type": "reg", "size": 4, "offset": 100, "digest": ""}],
    "one_piece_bad_chunk_digest": [_file("f", 4, 100, chunkDigest="sha256:xyz")],
}


def _snapshot(toc: Toc) -> dict:
    dirs = [name for name, e in toc.entries() if e.type == "dir"]
    return {
        "entries": [(name, tuple(e)) for name, e in toc.entries()],
        "children": {d: sorted((k, v.ino) for k, v in toc.children(d).items()) for d in dirs},
        "order": [(e.name, e.nlink, e is toc.lookup(e.name)) for e in toc.files_in_blob_order()],
        "landmark": (toc.prefetch_landmark_offset, toc.has_no_prefetch_landmark),
        "ids": (toc.uids(), toc.gids()),
    }


def _outcome(build):
    try:
        return build()
    except FormatError as e:
        return type(e)


@pytest.fixture(params=[toc_records.RECORD_BATCH, 1, 2], ids=lambda n: f"batch{n}")
def batch(request, monkeypatch):
    monkeypatch.setattr(toc_records, "RECORD_BATCH", request.param)
    return request.param


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_tocs_build_the_same_tree(case, batch):
    raw = VALID[case]
    doc = json.dumps({"version": 1, "entries": raw}).encode()
    built = _outcome(lambda: _snapshot(build_toc(raw, data_end=500)))
    parsed = _outcome(lambda: _snapshot(parse_toc_document(doc, data_end=500)))
    assert isinstance(built, dict) and built == parsed


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_tocs_raise_the_same_error(case, batch):
    raw = INVALID[case]
    doc = json.dumps({"version": 1, "entries": raw}).encode()
    built = _outcome(lambda: build_toc(raw, data_end=500))
    parsed = _outcome(lambda: parse_toc_document(doc, data_end=500))
    assert built == parsed
    assert isinstance(built, type) and issubclass(built, InvalidTocError)


def test_a_wrong_type_is_named_by_its_place_in_the_document(batch):
    """Entries are decoded a batch at a time; the error still names the entry's own index."""
    entries = [{"name": f"d{i}/", "type": "dir"} for i in range(5)] + [{"name": "f", "type": "dir", "uid": "0"}]
    with pytest.raises(InvalidTocError, match=r"\$\.entries\[5\]\.uid"):
        parse_toc_document(json.dumps({"entries": entries}).encode(), data_end=100)


@pytest.mark.parametrize("doc", [b"[1, 2]", b"{", b'{"entries": {}}', b"\xff\xfe", b'{"entries": [{"name": 1}]}'])
def test_documents_that_are_not_tocs(doc):
    with pytest.raises(InvalidTocError):
        parse_toc_document(doc, data_end=100)


@pytest.mark.parametrize("doc", [b"{}", b'{"entries": null}', b'{"version": 1, "entries": []}'])
def test_documents_without_entries_have_a_root(doc):
    toc = parse_toc_document(doc, data_end=100)
    assert len(toc) == 1 and toc.root.type == "dir"


def _reference_tocs() -> list[tuple[str, bytes, int]]:
    found = []
    for blob in sorted(TESTDATA.glob("*-esgz/blobs/sha256/*")):
        data = blob.read_bytes()
        try:
            toc_offset, footer_size = parse_footer(data[-51:])
        except FormatError:
            continue
        found.append((blob.parent.parent.parent.name, extract_toc_json(data[toc_offset : len(data) - footer_size], 1 << 26), toc_offset))
    return found


def test_reference_layers_build_the_same_tree():
    tocs = _reference_tocs()
    assert tocs, "no eStargz layers found in tests/data"
    for _, toc_json, toc_offset in tocs:
        parsed = _snapshot(parse_toc_document(toc_json, data_end=toc_offset))
        built = _snapshot(build_toc(json.loads(toc_json)["entries"], data_end=toc_offset))
        assert parsed == built
