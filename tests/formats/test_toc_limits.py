"""The caps a TOC is built within, and the names it may hold (issue 11, points 3 and 4).

Every cap is checked through both entry points (`build_toc` over entries, `parse_toc_document` over JSON); a TOC at a cap is
accepted, one past it refused with its typed error, before the excess is allocated where that
can be known: the entry count before the JSON is decoded, a gzip TOC's size at its tar header.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc

import pytest

from stargz_store.formats import toc as toc_module
from stargz_store.formats import toc_records, toc_rules
from stargz_store.formats.errors import (
    BadEntryNameError,
    ChunkTooLargeError,
    EntryEscapesRootError,
    InvalidTocError,
    OutOfBoundsError,
    PathTooDeepError,
    TocTooLargeError,
    TooManyEntriesError,
)
from stargz_store.formats.estargz import build_footer, read_toc
from stargz_store.formats.toc import TocLimits, build_toc, parse_toc_document
from stargz_store.formats.toc_member import extract_toc_json
from tests.fixtures.hostile_layers import estargz_layer, streamed_member, tar_header, zstd_layer

D1 = "sha256:" + "1" * 64
MB = 1 << 20


def build_both_ways(entries: list, limits: TocLimits):
    """The tree from `build_toc` and from `parse_toc_document`, which must agree."""
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    outcomes = []
    for build in (lambda: build_toc(entries, data_end=1000, limits=limits),
                  lambda: parse_toc_document(doc, data_end=1000, limits=limits)):
        try:
            outcomes.append(build())
        except InvalidTocError as e:
            outcomes.append(e)
    assert type(outcomes[0]) is type(outcomes[1])
    if isinstance(outcomes[0], InvalidTocError):
        raise outcomes[0]
    return outcomes[0]


def dirs(n: int) -> list[dict]:
    return [{"name": f"d{i}/", "type": "dir"} for i in range(n)]


# --- entries ----------------------------------------------------------------------------------------


def test_entry_cap_is_inclusive():
    limits = TocLimits(max_entries=50)
    assert len(build_both_ways(dirs(50), limits)) == 51  # and the implied root
    with pytest.raises(TooManyEntriesError):
        build_both_ways(dirs(51), limits)


def test_chunk_entries_count():
    pieces = [{"name": "f", "type": "reg", "size": 10, "offset": 0, "chunkSize": 1, "chunkDigest": D1}]
    pieces += [{"name": "f", "type": "chunk", "offset": i, "chunkOffset": i, "chunkSize": 1, "chunkDigest": D1}
               for i in range(1, 10)]
    assert build_both_ways(pieces, TocLimits(max_entries=10)).lookup("f").size == 10
    with pytest.raises(TooManyEntriesError):
        build_both_ways(pieces, TocLimits(max_entries=9))


def test_implied_directories_count():
    deep_file = [{"name": "a/b/c/d/e/f", "type": "fifo"}]  # implies a, a/b, ..., a/b/c/d/e
    assert build_both_ways(deep_file, TocLimits(max_entries=6)).lookup("a/b/c/d/e").type == "dir"
    with pytest.raises(TooManyEntriesError):
        build_both_ways(deep_file, TocLimits(max_entries=5))


def test_implied_directory_names_are_bounded():
    """One 8 KB name 1,000 levels deep implies ~4 MB of names; the budget stops that."""
    deep_file = [{"name": "/".join(["x" * 7] * 1000), "type": "fifo"}]
    assert build_both_ways(deep_file, TocLimits(max_depth=1000, max_implicit_names=5 * MB))
    with pytest.raises(TocTooLargeError, match="imply|implies"):
        build_both_ways(deep_file, TocLimits(max_depth=1000, max_implicit_names=1 * MB))


def test_far_too_many_objects_are_refused_before_decoding(monkeypatch):
    """More than twice the cap of `{`: no TOC within the cap has that many, nothing is decoded."""
    def never(*_):
        raise AssertionError("decoded a TOC that its size already refused")

    monkeypatch.setattr(toc_records, "records_from_json", never)
    monkeypatch.setattr(toc_records, "count_entries", never)
    doc = json.dumps({"entries": [{"type": "dir"}] * 2001}).encode()
    with pytest.raises(TooManyEntriesError, match="objects"):
        parse_toc_document(doc, data_end=100, limits=TocLimits(max_entries=1000))


def test_between_the_cap_and_twice_it_entries_are_counted_exactly(monkeypatch):
    """Entries with xattrs hold two objects each: a TOC at the cap is still accepted, and one past
    it refused by the 24-bytes-an-entry count, before the full records are decoded."""
    with_xattrs = [{"name": f"f{i}", "type": "fifo", "xattrs": {"user.a": "eA=="}} for i in range(1000)]
    doc = json.dumps({"entries": with_xattrs}).encode()
    assert len(parse_toc_document(doc, data_end=100, limits=TocLimits(max_entries=1000))) == 1001
    decoded = []
    monkeypatch.setattr(toc_records, "records_from_json", lambda data: decoded.append(data))
    with pytest.raises(TooManyEntriesError):
        parse_toc_document(doc, data_end=100, limits=TocLimits(max_entries=999))
    assert not decoded


# --- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("size", 2**63), ("offset", -(2**63) - 1), ("uid", 2**64), ("chunkSize", 10**20)])
def test_numbers_beyond_int64_are_refused(field, value):
    """Go's TOC fields are int64; a larger number reached `decompress` as an OverflowError."""
    entry = {"name": "f", "type": "reg", "size": 10, "offset": 0, "chunkDigest": D1, field: value}
    with pytest.raises(InvalidTocError):
        build_both_ways([entry], TocLimits())


