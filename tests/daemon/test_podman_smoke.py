"""Smoke check with the real client: podman 4.3 pulls through our store and runs from it.

The full podman suite lives in tests/e2e; this only shows the daemon's side of the contract holds:
podman links the layer to our `diff`, sends use/release notifications, and the container reads
the right bytes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.fixtures.podman import need_podman, podman, podman_cleanup, podman_env

from .conftest import FAST_CONFIG, push_reference


def test_podman_pulls_and_runs_from_the_store(store_daemon_factory, private_registry, testdata, tmp_path):
    need_podman()
    image = push_reference(testdata, private_registry.host, "podman-zstdchunked", repo="smoke/busybox")
    store = store_daemon_factory(FAST_CONFIG)
    env = podman_env(tmp_path / "pod", additional_layer_store=str(store.mountpoint))
    try:
        podman("pull", "-q", "--tls-verify=false", image.ref, env=env)
        layer_dir = store.layer_dir(image.ref, image.layers[0]["digest"])
        graph = tmp_path / "pod" / "graph" / "overlay"
        links = [os.readlink(p / "diff") for p in graph.iterdir() if (p / "diff").is_symlink()]
        assert links == [str(layer_dir / "diff")]
        assert store.stats()["pool"]["uses"] >= 2  # lookup + CreateAs

        out = podman("run", "--rm", "--net=none", image.ref, "/bin/busybox", "sha256sum", "/data/seq", env=env).stdout
        want = image.expected["source_layers"][0]["overlay_diff"]["data/seq"]["sha256"]
        assert out.split()[0] == want

        podman("rmi", "-af", env=env)
        stats = store.stats()
        assert stats["pool"]["releases"] >= 1
        assert stats["refcounts"].get(f"{image.ref} {image.layers[0]['digest']}", 0) == 0
    finally:
        podman_cleanup(env)
    assert hashlib.sha256(Path(layer_dir / "diff" / "data" / "seq").read_bytes()).hexdigest() == want
