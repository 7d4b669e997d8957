"""Images made by our own converter, served by the store: the tree must equal the source's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.store import REPO_ROOT
from tests.fs.overlay_check import compare_overlay, snapshot_mount


def manifest_of(registry_url: str, repo: str, tag: str) -> dict:
    import urllib.request

    req = urllib.request.Request(
        f"{registry_url}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_converted_multilayer_image(shared_store, pushed, registry, fmt):
    source = pushed["multilayer-orig"]
    repo, tag = f"converted/multilayer-{fmt}", "1"
    result = subprocess.run(
        [sys.executable, "-m", "stargz_store.cli", "convert", "--format", fmt,
         f"docker://{source.ref}", f"docker://{registry.host}/{repo}:{tag}"],
        capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = manifest_of(registry.url, repo, tag)
    ref = f"{registry.host}/{repo}:{tag}"
    assert len(manifest["layers"]) == len(source.expected["source_layers"])
    for desc, want in zip(manifest["layers"], source.expected["source_layers"]):
        layer_dir = shared_store.layer_dir(ref, desc["digest"])
        problems = compare_overlay(snapshot_mount(layer_dir / "diff"), want)
        assert not problems, f"layer {want['index']}: {len(problems)} differences:\n" + "\n".join(problems[:30])
        info = json.loads((layer_dir / "info").read_bytes())
        assert info["compression"] == (4 if fmt == "zstd-chunked" else 2)
        assert os.stat(layer_dir / "blob").st_size == desc["size"]