def test_chunk_end_beyond_int64_is_refused():
    entry = {"name": "f", "type": "reg", "size": 2**62, "offset": 0, "innerOffset": 2**62, "chunkDigest": D1}
    with pytest.raises(OutOfBoundsError):
        build_both_ways([entry], TocLimits())


# --- depth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, depth", [("a/b/c", 3), ("a/b/c/", 3), ("./a/b/c", 3), ("abcdefghij", 1),
                                         ("a/b/c/d", 4), ("aaaa/bbbb/cccc/dddd", 4)])
def test_depth_cap(name, depth):
    limits = TocLimits(max_depth=3)
    entry = [{"name": name, "type": "dir"}]
    if depth <= 3:
        assert build_both_ways(entry, limits).lookup(name.strip("./").rstrip("/")).type == "dir"
    else:
        with pytest.raises(PathTooDeepError):
            build_both_ways(entry, limits)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["f\0.txt", "\0", "a/\0/b", "a//f", "a/./f", "a/.", "", "././a", "a//"])
def test_names_the_kernel_cannot_have(name):
    with pytest.raises(BadEntryNameError):
        build_both_ways([{"name": name, "type": "reg"}], TocLimits())


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x"])
def test_names_leaving_the_root(name):
    with pytest.raises(EntryEscapesRootError):
        build_both_ways([{"name": name, "type": "reg"}], TocLimits())


@pytest.mark.parametrize("entry", [
    {"name": "s", "type": "symlink", "linkName": "tar\0get"},
    {"name": "f", "type": "fifo", "xattrs": {"user.a\0b": "eA=="}},
    {"name": "f", "type": "fifo", "xattrs": {"": "eA=="}},
    {"name": "h", "type": "hardlink", "linkName": "a//b"},
])
def test_other_names_the_kernel_cannot_have(entry):
    with pytest.raises(BadEntryNameError):
        build_both_ways([{"name": "a/b", "type": "fifo"}, entry], TocLimits())


@pytest.mark.parametrize("name", ["./", "/", ".", "./a/", "a/.b", "a/..b", "a/b...", "é/\n/x"])
def test_usual_spellings_are_accepted(name):
    assert build_both_ways([{"name": name, "type": "dir"}], TocLimits())


# --- through the readers -----------------------------------------------------------------------------


def _read_estargz(layer, **kwargs):
    blob = layer.blob
    return read_toc(lambda off, n: blob[off : off + n], len(blob), expected_toc_digest=None, **kwargs)


def test_estargz_reader_applies_the_limits():
    layer = estargz_layer("many", {"f": b"x"}, toc_edit=lambda e, _: e.extend(dirs(20)))
    assert len(_read_estargz(layer, limits=TocLimits(max_entries=21)).toc) == 22
    with pytest.raises(TooManyEntriesError):
        _read_estargz(layer, limits=TocLimits(max_entries=20))


def test_estargz_reader_refuses_a_nul_name():
    layer = estargz_layer("nul", {"f\0.txt": b"x"})
    with pytest.raises(BadEntryNameError, match="NUL"):
        _read_estargz(layer)


def test_zstd_reader_applies_the_limits():
    import zstandard

    from stargz_store.formats import zstd_chunked

    manifest_json = json.dumps({"version": 1, "entries": dirs(20)}).encode()
    manifest = zstandard.ZstdCompressor().compress(manifest_json)
    layer = zstd_layer("many", manifest, declared_size=len(manifest_json), refusal=None)
    read = lambda limits: zstd_chunked.read_toc_any(  # noqa: E731
        lambda off, n: layer.blob[off : off + n], len(layer.blob), layer.descriptor["annotations"], limits=limits)
    assert len(read(TocLimits(max_entries=20)).toc) == 21
    with pytest.raises(TooManyEntriesError):
        read(TocLimits(max_entries=19))


# --- gzip bombs ----------------------------------------------------------------------------------------


def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_plain_header_over_the_cap_is_refused_before_inflating():
    """The member's tar header declares 1 GiB: refused at the header, not after the cap's worth."""
    member = streamed_member(tar_header("stargz.index.json", 1 << 30), (b" " * MB for _ in range(64)))

    def extract() -> None:
        with pytest.raises(TocTooLargeError, match="over the cap"):
            extract_toc_json(member, 8 * MB)

    assert _peak_while(extract) < MB


