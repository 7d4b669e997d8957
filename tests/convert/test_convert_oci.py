"""`stargz-store convert` between OCI image layouts: the output reads back, extracts and describes itself correctly."""
from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from stargz_store.formats.detect import read_layer_toc
from stargz_store.formats.layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_UNCOMPRESSED_SIZE,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
)

from tests.convert.layer_compare import (
    SYNTHETIC_NAMES,
    assert_layer_matches_source,
    extracted_tree,
    read_converted_layer,
    run_convert,
    tar_extract,
    uncompressed,
)
from tests.fixtures.images import LayerBuilder, read_oci_image, sha256_digest, write_oci_image

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
FORMATS = ["estargz", "zstd-chunked"]


def _convert(fmt: str, source_image, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"converted-{fmt}") / "layout"
    proc = run_convert("--format", fmt, source_image.ref, f"oci:{out}:conv")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(out, "conv")
    assert proc.stdout.strip() == image.manifest_digest  # the CLI prints what it wrote
    return fmt, source_image, image


@pytest.fixture(scope="module")
def converted_estargz(source_image, tmp_path_factory):
    return _convert("estargz", source_image, tmp_path_factory)


@pytest.fixture(scope="module")
def converted_zstd(source_image, tmp_path_factory):
    return _convert("zstd-chunked", source_image, tmp_path_factory)


@pytest.fixture(params=FORMATS)
def converted(request):
    """(format, source image, converted image) for each output format, converted once per module."""
    return request.getfixturevalue("converted_estargz" if request.param == "estargz" else "converted_zstd")


def test_manifest_is_oci_with_format_annotations(converted):
    fmt, _, image = converted
    assert image.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert image.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert len(image.layers) == 2
    for desc in image.layers:
        annotations = desc["annotations"]
        assert int(annotations[ANNOTATION_UNCOMPRESSED_SIZE]) > 0
        if fmt == "estargz":
            assert desc["mediaType"] == GZIP_LAYER
            assert annotations[ANNOTATION_TOC_DIGEST].startswith("sha256:")
            assert ANNOTATION_ZSTD_MANIFEST_CHECKSUM not in annotations
        else:
            assert desc["mediaType"] == ZSTD_LAYER
            assert annotations[ANNOTATION_ZSTD_MANIFEST_CHECKSUM].startswith("sha256:")
            assert len(annotations[ANNOTATION_ZSTD_MANIFEST_POSITION].split(":")) == 4
            assert ANNOTATION_TOC_DIGEST not in annotations


def test_every_blob_matches_its_descriptor(converted):
    _, _, image = converted
    for desc in [image.manifest["config"], *image.layers]:
        data = image.blob(desc["digest"])
        assert sha256_digest(data) == desc["digest"]
        assert len(data) == desc["size"]


def test_diff_ids_are_the_uncompressed_layers(converted):
    _, _, image = converted
    diff_ids = image.config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(image.layers)
    for desc, diff_id in zip(image.layers, diff_ids):
        tar = uncompressed(image.blob(desc["digest"]))
        assert sha256_digest(tar) == diff_id
        assert int(desc["annotations"][ANNOTATION_UNCOMPRESSED_SIZE]) == len(tar)


def test_config_keeps_everything_but_diff_ids(converted):
    _, source, image = converted
    original = read_oci_image(source.layout, source.tag).config
    assert image.config["config"] == original["config"]
    assert image.config["history"] == original["history"]
    assert (image.config["os"], image.config["architecture"]) == (original["os"], original["architecture"])


def test_toc_annotation_authenticates_the_toc(converted):
    fmt, _, image = converted
    for desc in image.layers:
        blob = image.blob(desc["digest"])
        parsed = read_layer_toc(lambda o, n: blob[o:o + n], len(blob), desc)
        key = ANNOTATION_TOC_DIGEST if fmt == "estargz" else ANNOTATION_ZSTD_MANIFEST_CHECKSUM
        assert parsed.toc_digest == desc["annotations"][key]


def test_layers_read_back_equal_to_source(converted, source_tars):
    _, _, image = converted
    for desc, source_tar in zip(image.layers, source_tars):
        assert_layer_matches_source(read_converted_layer(image.blob(desc["digest"]), desc), source_tar)


