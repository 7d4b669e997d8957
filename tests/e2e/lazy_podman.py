"""A private podman (of either lane) pointed at a store."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.podman import PodmanLane, podman, podman_command
from tests.fixtures.store import StoreDaemon

from .app_images import PushedImage
from .recording_proxy import RecordingProxy, Request


@dataclass
class LazyPodman:
    """A podman whose storage.conf names the store's mountpoint in `additionallayerstores`.

    Image references go through `proxy.host`, so every byte podman or the store fetches is recorded.
    `lane` says which podman it is (4.3.1 on the host, or 5.x in the chroot).
    """

    proxy: RecordingProxy
    store: StoreDaemon
    env: dict[str, str]
    graphroot: Path
    lane: PodmanLane

    def ref(self, image: PushedImage) -> str:
        return image.ref(self.proxy.host)

    def podman(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman(*args, env=self.env, timeout=timeout, check=check)

    def command(self, *args: str) -> list[str]:
        """The argv of `podman ARGS` for this podman (for tests that start it themselves)."""
        return podman_command(self.env, *args)

    def pull(self, image: PushedImage) -> str:
        return self.podman("pull", "--tls-verify=false", self.ref(image)).stdout

    def run(self, image: PushedImage, *cmd: str) -> str:
        return self.podman("run", "--rm", "--net=none", "--pull=never", self.ref(image), *cmd).stdout

    def requests(self) -> list[Request]:
        return self.proxy.requests()

    def layer_dir(self, image: PushedImage, layer: dict) -> Path:
        """The store directory this podman looks `layer` up in (its key depends on the podman version)."""
        return self.store.layer_dir(self.ref(image), self.lane.layer_key(layer))

    def store_layer_links(self) -> dict[str, str]:
        """overlay layer id -> target of its `diff` symlink (as podman sees it), for layers taken from an ALS."""
        links = {}
        overlay = self.graphroot / "overlay"
        if overlay.is_dir():
            for layer_dir in overlay.iterdir():
                diff = layer_dir / "diff"
                if diff.is_symlink():
                    links[layer_dir.name] = os.readlink(diff)
        return links
