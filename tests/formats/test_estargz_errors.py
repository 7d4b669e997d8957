"""Every way a blob or its TOC can be wrong raises its own typed error, before anything is served."""
from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import tarfile
import zlib

import pytest

from stargz_store.formats.errors import (
    BadFooterError,
    ChunkCoverageError,
    DigestMismatchError,
    DuplicateEntryError,
    EntryEscapesRootError,
    FormatError,
    InvalidTocError,
    MissingHardlinkTargetError,
    NotLazyFormatError,
    OutOfBoundsError,
    TocTooLargeError,
)
from stargz_store.formats.estargz import build_estargz, build_footer, read_file, read_toc
from stargz_store.formats.estargz_writer import build_toc_member

from .tarfixtures import small_tar


class BytesReadAt:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __call__(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


@pytest.fixture(scope="module")
def layer():
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(small_tar()), out)
    blob = out.getvalue()
    parsed = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    d = zlib.decompressobj(31)
    tar = d.decompress(blob[parsed.toc_offset :])
    size = int(tar[124:136].rstrip(b"\0 "), 8)
    return blob, parsed.toc_offset, json.loads(tar[512 : 512 + size])


def with_toc(layer, toc_json: bytes) -> bytes:
    blob, toc_offset, _ = layer
    return blob[:toc_offset] + build_toc_member(toc_json, 6)[1] + build_footer(toc_offset)


def mutated(layer, change) -> bytes:
    toc = copy.deepcopy(layer[2])
    change(toc["entries"])
    return with_toc(layer, json.dumps(toc).encode())


def read(blob: bytes, **kw):
    return read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=kw.pop("digest", None), **kw)


def entry(entries, name):
    return next(e for e in entries if e["name"] == name)


def test_unchanged_toc_reads(layer):
    blob = mutated(layer, lambda entries: None)
    assert read(blob).toc.lookup("a/one.txt").size == 400


@pytest.mark.parametrize("bad_name", ["../escape", "./a/../../escape", "/etc/absolute"])
def test_entry_escaping_the_root(layer, bad_name):
    blob = mutated(layer, lambda es: entry(es, "./a/one.txt").update(name=bad_name))
    with pytest.raises(EntryEscapesRootError):
        read(blob)


def test_hardlink_target_escaping_the_root(layer):
    blob = mutated(layer, lambda es: entry(es, "./a/one-link").update(linkName="../../etc/shadow"))
    with pytest.raises(EntryEscapesRootError):
        read(blob)


def test_duplicate_names(layer):
    blob = mutated(layer, lambda es: es.append(dict(entry(es, "./a/"), name="a")))
    with pytest.raises(DuplicateEntryError):
        read(blob)


@pytest.mark.parametrize("offset_of", [lambda toc_offset: toc_offset + 3, lambda toc_offset: toc_offset, lambda _: -5])
def test_offset_outside_the_blob_data(layer, offset_of):
    toc_offset = layer[1]
    blob = mutated(layer, lambda es: entry(es, "./a/two.bin").update(offset=offset_of(toc_offset)))
    with pytest.raises(OutOfBoundsError):
        read(blob)


def test_chunks_not_covering_the_file(layer):
    """A first piece of 4000 bytes and no further `chunk` entries leave 6000 bytes uncovered."""
    blob = mutated(layer, lambda es: entry(es, "./a/two.bin").update(chunkSize=4000))
    with pytest.raises(ChunkCoverageError):
        read(blob)


def test_chunk_with_a_gap(layer):
    def change(es):
        e = entry(es, "./a/two.bin")
        e["chunkSize"] = 4000
        es.insert(es.index(e) + 1, {"name": e["name"], "type": "chunk", "offset": e["offset"], "chunkOffset": 5000, "chunkDigest": e["chunkDigest"]})

    with pytest.raises(ChunkCoverageError):
        read(mutated(layer, change))


def test_overlapping_chunks(layer):
    def change(es):
        e = entry(es, "./a/two.bin")
        e["chunkSize"] = 6000
        es.insert(es.index(e) + 1, {"name": e["name"], "type": "chunk", "offset": e["offset"], "chunkOffset": 5000, "chunkDigest": e["chunkDigest"]})

    with pytest.raises(ChunkCoverageError):
        read(mutated(layer, change))


def test_hardlink_to_missing_target(layer):
    blob = mutated(layer, lambda es: entry(es, "./a/one-link").update(linkName="./a/nope"))
    with pytest.raises(MissingHardlinkTargetError):
        read(blob)


