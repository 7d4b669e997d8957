"""Bad command lines and missing images end in one clear line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from stargz_store.convert.errors import LocationSyntaxError
from stargz_store.convert.location import OciLocation, RegistryLocation, parse_location
from stargz_store.convert.cli import parse_size

from tests.convert.layer_compare import run_convert


def assert_clear_failure(proc, code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    message = proc.stderr.strip()
    assert "Traceback" not in message
    assert "\n" not in message, f"expected one line, got: {message!r}"
    assert message.startswith("stargz-store convert: error: ")
    for word in words:
        assert word in message, message
    assert proc.stdout == ""


def test_parse_location_forms():
    assert parse_location("oci:/tmp/x:v1") == OciLocation(Path("/tmp/x"), "v1")
    assert parse_location("oci:rel/dir") == OciLocation(Path("rel/dir"), None)
    loc = parse_location("docker://127.0.0.1:5000/a/b:esgz")
    assert isinstance(loc, RegistryLocation)
    assert (loc.reference.registry, loc.reference.repository, loc.reference.tag) == ("127.0.0.1:5000", "a/b", "esgz")
    assert parse_location("docker://busybox").reference.repository == "library/busybox"


@pytest.mark.parametrize("text", ["busybox", "oci:", "oci:dir:", "docker://", "docker://Bad/Upper:x",
                                  "dir:/tmp/x", "docker://host:5000/x:bad tag"])
def test_parse_location_rejects(text):
    with pytest.raises(LocationSyntaxError):
        parse_location(text)


def test_parse_size():
    assert parse_size("4194304") == 4 << 20
    assert parse_size("4M") == parse_size("4MiB") == 4 << 20
    assert parse_size("512k") == 512 << 10


@pytest.mark.parametrize("src, dst, words", [
    ("busybox:latest", "oci:/tmp/never", ("'busybox:latest'", "oci:DIR[:TAG]", "docker://")),
    ("oci:/tmp/never:x", "somewhere", ("'somewhere'",)),
    ("oci:/tmp/never:x", "docker://127.0.0.1:9/x@sha256:" + "0" * 64, ("needs a tag",)),
    ("docker://Bad/Repo:x", "oci:/tmp/never", ("bad registry host", "lower case")),
])
def test_bad_location_syntax(src, dst, words, tmp_path):
    proc = run_convert(src, dst)
    if "lower case" in words:  # one of the two phrasings, depending on which check trips first
        assert proc.returncode == 2 and ("bad registry host" in proc.stderr or "lower case" in proc.stderr)
        words = ()
    assert_clear_failure(proc, 2, *words)


@pytest.mark.parametrize("args, words", [
    (["--platform", "linux/amd64", "--all-platforms"], ("not allowed with",)),
    (["--compression-level", "99"], ("out of range 0-9",)),
    (["--format", "zstd-chunked", "--compression-level", "0"], ("out of range 1-22",)),
    (["--chunk-size", "lots"], ("invalid size",)),
    (["--format", "squashfs"], ("invalid choice",)),
    (["--platform", "linux"], ("invalid platform",)),
])
def test_bad_options(args, words, source_image, tmp_path):
    proc = run_convert(*args, source_image.ref, f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 2, *words)
    assert not (tmp_path / "out").exists()


def test_missing_arguments():
    proc = run_convert("oci:/tmp/only-one")
    assert_clear_failure(proc, 2, "DST")


def test_missing_layout_directory(tmp_path):
    proc = run_convert(f"oci:{tmp_path / 'absent'}:v1", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, "does not exist")


def test_directory_that_is_not_a_layout(tmp_path):
    (tmp_path / "plain").mkdir()
    proc = run_convert(f"oci:{tmp_path / 'plain'}:v1", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, "not an OCI image layout")


def test_missing_tag_lists_the_tags(source_image, tmp_path):
    proc = run_convert(f"oci:{source_image.layout}:nope", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, "no image tagged 'nope'", "tags: v1")
    assert not (tmp_path / "out").exists()  # nothing is created for a source that does not exist


def test_missing_platform_lists_the_platforms(tmp_path):
    from tests.fixtures.images import LayerBuilder, write_oci_index

    layer = LayerBuilder().add_file("a", b"a").gzip()
    write_oci_index(tmp_path / "multi", {"linux/amd64": [layer], "linux/arm64": [layer]}, tag="m")
    proc = run_convert("--platform", "linux/s390x", f"oci:{tmp_path / 'multi'}:m", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, "no image for platform linux/s390x", "linux/amd64", "linux/arm64")


def test_non_layer_media_type_is_refused(source_image, tmp_path):
    from tests.fixtures.images import read_oci_image, write_raw_manifest
    import shutil

    layout = tmp_path / "artifact"
    shutil.copytree(source_image.layout, layout)
    manifest = read_oci_image(layout, "v1").manifest
    manifest["layers"][0]["mediaType"] = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    write_raw_manifest(layout, manifest, tag="chart")
    proc = run_convert(f"oci:{layout}:chart", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, "helm.chart", "not a layer tar")


def test_docker_schema1_is_refused(tmp_path):
    from tests.fixtures.images import write_raw_manifest

    write_raw_manifest(tmp_path / "old", {"schemaVersion": 1, "name": "x", "tag": "v", "fsLayers": [],
                                          "mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                       tag="old")
    proc = run_convert(f"oci:{tmp_path / 'old'}:old", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, "schema 1")


def test_layer_that_is_not_a_tar(tmp_path):
    from tests.fixtures.images import gzip_bytes, random_bytes, write_oci_image

    digest = write_oci_image(tmp_path / "bad", [gzip_bytes(random_bytes(10_000, seed=5))], tag="b").layer_digests[0]
    proc = run_convert(f"oci:{tmp_path / 'bad'}:b", f"oci:{tmp_path / 'out'}:x")
    assert_clear_failure(proc, 1, digest, "not a valid layer tar")
