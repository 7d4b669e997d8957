"""End-to-end fixtures: a registry, our converted images in it, the store daemon, and a private podman.

Every part is real: Debian's docker-registry, `stargz-store convert`, the `stargz-store` FUSE
daemon and podman 4.3.1 with runc. The one addition is `RecordingProxy`, a pass-through in front
of the registry that notes each request's byte ranges (the registry's own log has no ranges).

Teardown order matters: podman removes its images (which sends the store its releases) while the
store is still mounted, then the store unmounts, then the proxy stops.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.podman import need_podman, podman, podman_cleanup, podman_env
from tests.fixtures.store import StoreDaemon

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
from .recording_proxy import RecordingProxy, Request

# Background fetch off: what a test measures is then only what the container read.
LAZY_CONFIG = "no_background_fetch = true\n"
BACKGROUND_CONFIG = "no_background_fetch = false\n"


@dataclass(frozen=True)
class E2EImages:
    """The images every e2e test can pull, each already in the session registry."""

    app_esgz: PushedImage
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
    convert_and_push(multi_src, "src", f"{registry.host}/e2e/multi:esgz")
    plain = push_plain(app_src, "src", registry.host, "e2e/app")
    shutil.rmtree(work, ignore_errors=True)
    return E2EImages(
        app_esgz=fetch_image(registry.host, "e2e/app", "esgz"),
        app_plain=plain,
        multi_esgz=fetch_image(registry.host, "e2e/multi", "esgz"),
    )


@pytest.fixture
def proxy(registry) -> Iterator[RecordingProxy]:
    p = RecordingProxy(registry.host).start()
    yield p
    p.stop()


@dataclass
class LazyPodman:
    """A podman whose storage.conf names the store's mountpoint in `additionallayerstores`.

    Image references go through `proxy.host`, so every byte podman or the store fetches is recorded.
    """

    proxy: RecordingProxy
    store: StoreDaemon
    env: dict[str, str]
    graphroot: Path
    marks: list[int] = field(default_factory=list)

    def ref(self, image: PushedImage) -> str:
        return image.ref(self.proxy.host)

    def podman(self, *args: str, timeout: float = 300, check: bool = True):
        return podman(*args, env=self.env, timeout=timeout, check=check)

    def pull(self, image: PushedImage) -> str:
        return self.podman("pull", "--tls-verify=false", self.ref(image)).stdout

    def run(self, image: PushedImage, *cmd: str) -> str:
        return self.podman("run", "--rm", "--net=none", "--pull=never", self.ref(image), *cmd).stdout

    def requests(self) -> list[Request]:
        return self.proxy.requests()

    def store_layer_links(self) -> dict[str, str]:
        """overlay layer id -> target of its `diff` symlink, for layers containers/storage took from an ALS."""
        links = {}
        overlay = self.graphroot / "overlay"
        if overlay.is_dir():
            for layer_dir in overlay.iterdir():
                diff = layer_dir / "diff"
                if diff.is_symlink():
                    links[layer_dir.name] = os.readlink(diff)
        return links


def _lazy_podman(factory, proxy, tmp_path, config: str) -> Iterator[LazyPodman]:
    store = factory(config)
    env = podman_env(tmp_path / "podman", additional_layer_store=str(store.mountpoint))
    lazy = LazyPodman(proxy=proxy, store=store, env=env, graphroot=tmp_path / "podman" / "graph")
    try:
        yield lazy
    finally:
        podman_cleanup(env)  # releases reach the store while it is still mounted


@pytest.fixture
def lazy_podman(e2e_images, proxy, store_daemon_factory, tmp_path) -> Iterator[LazyPodman]:
    """Store with background fetch off + podman using it."""
    yield from _lazy_podman(store_daemon_factory, proxy, tmp_path, LAZY_CONFIG)


@pytest.fixture
def background_podman(e2e_images, proxy, store_daemon_factory, tmp_path) -> Iterator[LazyPodman]:
    """Store with background fetch on + podman using it."""
    yield from _lazy_podman(store_daemon_factory, proxy, tmp_path, BACKGROUND_CONFIG)
