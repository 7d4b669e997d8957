"""zstd:chunked blobs made by tools we did not write read back exactly as their ground truth says.

`podman-zstdchunked` is containers/storage's own flavour (podman 4.3.1, 40-byte footer, old
annotation names); `tricky-`/`multilayer-zstdchunked` are stargz-snapshotter's flavour (Go
converter `--zstdchunked`).
"""
from __future__ import annotations

import hashlib
import io
import json
import subprocess

import pytest
import zstandard

from stargz_store.formats import zstd_chunked
from stargz_store.formats.file_reader import read_file
from stargz_store.formats.layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM,
    COMPRESSION_ZSTD,
    FORMAT_ZSTD_CHUNKED,
)
from stargz_store.formats.zstd_chunked import build_zstd_chunked

from .expected import assert_layer_matches, load_expected, load_oci_image

STARGZ_IMAGES = [("tricky-zstdchunked", "tricky"), ("multilayer-zstdchunked", "multilayer")]


def _podman_expected(testdata):
    layer = load_expected(testdata, "podman-zstdchunked")["source_layers"][0]
    # podman import sets the layer root itself; the ground truth says not to compare it.
    entries = {k: v for k, v in layer["entries"].items() if k != "."}
    return {**layer, "entries": entries}


@pytest.mark.parametrize("image_dir, expected_name", STARGZ_IMAGES)
def test_stargz_flavour_matches_ground_truth(testdata, image_dir, expected_name):
    image = load_oci_image(testdata / image_dir)
    expected = load_expected(testdata, expected_name)
    assert len(image.layers) == len(expected["source_layers"])
    for layer, exp_layer in zip(image.layers, expected["source_layers"]):
        with layer.open() as read_at:
            parsed = zstd_chunked.read_toc_any(read_at, layer.size, layer.annotations)
            assert parsed.format == FORMAT_ZSTD_CHUNKED and parsed.compression == COMPRESSION_ZSTD
            assert parsed.flavour == zstd_chunked.FLAVOUR_STARGZ
            assert parsed.toc_digest == layer.annotations[ANNOTATION_TOC_DIGEST]
            assert_layer_matches(parsed, read_at, exp_layer)


def test_podman_blob_matches_ground_truth(testdata):
    image = load_oci_image(testdata / "podman-zstdchunked")
    layer = image.layers[0]
    checksum = layer.annotations[ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM]
    with layer.open() as read_at:
        parsed = zstd_chunked.read_toc(read_at, layer.size, layer.annotations, expected_toc_digest=None)
        assert parsed.flavour == zstd_chunked.FLAVOUR_CONTAINERS
        assert parsed.toc_digest == checksum
        assert parsed.format == FORMAT_ZSTD_CHUNKED and parsed.compression == COMPRESSION_ZSTD
        assert not parsed.tar_split_digest  # containers/storage 1.43 wrote no tar-split
        assert_layer_matches(parsed, read_at, _podman_expected(testdata))
        # The 3 MB random file is cut into many content-defined chunks.
        rand = parsed.toc.lookup("data/rand")
        assert rand is not None and len(rand.chunks) > 10
        # busybox has runs of zeros, stored as `zeros` chunks and synthesised on read.
        busybox = parsed.toc.lookup("bin/busybox")
        assert busybox is not None and any(c.zeros for c in busybox.chunks)


def test_podman_blob_via_dispatcher_and_via_footer_alone(testdata):
    layer = load_oci_image(testdata / "podman-zstdchunked").layers[0]
    checksum = layer.annotations[ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM]
    with layer.open() as read_at:
        by_annotation = zstd_chunked.read_toc_any(read_at, layer.size, layer.annotations)
        assert by_annotation.flavour == zstd_chunked.FLAVOUR_CONTAINERS
        by_footer = zstd_chunked.read_toc_any(read_at, layer.size, {}, key_digest=checksum)
        assert by_footer.flavour == zstd_chunked.FLAVOUR_CONTAINERS
        assert by_footer.toc_digest == by_annotation.toc_digest == checksum
        assert_layer_matches(by_footer, read_at, _podman_expected(testdata))


@pytest.mark.parametrize("image_dir, expected_name", STARGZ_IMAGES)
def test_stargz_flavour_without_annotations_is_told_apart_by_key(testdata, image_dir, expected_name):
    """Both flavours write the 40-byte footer; the key digest says which digest rule applies."""
    layer = load_oci_image(testdata / image_dir).layers[0]
    key = layer.annotations[ANNOTATION_TOC_DIGEST]
    with layer.open() as read_at:
        parsed = zstd_chunked.read_toc_any(read_at, layer.size, {}, key_digest=key)
        assert parsed.flavour == zstd_chunked.FLAVOUR_STARGZ and parsed.toc_digest == key
        assert_layer_matches(parsed, read_at, load_expected(testdata, expected_name)["source_layers"][0])