def test_toc_over_the_size_cap(layer):
    blob = layer[0]
    with pytest.raises(TocTooLargeError):
        read(blob, max_toc_size=100)
    assert read(blob, max_toc_size=1 << 20)


def test_hostile_toc_member_stops_at_the_cap(layer):
    """A member that inflates to far more than the cap is refused without inflating all of it."""
    bomb = b"x" * (8 << 20)
    blob = with_toc(layer, bomb)
    with pytest.raises(TocTooLargeError):
        read(blob, max_toc_size=1 << 20)


def test_bad_footer_magic(layer):
    blob = bytearray(layer[0])
    assert blob[-51 + 32 : -51 + 38] == b"STARGZ"
    blob[-51 + 32 : -51 + 38] = b"STARGX"
    with pytest.raises(BadFooterError):
        read(bytes(blob))


def test_footer_offset_not_hex(layer):
    blob = bytearray(layer[0])
    blob[-51 + 16 : -51 + 20] = b"zzzz"
    with pytest.raises(BadFooterError):
        read(bytes(blob))


def test_footer_offset_beyond_the_blob(layer):
    blob = layer[0][:-51] + build_footer(len(layer[0]) + 100)
    with pytest.raises(BadFooterError):
        read(blob)


def test_plain_gzip_layer_is_not_lazy():
    blob = gzip.compress(small_tar())
    with pytest.raises(NotLazyFormatError):
        read(blob)
    with pytest.raises(NotLazyFormatError):
        read(b"\x1f\x8b" * 10)


def test_toc_digest_mismatch(layer):
    with pytest.raises(DigestMismatchError) as info:
        read(layer[0], digest="sha256:" + "0" * 64)
    assert info.value.expected == "sha256:" + "0" * 64


def test_chunk_digest_mismatch_in_toc(layer):
    blob = mutated(layer, lambda es: entry(es, "./a/two.bin").update(chunkDigest="sha256:" + "1" * 64))
    parsed = read(blob)
    with pytest.raises(DigestMismatchError):
        read_file(parsed, BytesReadAt(blob), parsed.toc.lookup("a/two.bin"))
    assert read_file(parsed, BytesReadAt(blob), parsed.toc.lookup("a/one.txt")) == b"one\n" * 100


def test_corrupted_payload_is_never_returned(layer):
    blob, _, _ = layer
    parsed = read(blob)
    chunk = parsed.toc.lookup("a/two.bin").chunks[0]
    for pos in (chunk.blob_offset + 20, (chunk.blob_offset + chunk.blob_end) // 2):
        bad = bytearray(blob)
        bad[pos] ^= 0x55
        with pytest.raises(DigestMismatchError):
            read_file(parsed, BytesReadAt(bytes(bad)), parsed.toc.lookup("a/two.bin"))


def test_truncated_chunk_data(layer):
    blob, _, _ = layer
    parsed = read(blob)
    chunk = parsed.toc.lookup("a/two.bin").chunks[0]
    with pytest.raises(DigestMismatchError):
        parsed.decompress_chunk(blob[chunk.blob_offset : chunk.blob_offset + 100], chunk)


def test_first_toc_entry_must_be_the_index(layer):
    blob, toc_offset, _ = layer
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"{}"
        info = tarfile.TarInfo("not-the-index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    member = zlib.compress(buf.getvalue(), 6, wbits=31)
    with pytest.raises(InvalidTocError, match="stargz.index.json"):
        read(blob[:toc_offset] + member + build_footer(toc_offset))


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"entries": {"a": 1}}', b'{"entries": [{"name": "x", "type": "socket"}]}'])
def test_malformed_toc_json(layer, payload):
    with pytest.raises(InvalidTocError):
        read(with_toc(layer, payload))


def test_toc_member_not_gzip(layer):
    blob, toc_offset, _ = layer
    with pytest.raises(InvalidTocError):
        read(blob[:toc_offset] + b"garbage garbage garbage" + build_footer(toc_offset))


def test_all_errors_are_format_errors():
    for cls in (BadFooterError, ChunkCoverageError, DigestMismatchError, DuplicateEntryError, EntryEscapesRootError,
                InvalidTocError, MissingHardlinkTargetError, NotLazyFormatError, OutOfBoundsError, TocTooLargeError):  # fmt: skip
        assert issubclass(cls, FormatError)


def test_digest_helper_is_sha256_of_raw_json(layer):
    blob, toc_offset, toc = layer
    raw = json.dumps(toc, indent=1).encode()
    parsed = read(with_toc(layer, raw), digest="sha256:" + hashlib.sha256(raw).hexdigest())
    assert parsed.toc_size == len(raw)
