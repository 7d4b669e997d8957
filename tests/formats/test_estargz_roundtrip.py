"""Writer -> reader round trips over generated layers, and the writer's output as a plain tar.gz."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import zstandard

from stargz_store.formats import estargz_writer
from stargz_store.formats.errors import EntryEscapesRootError, MissingHardlinkTargetError
from stargz_store.formats.estargz import EStargzReader, build_estargz, read_file, read_toc
from stargz_store.formats.estargz_writer import MEDIA_TYPE_LAYER_GZIP, UnsupportedTarEntryError
from stargz_store.formats.layer_toc import ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE
from stargz_store.formats.tar_input import InputTarError
from stargz_store.formats.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME

from .expected import SYNTHETIC_NAMES, assert_layer_matches, expected_layer_from_tar, tree_snapshot
from .tarfixtures import TarBuilder, all_types_tar, random_bytes, small_tar

CHUNK = 64 << 10


class BytesReadAt:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def convert(tar_bytes: bytes, **kw):
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(tar_bytes), out, **kw)
    return result, out.getvalue()


def raw_toc(blob: bytes, toc_offset: int) -> dict:
    d = zlib.decompressobj(31)
    tar = d.decompress(blob[toc_offset:])
    size = int(tar[124:136].rstrip(b"\0 "), 8)
    return json.loads(tar[512 : 512 + size])


@pytest.fixture(scope="module")
def all_types() -> bytes:
    return all_types_tar(CHUNK)


@pytest.fixture(scope="module")
def converted(all_types):
    return convert(all_types, chunk_size=CHUNK)


def test_round_trip_keeps_every_entry_type(all_types, converted):
    result, blob = converted
    read_at = BytesReadAt(blob)
    parsed = read_toc(read_at, len(blob), expected_toc_digest=result.toc_digest)
    assert_layer_matches(parsed, read_at, expected_layer_from_tar(all_types))
    toc = parsed.toc
    assert toc.lookup("dup.txt") is not None and read_file(parsed, read_at, toc.lookup("dup.txt")) == b"second version wins\n"
    assert toc.lookup("dir/hard") is toc.lookup("dir/small.txt") is toc.lookup("other/hard2")
    assert toc.lookup("dir/small.txt").nlink == 3
    assert toc.lookup("wh/.wh.gone").type == "reg" and toc.lookup("wh/opq/.wh..wh..opq") is not None
    assert toc.lookup("xattr/file").xattrs["user.binary"] == b"\x00\x01\xfe\xff\x00"


def test_result_describes_the_blob(converted):
    result, blob = converted
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.size == len(blob)
    uncompressed = gzip.decompress(blob)  # multi-member gzip, like any runtime reads it
    assert result.diff_id == "sha256:" + hashlib.sha256(uncompressed).hexdigest()
    assert result.diff_size == len(uncompressed)
    assert result.media_type == MEDIA_TYPE_LAYER_GZIP
    assert result.annotations == {
        ANNOTATION_TOC_DIGEST: result.toc_digest,
        ANNOTATION_UNCOMPRESSED_SIZE: str(len(uncompressed)),
    }
    toc_offset = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=None).toc_offset
    d = zlib.decompressobj(31)
    tar = d.decompress(blob[toc_offset:])
    size = int(tar[124:136].rstrip(b"\0 "), 8)
    assert tar[:17] == TOC_TAR_NAME.encode()
    assert result.toc_digest == "sha256:" + hashlib.sha256(tar[512 : 512 + size]).hexdigest()
    assert tar[512 + size :].strip(b"\0") == b"" and len(tar) % 512 == 0 and len(tar) >= 512 + size + 1024
    assert d.unused_data == blob[-51:] and len(d.unused_data) == 51


def test_toc_json_is_tab_indented_like_go(converted):
    result, blob = converted
    toc_offset = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=None).toc_offset
    d = zlib.decompressobj(31)
    tar = d.decompress(blob[toc_offset:])
    size = int(tar[124:136].rstrip(b"\0 "), 8)
    text = tar[512 : 512 + size].decode()
    assert text.startswith('{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": ')


def test_chunking_layout(converted):
    result, blob = converted
    parsed = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    for name, size in [
        ("dir/big.bin", 3 * CHUNK + 12345),
        ("dir/exact-two-chunks.bin", 2 * CHUNK),
        ("dir/one-chunk.bin", CHUNK),
        ("dir/one-chunk-plus-one.bin", CHUNK + 1),
        ("sizes/f1", 1),
    ]:
        e = parsed.toc.lookup(name)
        assert e.size == size
        assert len(e.chunks) == math.ceil(size / CHUNK)
        assert [c.file_offset for c in e.chunks] == list(range(0, size, CHUNK))
        assert all(c.inner_offset == 0 for c in e.chunks)
        # each chunk starts its own gzip member whose first bytes are the chunk's payload
        for c in e.chunks:
            n = min(16, c.size)
            first = zlib.decompressobj(31).decompress(blob[c.blob_offset : c.blob_end], n)
            assert first == read_file(parsed, BytesReadAt(blob), e, c.file_offset, n)
    assert parsed.toc.lookup("dir/empty").chunks == ()


def test_partial_reads_are_byte_exact(all_types, converted):
    result, blob = converted
    read_at = BytesReadAt(blob)
    parsed = read_toc(read_at, len(blob), expected_toc_digest=result.toc_digest)
    e = parsed.toc.lookup("dir/big.bin")
    whole = random_bytes(3 * CHUNK + 12345, 1)
    for off, length in [(0, 0), (0, 1), (CHUNK - 1, 2), (CHUNK, CHUNK), (100, 3 * CHUNK), (e.size - 1, 10), (e.size + 5, 10)]:
        assert read_file(parsed, read_at, e, off, length) == whole[off : off + length]


def test_plain_tar_extracts_the_same_tree(tmp_path: Path, all_types, converted):
    """Any runtime can pull the blob normally: GNU tar extracts what the source tar extracts."""
    _, blob = converted
    (tmp_path / "src.tar").write_bytes(all_types)
    (tmp_path / "out.tar.gz").write_bytes(blob)
    trees = {}
    started = time.time_ns() - 1_000_000_000
    for name, archive, flag in [("src", "src.tar", "-xf"), ("out", "out.tar.gz", "-xzf")]:
        root = tmp_path / name
        root.mkdir()
        subprocess.run(
            ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-owner", "-p", flag, str(tmp_path / archive), "-C", str(root)],
            check=True,
            stderr=subprocess.DEVNULL,  # GNU tar warns about the 1969 and 2100 mtimes
        )
        trees[name] = tree_snapshot(root, skip_root_names=SYNTHETIC_NAMES, extracted_after_ns=started)
    assert trees["out"] == trees["src"]
    assert (tmp_path / "out" / NO_PREFETCH_LANDMARK).read_bytes() == b"\x0f"
    assert json.loads((tmp_path / "out" / TOC_TAR_NAME).read_bytes())["version"] == 1


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_compressed_input_gives_the_same_layer(all_types, converted, codec):
    result, blob = converted
    packed = gzip.compress(all_types) if codec == "gzip" else zstandard.ZstdCompressor().compress(all_types)
    result2, blob2 = convert(packed, chunk_size=CHUNK)
    assert (result2.toc_digest, result2.diff_id, result2.digest) == (result.toc_digest, result.diff_id, result.digest)
    assert blob2 == blob


def test_parallel_parts_give_identical_output(monkeypatch, all_types, converted):
    """Parts are cut at member starts, so how many threads deflate them cannot change a byte."""
    result, blob = converted
    monkeypatch.setattr(estargz_writer, "_MIN_PART", 16 << 10)
    outputs = {convert(all_types, chunk_size=CHUNK, workers=w)[1] for w in (1, 3)}
    assert outputs == {blob}


def test_no_prioritized_files_puts_no_prefetch_landmark_first(converted):
    result, blob = converted
    toc = raw_toc(blob, read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=None).toc_offset)
    names = [e["name"] for e in toc["entries"]]
    assert names[0] == NO_PREFETCH_LANDMARK and names[1] == "./"
    assert PREFETCH_LANDMARK not in names and TOC_TAR_NAME not in names
    assert toc["entries"][0]["digest"] == toc["entries"][0]["chunkDigest"] == (
        "sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8"
    )


def test_prioritized_files_come_first_with_parents_and_link_targets(all_types):
    prioritized = ["dir/hard", "/utf8/日本語.txt", "../dev/null", "missing/file", "dir/big.bin", "dir/small.txt"]
    result, blob = convert(all_types, chunk_size=CHUNK, prioritized=prioritized)
    parsed = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    entries = raw_toc(blob, parsed.toc_offset)["entries"]
    names = [e["name"] for e in entries if e["type"] != "chunk"]
    landmark = names.index(PREFETCH_LANDMARK)
    assert names[:landmark] == [
        "./", "./dir/", "./dir/small.txt", "./dir/hard",
        "./utf8/", "./utf8/日本語.txt", "./dev/", "./dev/null", "./dir/big.bin",
    ]  # fmt: skip
    assert NO_PREFETCH_LANDMARK not in names
    # one range [0, landmark offset) prefetches every prioritized chunk and nothing else
    landmark_offset = parsed.toc.prefetch_landmark_offset
    assert landmark_offset is not None
    prioritized_files = {"dir/small.txt", "dir/big.bin", "utf8/日本語.txt"}
    for path, e in parsed.toc.entries():
        for c in e.chunks:
            if e.name in prioritized_files:
                assert c.blob_end <= landmark_offset
            elif e.name != PREFETCH_LANDMARK:
                assert c.blob_offset > landmark_offset
    assert_layer_matches(parsed, BytesReadAt(blob), expected_layer_from_tar(all_types))


def test_prioritized_list_without_matches_still_gets_prefetch_landmark():
    result, blob = convert(small_tar(), prioritized=["not/here"])
    parsed = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    assert parsed.toc.lookup(PREFETCH_LANDMARK) is not None
    assert parsed.toc.lookup(NO_PREFETCH_LANDMARK) is None
    names = [e["name"] for e in raw_toc(blob, parsed.toc_offset)["entries"]]
    assert names[0] == PREFETCH_LANDMARK


def test_reconverting_drops_old_toc_and_landmarks(all_types, converted):
    result, blob = converted
    result2, blob2 = convert(blob, chunk_size=CHUNK, prioritized=["dir/small.txt"])
    parsed = read_toc(BytesReadAt(blob2), len(blob2), expected_toc_digest=result2.toc_digest)
    names = [e["name"] for e in raw_toc(blob2, parsed.toc_offset)["entries"]]
    assert TOC_TAR_NAME not in names and NO_PREFETCH_LANDMARK not in names
    assert names.count(PREFETCH_LANDMARK) == 1
    assert_layer_matches(parsed, BytesReadAt(blob2), expected_layer_from_tar(all_types))


def test_later_duplicate_replaces_earlier_and_takes_its_position():
    t = TarBuilder()
    t.file("a", b"old")
    t.file("b", b"b")
    t.file("./a", b"new content")
    result, blob = convert(t.getvalue())
    parsed = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    names = [e["name"] for e in raw_toc(blob, parsed.toc_offset)["entries"]]
    assert names == [NO_PREFETCH_LANDMARK, "b", "./a"]
    assert read_file(parsed, BytesReadAt(blob), parsed.toc.lookup("a")) == b"new content"


def test_empty_layer_converts():
    result, blob = convert(TarBuilder().getvalue())
    parsed = read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    assert [p for p, _ in parsed.toc.entries()] == ["", NO_PREFETCH_LANDMARK]
    assert result.diff_size == len(gzip.decompress(blob))


def test_large_payload_is_streamed_in_parts(monkeypatch):
    """Many parts, several in flight: offsets shifted per part must still land on members."""
    monkeypatch.setattr(estargz_writer, "_MIN_PART", 8 << 10)
    t = TarBuilder()
    for i in range(60):
        t.file(f"f{i:03}", random_bytes(3000 + i * 97, i))
    tar = t.getvalue()
    result, blob = convert(tar, chunk_size=4096, workers=2)
    read_at = BytesReadAt(blob)
    parsed = read_toc(read_at, len(blob), expected_toc_digest=result.toc_digest)
    assert_layer_matches(parsed, read_at, expected_layer_from_tar(tar))


def test_socket_or_unknown_tar_type_is_refused():
    t = TarBuilder()
    info = __import__("tarfile").TarInfo("weird")
    info.type = b"V"  # a GNU volume header: nothing eStargz can describe
    t._tar.addfile(info)
    with pytest.raises(UnsupportedTarEntryError):
        convert(t.getvalue())


def test_invalid_arguments():
    with pytest.raises(ValueError):
        convert(small_tar(), chunk_size=0)
    with pytest.raises(ValueError):
        convert(small_tar(), compression_level=10)


def test_writer_refuses_hardlink_to_missing_target():
    t = TarBuilder()
    t.file("a", b"a")
    t.hardlink("b", "nowhere")
    with pytest.raises(MissingHardlinkTargetError):
        convert(t.getvalue())


@pytest.mark.parametrize("name", ["../up", "a/../../up"])
def test_writer_refuses_names_escaping_the_root(name):
    t = TarBuilder()
    t.file(name, b"x")
    with pytest.raises(EntryEscapesRootError):
        convert(t.getvalue())


def test_reader_object(converted):
    result, blob = converted
    reader = EStargzReader(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    assert reader.toc_digest == result.toc_digest
    assert reader.read("./dir/small.txt") == b"hello, world\n"
    assert reader.read("/dir/hard", 7, 5) == b"world"
    assert reader.lookup("dir/") is reader.toc.lookup("dir")
    with pytest.raises(FileNotFoundError):
        reader.read("nope")
    with pytest.raises(IsADirectoryError):
        reader.read("dir")


@pytest.mark.parametrize("damage", ["truncate-payload", "garbage-gzip", "truncate-gzip"])
def test_corrupt_input_raises_input_tar_error(damage):
    tar = small_tar()
    data = {
        "truncate-payload": tar[:1700],
        "garbage-gzip": b"\x1f\x8b\x08\x00" + b"\xff" * 200,
        "truncate-gzip": gzip.compress(tar)[:300],
    }[damage]
    with pytest.raises(InputTarError):
        convert(data)


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_sparse_input_files_become_plain_files(tmp_path, tar_format):
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"data in the middle")
    tar_path = tmp_path / "in.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-cf", str(tar_path), "-C", str(src), "sparse"], check=True)
    result, blob = convert(tar_path.read_bytes())
    reader = EStargzReader(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    assert reader.read("sparse") == sparse.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "out.tgz").write_bytes(blob)
    subprocess.run(["tar", "-xzf", str(tmp_path / "out.tgz"), "-C", str(out)], check=True)
    assert (out / "sparse").read_bytes() == sparse.read_bytes()


def test_fast_toc_encoder_matches_json_dumps(converted):
    result, blob = converted
    entries = raw_toc(blob, read_toc(BytesReadAt(blob), len(blob), expected_toc_digest=None).toc_offset)["entries"]
    entries.append({"name": 'quote"back\\slash\ttab\x01ctl', "type": "reg", "xattrs": {}})
    for doc_entries in (entries, []):
        expected = json.dumps({"version": 1, "entries": doc_entries}, indent="\t", ensure_ascii=False).encode()
        assert estargz_writer.encode_toc_json(doc_entries) == expected


def test_fast_tar_header_matches_tarfile(all_types):
    import tarfile as tf

    fast_count = 0
    with tf.open(fileobj=io.BytesIO(all_types + small_tar()), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        infos = tar.getmembers()
    extra = tf.TarInfo("big-mode")
    extra.mode, extra.uid, extra.mtime = 0o107777, 8**7 - 1, 8**11 - 1
    for info in infos + [extra]:
        fast = estargz_writer.fast_ustar_header(info)
        if fast is not None:
            fast_count += 1
            assert fast == info.tobuf(tf.PAX_FORMAT, "utf-8", "surrogateescape"), info.name
    assert fast_count > 20


def test_writer_refuses_entry_under_a_file():
    t = TarBuilder()
    t.file("a", b"file")
    t.file("a/b", b"under a file")
    with pytest.raises(UnsupportedTarEntryError):
        convert(t.getvalue())


def test_non_utf8_name_is_kept_in_tar_and_replaced_in_toc(tmp_path):
    """Go's JSON turns invalid UTF-8 into U+FFFD; the tar stream keeps the raw bytes."""
    t = TarBuilder()
    raw_name = b"bad\xffname".decode("utf-8", "surrogateescape")
    t.file(raw_name, b"payload")
    result, blob = convert(t.getvalue())
    reader = EStargzReader(BytesReadAt(blob), len(blob), expected_toc_digest=result.toc_digest)
    assert reader.read("bad\ufffdname") == b"payload"
    (tmp_path / "out.tgz").write_bytes(blob)
    subprocess.run(["tar", "-xzf", str(tmp_path / "out.tgz"), "-C", str(tmp_path)], check=True, stderr=subprocess.DEVNULL)
    assert (tmp_path / b"bad\xffname".decode("utf-8", "surrogateescape")).read_bytes() == b"payload"
