"""The reference images (made by tools we did not write) read byte-exact through Layer."""
from __future__ import annotations

import hashlib
import random

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.formats.errors import NotLazyFormatError
from stargz_store.formats.file_reader import read_file
from stargz_store.layer import FileBlobSource, LayerResolver
from tests.formats.expected import BlobFile, compare_layer, load_expected, load_oci_image

from .conftest import lazy_config

IMAGES = {
    "tricky-esgz": "tricky",
    "tricky-zstdchunked": "tricky",
    "multilayer-esgz": "multilayer",
    "multilayer-zstdchunked": "multilayer",
    "podman-zstdchunked": "podman-zstdchunked",
}
READ_SIZE = 128 << 10  # what the kernel asks a FUSE file system for


def sha256_through_layer(layer, entry) -> str:
    h = hashlib.sha256()
    for off in range(0, entry.size, READ_SIZE):
        piece = layer.read(entry, off, READ_SIZE)
        assert len(piece) == min(READ_SIZE, entry.size - off)
        h.update(piece)
    return h.hexdigest()


@pytest.mark.parametrize("image_name", sorted(IMAGES))
def test_every_file_reads_byte_exact(testdata, tmp_path, image_name):
    image = load_oci_image(testdata / image_name)
    expected = load_expected(testdata, IMAGES[image_name])
    resolver = LayerResolver(None, ChunkCache(tmp_path / "cache"), lazy_config())
    for oci_layer, expected_layer in zip(image.layers, expected["source_layers"], strict=True):
        source = FileBlobSource(oci_layer.path)
        with resolver.open_layer_from_source(source, oci_layer.descriptor) as layer:
            # The TOC came with the tail (or the annotated position); a TOC larger than the tail
            # window costs exactly one more request.
            toc_fits = source.size - layer.parsed.toc_offset <= resolver.config.tail_size
            assert source.calls == (1 if toc_fits or layer.parsed.format != "estargz" else 2)
            assert compare_layer(layer.parsed, BlobFile(oci_layer.path), expected_layer, check_content=False) == []
            checked = 0
            for path, exp in expected_layer["entries"].items():
                if exp["type"] != "reg":
                    continue
                entry = layer.toc.lookup(path)
                assert entry is not None and entry.size == exp["size"], path
                assert sha256_through_layer(layer, entry) == exp["sha256"], path
                checked += 1
            assert checked > 0
            assert layer.stats()["verify_failures"] == 0


@pytest.mark.parametrize("image_name", ["tricky-esgz", "tricky-zstdchunked", "podman-zstdchunked"])
def test_random_ranges_match_the_uncached_reader(testdata, tmp_path, image_name):
    image = load_oci_image(testdata / image_name)
    oci_layer = image.layers[0]
    resolver = LayerResolver(None, ChunkCache(tmp_path / "cache"), lazy_config())
    rnd = random.Random(11)
    with resolver.open_layer_from_source(FileBlobSource(oci_layer.path), oci_layer.descriptor) as layer, BlobFile(
        oci_layer.path
    ) as blob:
        files = sorted((e for _, e in layer.toc.entries() if e.type == "reg" and e.size > 0), key=lambda e: -e.size)
        for entry in files[:5]:
            whole = read_file(layer.parsed, blob, entry)
            for _ in range(25):
                off = rnd.randrange(0, entry.size)
                size = rnd.choice([1, 4095, 4096, 65536, 131072, 1 << 20, 5 << 20])
                assert layer.read(entry, off, size) == whole[off : off + size], (entry.name, off, size)


@pytest.mark.parametrize("image_name", sorted(IMAGES))
def test_both_lookup_keys_open_the_layer(testdata, tmp_path, image_name):
    image = load_oci_image(testdata / image_name)
    oci_layer = image.layers[0]
    resolver = LayerResolver(None, ChunkCache(tmp_path / "cache"), lazy_config())
    with resolver.open_layer_from_source(
        FileBlobSource(oci_layer.path), oci_layer.descriptor, key_digest=oci_layer.digest
    ) as by_blob:
        toc_digest = by_blob.parsed.toc_digest
    with resolver.open_layer_from_source(
        FileBlobSource(oci_layer.path), oci_layer.descriptor, key_digest=toc_digest
    ) as by_toc:
        assert by_toc.parsed.toc_digest == toc_digest
        assert by_toc.blob_digest == oci_layer.digest


def test_plain_gzip_layers_are_refused_without_reading(testdata, tmp_path):
    image = load_oci_image(testdata / "multilayer-orig")
    resolver = LayerResolver(None, ChunkCache(tmp_path / "cache"), lazy_config())
    for oci_layer in image.layers:
        source = FileBlobSource(oci_layer.path)
        with pytest.raises(NotLazyFormatError):
            resolver.open_layer_from_source(source, oci_layer.descriptor)
        assert source.calls == 0  # no TOC digest annotation: refused from the descriptor alone


def test_plain_gzip_layer_looked_up_by_a_toc_key_costs_one_tail_read(testdata, tmp_path):
    oci_layer = load_oci_image(testdata / "multilayer-orig").layers[0]
    resolver = LayerResolver(None, ChunkCache(tmp_path / "cache"), lazy_config())
    source = FileBlobSource(oci_layer.path)
    with pytest.raises(NotLazyFormatError):
        resolver.open_layer_from_source(source, oci_layer.descriptor, key_digest="sha256:" + "ab" * 32)
    assert source.calls == 1
