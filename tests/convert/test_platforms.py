"""Multi-platform sources: the host's platform by default, `--platform`, `--all-platforms`."""
from __future__ import annotations

import hashlib
import json

import pytest

from stargz_store.registry.platforms import host_platform

from tests.convert.layer_compare import read_converted_layer, run_convert
from tests.fixtures.images import LayerBuilder, read_oci_image, write_oci_index, write_raw_manifest

PLATFORMS = ["linux/amd64", "linux/arm64"]


@pytest.fixture(scope="module")
def multi_image(tmp_path_factory):
    """An index with one single-layer image per platform; each holds /arch.txt naming its platform."""
    layout = tmp_path_factory.mktemp("multi") / "layout"
    layers = {p: [LayerBuilder().add_file("arch.txt", p.encode()).add_file("common.txt", b"same\n").gzip()]
              for p in PLATFORMS}
    index_digest, images = write_oci_index(layout, layers, tag="m")
    return layout, images


def _arch_of(image) -> str:
    """Which platform's /arch.txt the converted layer holds, read through our reader."""
    desc = image.layers[0]
    content_sha = read_converted_layer(image.blob(desc["digest"]), desc)["arch.txt"]["sha256"]
    matches = [p for p in PLATFORMS if hashlib.sha256(p.encode()).hexdigest() == content_sha]
    assert len(matches) == 1
    return matches[0]


def test_default_converts_the_host_platform(multi_image, tmp_path):
    layout, _ = multi_image
    host = f"{host_platform().os}/{host_platform().architecture}"
    if host not in PLATFORMS:
        pytest.skip(f"host platform {host} is not in the test index")
    proc = run_convert(f"oci:{layout}:m", f"oci:{tmp_path / 'out'}:x")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out", "x")
    assert image.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert _arch_of(image) == host


@pytest.mark.parametrize("platform", PLATFORMS)
def test_platform_option_selects_the_image(multi_image, platform, tmp_path):
    layout, images = multi_image
    proc = run_convert("--platform", platform, f"oci:{layout}:m", f"oci:{tmp_path / 'out'}:x")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out", "x")
    assert _arch_of(image) == platform
    assert image.config["architecture"] == platform.split("/")[1]


def test_all_platforms_writes_an_index(multi_image, tmp_path):
    layout, _ = multi_image
    out = tmp_path / "out"
    proc = run_convert("--all-platforms", "--format", "zstd-chunked", f"oci:{layout}:m", f"oci:{out}:x")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    root = index["manifests"][0]
    assert root["mediaType"] == "application/vnd.oci.image.index.v1+json"
    nested = json.loads((out / "blobs" / "sha256" / root["digest"].split(":")[1]).read_text())
    assert nested["mediaType"] == "application/vnd.oci.image.index.v1+json"
    got = [f"{m['platform']['os']}/{m['platform']['architecture']}" for m in nested["manifests"]]
    assert got == PLATFORMS
    for platform in PLATFORMS:
        image = read_oci_image(out, "x", platform=platform)
        assert image.layers[0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        assert _arch_of(image) == platform


def test_all_platforms_skips_attestations(multi_image, tmp_path):
    """BuildKit attestation manifests (`unknown/unknown`) are not images; they are left out."""
    layout, images = multi_image
    attestation = write_raw_manifest(layout, {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": images["linux/amd64"].config_digest, "size": 1},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": images["linux/amd64"].layer_digests[0],
                    "size": 1}],
    }, tag="attestation-only")
    index = json.loads((layout / "blobs" / "sha256" / _root_digest(layout, "m").split(":")[1]).read_text())
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": attestation,
                               "size": 1, "platform": {"os": "unknown", "architecture": "unknown"},
                               "annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
    write_raw_manifest(layout, index, tag="with-attestation")
    out = tmp_path / "out"
    proc = run_convert("--all-platforms", f"oci:{layout}:with-attestation", f"oci:{out}:x")
    assert proc.returncode == 0, proc.stderr
    root = json.loads((out / "blobs" / "sha256" / _root_digest(out, "x").split(":")[1]).read_text())
    assert [m["platform"]["architecture"] for m in root["manifests"]] == ["amd64", "arm64"]


def _root_digest(layout, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(m["digest"] for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
