"""Smoke check with the real client: podman pulls through our store and runs from it, in both lanes.

The full podman suite lives in tests/e2e; this only shows the daemon's side of the contract holds:
podman links the layer to our `diff` (looked up by blob digest under 4.3.1, by TOC digest under
Podman 5), sends use/release notifications, and the container reads the right bytes. The image is
zstd:chunked made by the lane's own podman (tests/fixtures/podman_made.py).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.fixtures.podman import podman, podman_cleanup
from tests.fixtures.podman_made import READ_SEQ

from .conftest import FAST_CONFIG


def test_podman_pulls_and_runs_from_the_store(store_daemon_factory, registry, podman_lane, podman_made_zstd):
    made = podman_made_zstd
    ref = made.ref(registry.host)
    key = podman_lane.layer_key(made.image.layers[0])
    store = store_daemon_factory(FAST_CONFIG, mountpoint=podman_lane.store_mountpoint())
    with podman_lane.private_dir("smoke-") as pod_dir:
        env = podman_lane.env(pod_dir, additional_layer_store=store.mountpoint)
        try:
            podman("pull", "-q", "--tls-verify=false", ref, env=env)
            layer_dir = store.layer_dir(ref, key)
            graph = pod_dir / "graph" / "overlay"
            links = [os.readlink(p / "diff") for p in graph.iterdir() if (p / "diff").is_symlink()]
            assert links == [podman_lane.seen(layer_dir / "diff")]
            assert store.stats()["pool"]["uses"] >= 2  # lookup + CreateAs

            out = podman("run", "--rm", "--net=none", ref, *READ_SEQ, env=env).stdout
            assert out.split()[0] == made.seq_sha256

            podman("rmi", "-af", env=env)
            stats = store.stats()
            assert stats["pool"]["releases"] >= 1
            assert stats["refcounts"].get(f"{ref} {key}", 0) == 0
        finally:
            podman_cleanup(env)
    assert hashlib.sha256(Path(layer_dir / "diff" / "data" / "seq").read_bytes()).hexdigest() == made.seq_sha256
