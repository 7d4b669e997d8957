"""eStargz images made by the official Go converter read back exactly as their ground truth says."""
from __future__ import annotations

import hashlib
import subprocess

import pytest

from stargz_store.formats.estargz import read_toc
from stargz_store.formats.layer_toc import COMPRESSION_GZIP, FORMAT_ESTARGZ
from stargz_store.formats.toc import NO_PREFETCH_LANDMARK

from .expected import assert_layer_matches, load_expected, load_oci_image


@pytest.mark.parametrize(
    "image_dir, expected_name",
    [("tricky-esgz", "tricky"), ("multilayer-esgz", "multilayer")],
)
def test_reference_layers_match_ground_truth(testdata, image_dir, expected_name):
    image = load_oci_image(testdata / image_dir)
    expected = load_expected(testdata, expected_name)
    assert len(image.layers) == len(expected["source_layers"])
    for layer, exp_layer in zip(image.layers, expected["source_layers"]):
        assert layer.toc_digest, "the Go converter always annotates the TOC digest"
        with layer.open() as read_at:
            parsed = read_toc(read_at, layer.size, expected_toc_digest=layer.toc_digest)
            assert parsed.format == FORMAT_ESTARGZ and parsed.compression == COMPRESSION_GZIP
            assert parsed.toc_digest == layer.toc_digest
            assert_layer_matches(parsed, read_at, exp_layer)
            assert parsed.toc.lookup(NO_PREFETCH_LANDMARK) is not None


def test_reference_toc_is_found_with_one_tail_read(testdata):
    layer = load_oci_image(testdata / "tricky-esgz").layers[0]
    with layer.open() as read_at:
        read_toc(read_at, layer.size, expected_toc_digest=layer.toc_digest)
        assert len(read_at.reads) == 1
        assert read_at.reads[0] == (layer.size - 512 * 1024, 512 * 1024)


def test_reference_toc_needs_a_second_read_when_window_is_small(testdata):
    layer = load_oci_image(testdata / "tricky-esgz").layers[0]
    with layer.open() as read_at:
        parsed = read_toc(read_at, layer.size, expected_toc_digest=layer.toc_digest, tail_size=4096)
        assert len(read_at.reads) == 2
        assert read_at.reads[1][0] == parsed.toc_offset


def test_reference_diff_ids_match_full_decompression(testdata):
    """The blob is an ordinary tar.gz: gunzip gives the stream the config's diff_id names."""
    image = load_oci_image(testdata / "multilayer-esgz")
    for layer, diff_id in zip(image.layers, image.diff_ids):
        raw = subprocess.run(["gzip", "-dc", str(layer.path)], check=True, capture_output=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
        assert int(layer.annotations["io.containers.estargz.uncompressed-size"]) == len(raw)


def test_multichunk_file_of_reference_reads_any_range(testdata):
    """Ranges inside, across and at the edges of the 4 MiB chunks of the 16 MiB file."""
    image = load_oci_image(testdata / "tricky-esgz")
    expected = load_expected(testdata, "tricky")["source_layers"][0]["entries"]
    layer = image.layers[0]
    from stargz_store.formats.file_reader import read_file

    with layer.open() as read_at:
        parsed = read_toc(read_at, layer.size, expected_toc_digest=layer.toc_digest)
        big = max((e for _, e in parsed.toc.entries() if e.type == "reg"), key=lambda e: e.size)
        assert len(big.chunks) == 5
        whole = read_file(parsed, read_at, big)
        assert hashlib.sha256(whole).hexdigest() == expected[big.name]["sha256"]
        mib = 1 << 20
        for off, length in [(0, 1), (4 * mib - 1, 2), (4 * mib, 4 * mib), (3 * mib, 10 * mib), (big.size - 5, 100), (big.size, 10)]:
            assert read_file(parsed, read_at, big, off, length) == whole[off : off + length]


@pytest.mark.parametrize(
    "image_dir, expected_name",
    [
        ("multilayer-orig", "multilayer"),
        ("tricky-esgz", "tricky"),
        ("tricky-zstdchunked", "tricky"),
        ("podman-zstdchunked", "podman-zstdchunked"),
    ],
)
def test_converting_reference_layers_keeps_ground_truth(testdata, tmp_path, image_dir, expected_name):
    """Our writer over tars we did not write: plain gzip sources, Go's own eStargz output (whose
    TOC entry and landmark must be dropped, not duplicated) and zstd:chunked (skippable frames)."""
    from stargz_store.formats.estargz import build_estargz

    from .expected import BlobFile

    image = load_oci_image(testdata / image_dir)
    expected = load_expected(testdata, expected_name)
    for layer, exp_layer in zip(image.layers, expected["source_layers"]):
        out_path = tmp_path / f"layer{layer.index}.esgz"
        with open(layer.path, "rb") as src, open(out_path, "wb") as dst:
            result = build_estargz(src, dst, prioritized=["etc/config.txt", "files/one"])
        with BlobFile(out_path) as read_at:
            parsed = read_toc(read_at, result.size, expected_toc_digest=result.toc_digest)
            assert_layer_matches(parsed, read_at, exp_layer)
            assert parsed.toc.prefetch_landmark_offset is not None
        raw = subprocess.run(["gzip", "-dc", str(out_path)], check=True, capture_output=True).stdout
        assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