def test_zstd_chunked_decompresses_to_the_source_tar(converted_zstd, source_tars):
    """Unlike eStargz (which adds the TOC and a landmark), zstd:chunked keeps the tar stream."""
    _, source, image = converted_zstd
    for desc, source_tar in zip(image.layers, source_tars):
        assert uncompressed(image.blob(desc["digest"])) == source_tar
    assert image.config["rootfs"]["diff_ids"] == source.diff_ids


def test_estargz_extracts_with_plain_tar_to_the_source_tree(converted_estargz, source_tars, tmp_path):
    _, _, image = converted_estargz
    for i, (desc, source_tar) in enumerate(zip(image.layers, source_tars)):
        src_tar = tmp_path / f"source-{i}.tar"
        src_tar.write_bytes(source_tar)
        tar_extract(src_tar, tmp_path / f"src-{i}", gzip=False)
        tar_extract(image.blob_path(desc["digest"]), tmp_path / f"out-{i}", gzip=True)
        got = extracted_tree(tmp_path / f"out-{i}")
        for name in SYNTHETIC_NAMES:
            got.pop(name, None)
        assert got == extracted_tree(tmp_path / f"src-{i}")


def test_estargz_without_record_has_no_prefetch_landmark_first(converted_estargz):
    _, _, image = converted_estargz
    for desc in image.layers:
        names = _tar_names(uncompressed(image.blob(desc["digest"])))
        assert names[0] == ".no.prefetch.landmark"
        assert ".prefetch.landmark" not in names
        assert names[-1] == "stargz.index.json"


def _tar_names(tar: bytes) -> list[str]:
    import io

    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return [m.name for m in tf]


# -- reference image made by other tools -----------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_multilayer_image_matches_its_source_tars(fmt, testdata, tmp_path):
    """tests/data/multilayer-orig (whiteouts, opaque dirs, replacements, made by other tools):
    each converted layer holds its source tar's entries, and diff_ids describe the new blobs."""
    expected = json.loads((testdata / "expected-multilayer.json").read_text())
    out = tmp_path / "out"
    proc = run_convert("--format", fmt, f"oci:{testdata / 'multilayer-orig'}:orig", f"oci:{out}:x")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(out, "x")
    source = read_oci_image(testdata / "multilayer-orig", "orig")
    assert len(image.layers) == len(source.layers) == 3
    for i, (desc, src_desc) in enumerate(zip(image.layers, source.layers)):
        blob = image.blob(desc["digest"])
        assert_layer_matches_source(read_converted_layer(blob, desc), uncompressed(source.blob(src_desc["digest"])))
        assert sha256_digest(uncompressed(blob)) == image.config["rootfs"]["diff_ids"][i]
    if fmt == "zstd-chunked":  # zstd:chunked keeps the tar stream byte for byte
        assert image.config["rootfs"]["diff_ids"] == [l["source_tar_diff_id"] for l in expected["source_layers"]]


# -- options and source kinds ----------------------------------------------------------------------