def test_position_annotation_costs_exactly_one_read(testdata):
    layer = load_oci_image(testdata / "tricky-zstdchunked").layers[0]
    offset, size, _ = zstd_chunked.manifest_position(layer.annotations)
    with layer.open() as read_at:
        zstd_chunked.read_toc_any(read_at, layer.size, layer.annotations)
        assert read_at.reads == [(offset - 8, size + 8)]


def test_without_annotations_one_tail_read_or_two(testdata):
    layer = load_oci_image(testdata / "podman-zstdchunked").layers[0]
    checksum = layer.annotations[ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM]
    with layer.open() as read_at:
        zstd_chunked.read_toc_any(read_at, layer.size, {}, key_digest=checksum)
        assert read_at.reads == [(layer.size - (512 << 10), 512 << 10)]
    with layer.open() as read_at:
        parsed = zstd_chunked.read_toc_any(read_at, layer.size, {}, key_digest=checksum, tail_size=1024)
        assert len(read_at.reads) == 2
        assert read_at.reads[1] == (parsed.toc_offset - 8, parsed.toc_compressed_size + 8)


def test_key_digest_must_match(testdata):
    layer = load_oci_image(testdata / "podman-zstdchunked").layers[0]
    wrong = "sha256:" + "0" * 64
    with layer.open() as read_at:
        with pytest.raises(zstd_chunked.DigestMismatchError):
            zstd_chunked.read_toc_any(read_at, layer.size, layer.annotations, key_digest=wrong)
        with pytest.raises(zstd_chunked.DigestMismatchError):
            zstd_chunked.read_toc_any(read_at, layer.size, {}, key_digest=wrong)
        with pytest.raises(zstd_chunked.UnauthenticatedTocError):
            zstd_chunked.read_toc_any(read_at, layer.size, {})


def test_blobs_decompress_to_their_diff_ids(testdata):
    """The skippable frames are invisible to a plain `zstd -d`: the tar is the config's diff_id.

    (Not checked for the podman 4.3.1 blob: its config names the diff_id of podman's local
    layer, which that old compressor did not reproduce byte for byte.)
    """
    image = load_oci_image(testdata / "multilayer-zstdchunked")
    for layer, diff_id in zip(image.layers, image.diff_ids):
        raw = subprocess.run(["zstd", "-dc", str(layer.path)], check=True, capture_output=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id


def test_zero_chunks_are_served_without_fetching(testdata):
    layer = load_oci_image(testdata / "podman-zstdchunked").layers[0]
    with layer.open() as read_at:
        parsed = zstd_chunked.read_toc_any(read_at, layer.size, layer.annotations)
        busybox = parsed.toc.lookup("bin/busybox")
        whole = read_file(parsed, read_at, busybox)
        for c in busybox.chunks:
            if c.zeros:
                assert parsed.decompress_chunk(b"", c) == whole[c.file_offset : c.file_offset + c.size] == bytes(c.size)


def test_our_writer_gives_podmans_toc_for_podmans_input(testdata):
    """Re-converting the tar inside podman's blob yields podman's TOC entry for entry.

    Names, types, modes, times, sizes, digests, chunk sizes, chunk digests and zero chunks all
    agree; only blob offsets differ (other compressor), and podman 4.3.1 still wrote zero
    access/change times that current containers/storage omits.
    """
    layer = load_oci_image(testdata / "podman-zstdchunked").layers[0]
    blob = layer.path.read_bytes()

    def toc_entries(data: bytes, annotations) -> list[dict]:
        offset, size, _ = zstd_chunked.manifest_position(annotations)
        doc = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(data[offset : offset + size]))
        skip = {"offset", "endOffset", "accesstime", "changetime"}
        return [{k: v for k, v in e.items() if k not in skip} for e in doc["entries"]]

    tar_bytes = subprocess.run(["zstd", "-dc", str(layer.path)], check=True, capture_output=True).stdout
    out = io.BytesIO()
    result = build_zstd_chunked(io.BytesIO(tar_bytes), out)
    theirs = toc_entries(blob, layer.annotations)
    assert any(e["type"] == "chunk" for e in theirs)
    assert toc_entries(out.getvalue(), result.annotations) == theirs
