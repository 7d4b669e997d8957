"""formats.detect: which reader, which digest authenticates the TOC, and what it costs in reads."""
from __future__ import annotations

import pytest

from stargz_store.formats.detect import UnverifiableLayerError, is_zstd_layer, read_layer_toc
from stargz_store.formats.errors import DigestMismatchError, FormatError, NotLazyFormatError
from stargz_store.formats.layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    FORMAT_ESTARGZ,
    FORMAT_ZSTD_CHUNKED,
)
from stargz_store.layer import FileBlobSource, TailCachedReadAt

from .helpers import build_layer, build_zstd_layer


@pytest.fixture(scope="module")
def esgz(tmp_path_factory):
    return build_layer(tmp_path_factory.mktemp("d") / "e.blob", {f"f{i}": b"x" * i for i in range(1, 300)})


def reader(built, tail_size: int = 512 << 10):
    src = FileBlobSource(built.path)
    return src, TailCachedReadAt(src, src.size, tail_size)


def test_estargz_verified_by_annotation_in_one_read(esgz):
    src, read_at = reader(esgz)
    parsed = read_layer_toc(read_at, src.size, esgz.descriptor)
    assert parsed.format == FORMAT_ESTARGZ
    assert parsed.toc_digest == esgz.result.toc_digest
    assert src.calls == 1


def test_toc_bigger_than_the_tail_costs_exactly_two_reads(esgz):
    src, read_at = reader(esgz, tail_size=100)
    read_layer_toc(read_at, src.size, esgz.descriptor, tail_size=100)
    assert src.calls == 2


def test_no_annotation_and_no_toc_key_is_refused_without_reading(esgz):
    desc = dict(esgz.descriptor, annotations={})
    src, read_at = reader(esgz)
    with pytest.raises(UnverifiableLayerError):
        read_layer_toc(read_at, src.size, desc)
    with pytest.raises(NotLazyFormatError):
        read_layer_toc(read_at, src.size, desc, key_digest=esgz.result.digest)  # the old key: no TOC digest
    assert src.calls == 0


def test_toc_key_authenticates_when_the_annotation_is_missing(esgz):
    desc = dict(esgz.descriptor, annotations={})
    src, read_at = reader(esgz)
    parsed = read_layer_toc(read_at, src.size, desc, key_digest=esgz.result.toc_digest)
    assert parsed.toc_digest == esgz.result.toc_digest


def test_a_toc_key_that_disagrees_with_the_annotation_is_refused(esgz):
    src, read_at = reader(esgz)
    with pytest.raises(DigestMismatchError):
        read_layer_toc(read_at, src.size, esgz.descriptor, key_digest="sha256:" + "1" * 64)
    assert src.calls == 0


def test_a_wrong_annotation_is_a_digest_mismatch(esgz):
    desc = dict(esgz.descriptor, annotations={ANNOTATION_TOC_DIGEST: "sha256:" + "2" * 64})
    src, read_at = reader(esgz)
    with pytest.raises(DigestMismatchError):
        read_layer_toc(read_at, src.size, desc)


def test_both_toc_digest_annotations_is_an_error(esgz):
    ann = dict(esgz.descriptor["annotations"], **{ANNOTATION_ZSTD_MANIFEST_CHECKSUM: "sha256:" + "3" * 64})
    src, read_at = reader(esgz)
    with pytest.raises(FormatError):
        read_layer_toc(read_at, src.size, dict(esgz.descriptor, annotations=ann))
    assert src.calls == 0


def test_zstd_chunked_is_picked_from_the_descriptor(tmp_path):
    built = build_zstd_layer(tmp_path / "z.blob", {"a": b"a" * 10_000})
    assert is_zstd_layer(built.descriptor)
    src, read_at = reader(built)
    parsed = read_layer_toc(read_at, src.size, built.descriptor)
    assert parsed.format == FORMAT_ZSTD_CHUNKED
    assert parsed.toc_digest == built.result.toc_digest
    assert src.calls == 1


def test_tail_cached_read_at_fetches_the_tail_once(esgz):
    src = FileBlobSource(esgz.path)
    read_at = TailCachedReadAt(src, src.size, 4096)
    blob = esgz.path.read_bytes()
    assert read_at(src.size - 51, 51) == blob[-51:]
    assert read_at(src.size - 4096, 4096) == blob[-4096:]
    assert read_at(src.size - 47, 47) == blob[-47:]
    assert src.calls == 1 and read_at.requests == 1
    assert read_at(0, 10) == blob[:10]  # outside the window: its own request
    assert src.calls == 2


def test_kept_toc_bytes_reopen_a_layer_without_requests(esgz, tmp_path):
    from stargz_store.cache import ChunkCache
    from stargz_store.layer import LayerResolver

    from .conftest import lazy_config

    resolver = LayerResolver(None, ChunkCache(tmp_path / "c"), lazy_config(tail_size=64 << 10))  # the TOC in one read
    src = FileBlobSource(esgz.path)
    resolver.open_layer_from_source(src, esgz.descriptor).close()
    assert src.calls == 1
    again = FileBlobSource(esgz.path)
    with resolver.open_layer_from_source(again, esgz.descriptor) as layer:
        assert layer.parsed.toc_digest == esgz.result.toc_digest
    assert again.calls == 0


def test_damaged_kept_toc_bytes_are_fetched_again(esgz, tmp_path):
    from stargz_store.cache import ChunkCache
    from stargz_store.layer import LayerResolver

    from .conftest import lazy_config

    cache = ChunkCache(tmp_path / "c")
    resolver = LayerResolver(None, cache, lazy_config(tail_size=64 << 10))  # the TOC in one read
    resolver.open_layer_from_source(FileBlobSource(esgz.path), esgz.descriptor).close()
    kept = list((tmp_path / "c" / "blobs").rglob("range-*"))
    assert len(kept) == 1
    kept[0].write_bytes(bytes(len(kept[0].read_bytes())))  # same length, wrong bytes
    src = FileBlobSource(esgz.path)
    with resolver.open_layer_from_source(src, esgz.descriptor) as layer:
        assert layer.parsed.toc_digest == esgz.result.toc_digest
    assert src.calls == 1
    assert kept[0].read_bytes() == esgz.path.read_bytes()[-len(kept[0].read_bytes()) :]
