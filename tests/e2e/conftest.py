"""End-to-end fixtures: a registry, our converted images in it, the store daemon, and a private podman.

Every part is real: Debian's docker-registry, `stargz-store convert`, the `stargz-store` FUSE
daemon and podman with runc, in two lanes (`podman_lane`): the host's podman 4.3.1 and Podman 5
in a Debian 13 chroot. The one addition is `RecordingProxy`, a pass-through in front of the
registry that notes each request's byte ranges (the registry's own log has no ranges).

Teardown order matters: podman removes its images (which sends the store its releases) while the
store is still mounted, then the store unmounts, then the proxy stops.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.fixtures.podman import need_podman, podman_cleanup

from .app_images import (
    APP_CMD,
    PushedImage,
    app_layer,
    build_source,
    convert_and_push,
    fetch_image,
    multilayer_layers,
    push_plain,
)
from .lazy_podman import LazyPodman
from .recording_proxy import RecordingProxy

# Background fetch off: what a test measures is then only what the container read.
LAZY_CONFIG = "no_background_fetch = true\n"
BACKGROUND_CONFIG = "no_background_fetch = false\n"


@dataclass(frozen=True)
class E2EImages:
    """The images every e2e test can pull, each already in the session registry."""

    app_esgz: PushedImage
    app_zstd: PushedImage
    app_plain: PushedImage
    multi_esgz: PushedImage


@pytest.fixture(scope="session")
def e2e_images(registry, tmp_path_factory) -> E2EImages:
    """Build the sources once, convert them with our converter, push both flavours."""
    if os.geteuid() != 0:
        pytest.fail("the e2e tests need root (FUSE mounts, podman's rootful storage)")
    need_podman()
    work = tmp_path_factory.mktemp("e2e-images")
    app_src = build_source(work / "app", [app_layer().gzip()], APP_CMD)
    multi_src = build_source(work / "multi", multilayer_layers(), {"Cmd": ["/bin/sh"]})
    convert_and_push(app_src, "src", f"{registry.host}/e2e/app:esgz")
    convert_and_push(app_src, "src", f"{registry.host}/e2e/app:zstdchunked", "--format", "zstd-chunked")
    convert_and_push(multi_src, "src", f"{registry.host}/e2e/multi:esgz")
    plain = push_plain(app_src, "src", registry.host, "e2e/app")
    shutil.rmtree(work, ignore_errors=True)
    return E2EImages(
        app_esgz=fetch_image(registry.host, "e2e/app", "esgz"),
        app_zstd=fetch_image(registry.host, "e2e/app", "zstdchunked"),
        app_plain=plain,
        multi_esgz=fetch_image(registry.host, "e2e/multi", "esgz"),
    )


@pytest.fixture
def proxy(registry) -> Iterator[RecordingProxy]:
    p = RecordingProxy(registry.host).start()
    yield p
    p.stop()


def _lazy_podman(factory, proxy, config: str, lane) -> Iterator[LazyPodman]:
    store = factory(config, mountpoint=lane.store_mountpoint())
    with lane.private_dir("e2e-pod-") as pod_dir:
        env = lane.env(pod_dir, additional_layer_store=store.mountpoint)
        lazy = LazyPodman(proxy=proxy, store=store, env=env, graphroot=pod_dir / "graph", lane=lane)
        try:
            yield lazy
        finally:
            podman_cleanup(env)  # releases reach the store while it is still mounted


@pytest.fixture
def lazy_podman(e2e_images, proxy, store_daemon_factory, podman_lane) -> Iterator[LazyPodman]:
    """Store with background fetch off + podman (of the lane) using it."""
    yield from _lazy_podman(store_daemon_factory, proxy, LAZY_CONFIG, podman_lane)


@pytest.fixture
def background_podman(e2e_images, proxy, store_daemon_factory, podman_lane) -> Iterator[LazyPodman]:
    """Store with background fetch on + podman (of the lane) using it."""
    yield from _lazy_podman(store_daemon_factory, proxy, BACKGROUND_CONFIG, podman_lane)