def test_pax_header_bomb_stops_at_the_cap():
    """Headers `tarfile` must read (PAX) are inflated through the same bounded reader."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "y" * (12 * MB)}) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        tar.addfile(info, io.BytesIO(b""))
    member = gzip.compress(buf.getvalue())

    def extract() -> None:
        with pytest.raises(TocTooLargeError):
            extract_toc_json(member, 2 * MB)

    assert _peak_while(extract) < 4 * MB


def test_member_in_two_pieces_is_the_member():
    payload = json.dumps({"version": 1, "entries": dirs(300)}).encode()
    layer = estargz_layer("pieces", {"f": b"x"}, toc_json=payload)
    toc_offset = int(layer.blob[-51 + 16 : -51 + 32], 16)
    member = layer.blob[toc_offset:-51]
    for cut in (0, 1, 100, len(member) // 2, len(member)):
        assert extract_toc_json([member[:cut], member[cut:]], MB) == payload
    assert build_footer(toc_offset) == layer.blob[-51:]


# --- time ----------------------------------------------------------------------------------------------


def test_a_chain_of_hardlinks_is_followed_once(monkeypatch):
    """h0 -> h1 -> ... -> f: each link's target is read once, not once per link that leads through it
    (a chain of 100,000 hostile links took hours). Counted, not timed."""
    calls = [0]
    real = toc_module.normalize_name

    def counting(raw: str, **kwargs) -> str:
        calls[0] += 1
        return real(raw, **kwargs)

    for module in (toc_module, toc_rules, toc_records):
        monkeypatch.setattr(module, "normalize_name", counting)
    n = 2000
    chain = [{"name": f"h{i}", "type": "hardlink", "linkName": f"h{i + 1}" if i < n - 1 else "f"} for i in range(n)]
    toc = build_both_ways([{"name": "f", "type": "fifo"}, *chain], TocLimits())
    assert toc.lookup("h0") is toc.lookup("f") and toc.lookup("f").nlink == n + 1
    assert calls[0] <= 2 * 3 * n  # two builds, each ~once per name and once per link (not n * n / 2)


# --- chunk size ----------------------------------------------------------------------------------------


def _piece(name: str, size: int, offset: int, **extra) -> dict:
    return {"name": name, "type": "reg", "size": size, "offset": offset, "digest": D1, "chunkDigest": D1, **extra}


def test_a_chunk_at_the_cap_is_accepted_one_byte_over_is_refused():
    limits = TocLimits(max_chunk_size=900)
    toc = build_both_ways([_piece("f", 900, 10)], limits)
    assert toc.lookup("f").chunks[0].size == 900
    with pytest.raises(ChunkTooLargeError, match="over the chunk cap of 900"):
        build_both_ways([_piece("f", 901, 10)], limits)
    with pytest.raises(ChunkTooLargeError):  # the skipped inner bytes are inflated too
        build_both_ways([_piece("f", 800, 10, innerOffset=101)], limits)


def test_every_piece_of_a_file_is_capped():
    limits = TocLimits(max_chunk_size=500)
    pieces = [_piece("f", 1000, 10, chunkSize=500),
              {"name": "f", "type": "chunk", "offset": 400, "chunkOffset": 500, "chunkSize": 500, "chunkDigest": D1}]
    assert len(build_both_ways(pieces, limits).lookup("f").chunks) == 2
    pieces = [_piece("f", 1000, 10, chunkSize=400),
              {"name": "f", "type": "chunk", "offset": 400, "chunkOffset": 400, "chunkDigest": D1}]  # 600 to the end
    with pytest.raises(ChunkTooLargeError, match="file offset 400"):
        build_both_ways(pieces, limits)


def test_a_huge_zeros_chunk_is_refused_before_anything_is_allocated():
    """A zstd:chunked hole is made locally as `bytes(size)`: a TOC may declare a terabyte of it."""
    hole = _piece("sparse", 1 << 40, 10, chunkType="zeros")
    tracemalloc.start()
    try:
        with pytest.raises(ChunkTooLargeError):
            build_both_ways([hole], TocLimits())
        assert tracemalloc.get_traced_memory()[1] < 64 * MB
    finally:
        tracemalloc.stop()


def test_the_compressed_extent_may_take_twice_the_cap():
    """An extent runs to the next data offset: a one-byte file followed by 2 MB of blob is one
    fetch of 2 MB, in memory, whatever the file's size."""
    limits = TocLimits(max_chunk_size=1000)
    assert build_toc([_piece("f", 1, 10)], data_end=2010, limits=limits).lookup("f").chunks[0].blob_end == 2010
    with pytest.raises(ChunkTooLargeError):
        build_toc([_piece("f", 1, 10)], data_end=2011, limits=limits)
    doc = json.dumps({"entries": [_piece("f", 1, 10)]}).encode()
    with pytest.raises(ChunkTooLargeError):
        parse_toc_document(doc, data_end=2011, limits=limits)
