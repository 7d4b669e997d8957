"""Property-based: any input to a format parser is either a valid model or a `FormatError`.

Never another exception, never more than the caps. Each property starts from real layers (built
by our writers from `small_tar`) and breaks them the ways a registry or an attacker can: bytes
flipped, cut or appended, TOC JSON rewritten, entries of any shape and type. The models that
come out are checked against the invariants `formats.toc` promises.

`make fuzz` runs the same parsers under a coverage-guided fuzzer; what it finds is kept in
`test_fuzz_regressions.py`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stargz_store.formats import estargz_footer, zstd_chunked, zstd_chunked_footer
from stargz_store.formats.estargz import decompress_chunk, read_toc
from stargz_store.formats.estargz_writer import build_toc_member
from stargz_store.formats.tar_split import parse_tar_split, split_tar
from stargz_store.formats.toc import Chunk, build_toc, parse_toc_document
from stargz_store.formats.toc_member import extract_toc_json

from .hostile import (
    CAP,
    LIMITS,
    BytesReadAt,
    build_outcome,
    check_tree,
    estargz_seed,
    outcome,
    read_all_files,
    target_estargz_blob,
    target_estargz_toc_json,
    zstd_seed,
)
from .tarfixtures import small_tar

# A few seconds in CI, the same examples every run (a property that fails, fails every time: no
# test that passes or fails by chance); `HOSTILE_EXAMPLES=5000` searches harder and anew each
# run, and `make fuzz` searches with coverage.
SEARCHING = "HOSTILE_EXAMPLES" in os.environ
HOSTILE = settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "60")),
    derandomize=not SEARCHING,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- strategies ---------------------------------------------------------------------------------

D1 = "sha256:" + hashlib.sha256(b"x").hexdigest()
D2 = "sha256:" + "2" * 64
components = st.sampled_from(["a", "b", "c", ".", "..", "", "\0", "é", ".wh.a", ".wh..wh..opq", "d" * 40])
names = st.tuples(st.sampled_from(["", "./", "/", "./."]), st.lists(components, max_size=10),
                  st.sampled_from(["", "/", "//"])).map(lambda t: t[0] + "/".join(t[1]) + t[2])
ints = st.integers(-3, 700) | st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30])
json_scalars = st.none() | st.booleans() | ints | st.floats(width=32) | st.text(max_size=6)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)
digests = st.sampled_from([D1, D2, "", "sha256:xyz", "md5:00", None, 5])
entry_types = st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "sock", 3, None])
entries = st.fixed_dictionaries(
    {"name": names, "type": entry_types},
    optional={
        "size": ints, "offset": ints, "chunkOffset": ints, "chunkSize": ints, "innerOffset": ints, "endOffset": ints,
        "digest": digests, "chunkDigest": digests, "linkName": names | json_scalars, "mode": ints, "uid": ints,
        "gid": ints, "devMajor": ints, "devMinor": ints,
        "modtime": st.sampled_from(["", "2023-11-14T22:13:20Z", "0001-01-01T00:00:00Z", "noon", "9999-99-99T99:99:99Z"]),
        "xattrs": st.dictionaries(st.sampled_from(["user.a", "", "a\0b", "security.capability"]),
                                  st.sampled_from(["AAH+/w==", "not base64!", ""]), max_size=2) | json_scalars,
        "chunkType": st.sampled_from(["", "zeros", "x"]),
    },
)


def mutate(data: bytes, draw) -> bytes:
    """`data` with a few bytes flipped, a cut, or bytes appended (chosen by hypothesis)."""
    out = bytearray(data)
    for pos, value in draw(st.lists(st.tuples(st.integers(0, max(0, len(out) - 1)), st.integers(0, 255)), max_size=4)):
        if out:
            out[pos] = value
    kind = draw(st.sampled_from(["none", "cut", "append", "prepend"]))
    if kind == "cut" and out:
        cut = draw(st.integers(0, len(out) - 1))
        out = out[:cut] if draw(st.booleans()) else out[cut:]
    elif kind == "append":
        out += draw(st.binary(max_size=64))
    elif kind == "prepend":
        out[:0] = draw(st.binary(max_size=64))
    return bytes(out)


# --- properties -----------------------------------------------------------------------------------


@HOSTILE
@given(tail=st.binary(max_size=120))
def test_estargz_footer_of_any_bytes(tail):
    kind, value = outcome(estargz_footer.parse_footer, tail)
    if kind == "ok":
        offset, size = value
        assert size in (estargz_footer.FOOTER_SIZE, estargz_footer.LEGACY_FOOTER_SIZE) and offset >= 0


@HOSTILE
@given(data=st.data())
def test_estargz_footer_with_bytes_changed(data):
    footer = estargz_footer.build_footer(data.draw(st.integers(0, 2**63 - 1)))
    tail = mutate(footer, data.draw)
    kind, value = outcome(estargz_footer.parse_footer, tail)
    if kind == "ok":
        assert value[0] >= 0


@HOSTILE
@given(tail=st.binary(max_size=160))
def test_zstd_footer_of_any_bytes(tail):
    kind, value = outcome(zstd_chunked_footer.parse_footer, tail)
    if kind == "ok":
        assert value.size in (40, 56, 64) and value.toc_offset >= 0 and value.toc_size >= 0


@HOSTILE
@given(data=st.data())
def test_zstd_footer_with_bytes_changed(data):
    fields = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=6, max_size=6))
    payload = zstd_chunked_footer.build_footer(*fields)
    tail = mutate(zstd_chunked_footer.skippable_frame(payload), data.draw)
    outcome(zstd_chunked_footer.parse_footer, tail)


@HOSTILE
@given(raw=st.lists(entries, max_size=12), data_end=st.integers(0, 800))
def test_toc_builder_on_any_entries(raw, data_end):
    kind, _, value = build_outcome(lambda: build_toc(raw, data_end=data_end, limits=LIMITS))
    if kind == "ok":
        check_tree(value, data_end)


@HOSTILE
@given(doc=json_values | st.dictionaries(st.sampled_from(["entries", "version", "tarSplitDigest"]), json_values))
def test_toc_document_of_any_json(doc):
    raw = json.dumps(doc).encode()
    kind, _, value = build_outcome(lambda: parse_toc_document(raw, data_end=500, limits=LIMITS))
    if kind == "ok":
        check_tree(value, 500)


@HOSTILE
@given(raw=st.binary(max_size=200))
def test_toc_document_of_any_bytes(raw):
    kind, _, value = build_outcome(lambda: parse_toc_document(raw, data_end=500, limits=LIMITS))
    if kind == "ok":
        check_tree(value, 500)


@HOSTILE
@given(data=st.data())
def test_estargz_blob_with_bytes_changed(data):
    target_estargz_blob(mutate(estargz_seed()[0], data.draw))


@HOSTILE
@given(data=st.data())
def test_estargz_toc_json_rewritten(data):
    """A TOC member that is valid gzip and tar, holding JSON changed byte by byte."""
    target_estargz_toc_json(mutate(estargz_seed()[2], data.draw))


@HOSTILE
@given(raw=st.lists(entries, max_size=10))
def test_estargz_toc_entries_replaced(raw):
    """A well-formed TOC document whose entries are anything, in a valid blob."""
    target_estargz_toc_json(json.dumps({"version": 1, "entries": raw}).encode())


@HOSTILE
@given(data=st.data(), annotated=st.booleans())
def test_zstd_blob_with_bytes_changed(data, annotated):
    blob, annotations = zstd_seed()
    blob = mutate(blob, data.draw)
    key = annotations[zstd_chunked.ANNOTATION_ZSTD_MANIFEST_CHECKSUM]
    kind, parsed = outcome(zstd_chunked.read_toc_any, BytesReadAt(blob), len(blob), annotations if annotated else {},
                           key_digest=None if annotated else key, max_toc_size=CAP, limits=LIMITS)
    if kind == "ok":
        check_tree(parsed.toc, parsed.toc_offset - 8)
        read_all_files(parsed, blob)
        if parsed.tar_split_digest:
            outcome(zstd_chunked.read_tar_split, BytesReadAt(blob), parsed, max_size=CAP)


@HOSTILE
@given(data=st.data())
def test_zstd_manifest_rewritten(data):
    """A zstd:chunked manifest of any JSON, authenticated (so the parser sees all of it)."""
    blob, annotations = zstd_seed()
    offset, size, _ = zstd_chunked.manifest_position(annotations)
    doc = data.draw(st.fixed_dictionaries({"version": st.just(1), "entries": st.lists(entries, max_size=8)},
                                          optional={"tarSplitDigest": digests}))
    manifest = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    rebuilt = blob[: offset - 8] + zstd_chunked_footer.skippable_frame(manifest)
    declared = data.draw(st.sampled_from([0, len(json.dumps(doc)), 5]))
    ann = {zstd_chunked.ANNOTATION_ZSTD_MANIFEST_CHECKSUM: "sha256:" + hashlib.sha256(manifest).hexdigest(),
           zstd_chunked.ANNOTATION_ZSTD_MANIFEST_POSITION: f"{offset}:{len(manifest)}:{declared}:1"}
    kind, parsed = outcome(zstd_chunked.read_toc_any, BytesReadAt(rebuilt), len(rebuilt), ann, max_toc_size=CAP,
                           limits=LIMITS)
    if kind == "ok":
        check_tree(parsed.toc, offset - 8)


@HOSTILE
@given(member=st.binary(max_size=300) | st.builds(lambda b: zlib.compress(b, 1, wbits=31), st.binary(max_size=1200)))
def test_toc_member_of_any_bytes(member):
    kind, value = outcome(extract_toc_json, member, 4096)
    if kind == "ok":
        assert len(value) <= 4096


@HOSTILE
@given(data=st.data())
def test_toc_member_with_bytes_changed(data):
    member = build_toc_member(b'{"version":1,"entries":[]}' * 20, 6)[1]
    pieces = mutate(member, data.draw)
    split = data.draw(st.integers(0, len(pieces)))
    kind, value = outcome(extract_toc_json, [pieces[:split], pieces[split:]], 1024)
    if kind == "ok":
        assert len(value) <= 1024


@HOSTILE
@given(data=st.binary(max_size=400) | st.lists(json_values, max_size=5).map(
    lambda vs: b"\n".join(json.dumps(v).encode() for v in vs)))
def test_tar_split_stream_of_any_bytes(data):
    kind, value = outcome(parse_tar_split, data)
    if kind == "ok":
        assert all(e.type in (1, 2) for e in value)


@HOSTILE
@given(data=st.data())
def test_tar_with_bytes_changed_is_split_or_refused(data):
    tar = mutate(small_tar(), data.draw)

    def walk() -> int:
        n = 0
        for item in split_tar(io.BytesIO(tar)):
            n += 1
            read = getattr(item, "read", None)
            if read is not None:
                read(1 << 20)
        return n

    outcome(walk)


@HOSTILE
@given(compressed=st.binary(max_size=300), size=st.integers(1, 5000), inner=st.integers(0, 600),
       zstd=st.booleans(), zeros=st.booleans())
def test_chunk_of_any_bytes_is_verified_or_refused(compressed, size, inner, zstd, zeros):
    payload = bytes(size)
    chunk = Chunk(0, size, 0, len(compressed), inner, "sha256:" + hashlib.sha256(payload).hexdigest(), zeros)
    decompress = zstd_chunked.decompress_chunk if zstd else decompress_chunk
    kind, value = outcome(decompress, compressed, chunk)
    if kind == "ok":
        assert value == payload


def test_small_layers_parse():
    """The seeds the properties start from are valid."""
    blob, toc_offset, _ = estargz_seed()
    assert read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=None).toc.lookup("a/one.txt")
    zblob, annotations = zstd_seed()
    assert zstd_chunked.read_toc_any(BytesReadAt(zblob), len(zblob), annotations).toc.lookup("a/two.bin")
    assert tarfile.is_tarfile(io.BytesIO(small_tar()))