def test_docker_schema2_source_becomes_oci(tmp_path, source_tars):
    src = write_oci_image(tmp_path / "docker", source_tars[:1], tag="d", docker_media_types=True)
    assert read_oci_image(src.layout, "d").manifest["mediaType"].startswith("application/vnd.docker.")
    proc = run_convert(src.ref, f"oci:{tmp_path / 'out'}:o")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out", "o")
    assert image.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert image.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [d["mediaType"] for d in image.layers] == [GZIP_LAYER]
    assert_layer_matches_source(read_converted_layer(image.blob(image.layers[0]["digest"]), image.layers[0]),
                                source_tars[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_uncompressed_and_zstd_source_layers(fmt, tmp_path, source_tars):
    """Compression is detected from the blob, so plain and zstd layers convert like gzip ones."""
    import zstandard

    plain = source_tars[1]
    zstd_layer = zstandard.ZstdCompressor(level=3).compress(source_tars[0])
    src = write_oci_image(tmp_path / "src", [zstd_layer, plain], tag="t", compress=False)
    assert [d["mediaType"] for d in read_oci_image(src.layout, "t").layers] == [ZSTD_LAYER, "application/vnd.oci.image.layer.v1.tar"]
    proc = run_convert("--format", fmt, src.ref, f"oci:{tmp_path / 'out'}:t")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out", "t")
    for desc, source_tar in zip(image.layers, source_tars):
        assert desc["mediaType"] == (GZIP_LAYER if fmt == "estargz" else ZSTD_LAYER)
        assert_layer_matches_source(read_converted_layer(image.blob(desc["digest"]), desc), source_tar)


def test_chunk_size_and_level_are_applied(source_image, tmp_path):
    small = tmp_path / "small"
    proc = run_convert("--chunk-size", "1M", "--compression-level", "1", source_image.ref, f"oci:{small}:s")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(small, "s")
    blob = image.blob(image.layers[0]["digest"])
    parsed = read_layer_toc(lambda o, n: blob[o:o + n], len(blob), image.layers[0])
    random_file = parsed.toc.lookup("big/random.bin")
    assert random_file is not None
    assert len(random_file.chunks) == 10  # 9 MiB + 123 B in 1 MiB pieces
    assert all(c.size == 1 << 20 for c in random_file.chunks[:-1])


def test_identical_layers_are_converted_once(tmp_path):
    layer = LayerBuilder().add_file("same.txt", b"same\n").gzip()
    src = write_oci_image(tmp_path / "dup", [layer, layer], tag="t")
    proc = run_convert(src.ref, f"oci:{tmp_path / 'out'}:t")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out", "t")
    assert image.layers[0]["digest"] == image.layers[1]["digest"]
    assert image.config["rootfs"]["diff_ids"][0] == image.config["rootfs"]["diff_ids"][1]


def test_untagged_source_with_one_image_and_existing_destination(source_image, tmp_path):
    """`oci:DIR` without a tag works when the layout holds one image; a second tag is added beside the first."""
    single = tmp_path / "single"
    shutil.copytree(source_image.layout, single)
    out = tmp_path / "out"
    assert run_convert(f"oci:{single}", f"oci:{out}:a").returncode == 0
    assert run_convert("--format", "zstd-chunked", f"oci:{single}", f"oci:{out}:b").returncode == 0
    index = json.loads((out / "index.json").read_text())
    tags = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert tags == ["a", "b"]
    assert read_oci_image(out, "a").layers[0]["mediaType"] == GZIP_LAYER
    assert read_oci_image(out, "b").layers[0]["mediaType"] == ZSTD_LAYER


def test_converting_an_estargz_image_again_gives_the_same_tree(source_image, source_tars, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_convert(source_image.ref, f"oci:{first}:x").returncode == 0
    proc = run_convert("--format", "zstd-chunked", f"oci:{first}:x", f"oci:{second}:x")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(second, "x")
    for desc, source_tar in zip(image.layers, source_tars):
        annotations = desc["annotations"]
        assert ANNOTATION_TOC_DIGEST not in annotations  # stale eStargz annotation dropped
        assert_layer_matches_source(read_converted_layer(image.blob(desc["digest"]), desc), source_tar)


def test_corrupt_source_layer_is_refused(source_image, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source_image.layout, broken)
    digest = read_oci_image(broken, "v1").layers[1]["digest"]
    path = broken / "blobs" / "sha256" / digest.split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    proc = run_convert(f"oci:{broken}:v1", f"oci:{tmp_path / 'out'}:x")
    assert proc.returncode == 1
    assert digest in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "index.json").exists()  # no tag names a half-converted image



@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name, source_tag", [("tricky", "esgz"), ("multilayer", "orig")])
def test_reference_images_against_ground_truth(name, source_tag, fmt, testdata, tmp_path):
    """Reference images made by the Go tools (every entry type and corner case in `tricky`, an
    eStargz source) convert to layers matching expected-<name>.json entry by entry."""
    from tests.formats.expected import assert_layer_matches

    expected = json.loads((testdata / f"expected-{name}.json").read_text())
    source_dir = testdata / (f"{name}-esgz" if source_tag == "esgz" else f"{name}-orig")
    out = tmp_path / "out"
    proc = run_convert("--format", fmt, f"oci:{source_dir}:{source_tag}", f"oci:{out}:x")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(out, "x")
    assert len(image.layers) == len(expected["source_layers"])
    for desc, layer in zip(image.layers, expected["source_layers"]):
        blob = image.blob(desc["digest"])
        read_at = lambda o, n, blob=blob: blob[o:o + n]  # noqa: E731
        parsed = read_layer_toc(read_at, len(blob), desc)
        assert_layer_matches(parsed, read_at, layer)
