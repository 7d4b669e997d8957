"""A private podman pointed at a store, and the short directory podman 4.3.1 needs for it."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.fixtures.podman import podman
from tests.fixtures.store import StoreDaemon

from .app_images import PushedImage
from .recording_proxy import RecordingProxy, Request


@dataclass
class LazyPodman:
    """A podman whose storage.conf names the store's mountpoint in `additionallayerstores`.

    Image references go through `proxy.host`, so every byte podman or the store fetches is recorded.
    """

    proxy: RecordingProxy
    store: StoreDaemon
    env: dict[str, str]
    graphroot: Path

    def ref(self, image: PushedImage) -> str:
        return image.ref(self.proxy.host)

    def podman(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
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


@contextmanager
def short_podman_dir() -> Iterator[Path]:
    """A private podman directory with a short path.

    podman 4.3.1 passes `--runroot` to the `container cleanup` command conmon runs when a container
    exits, and that command refuses a runroot longer than 50 characters; `podman run` then waits
    for its 20 s conmon timeout before returning. pytest's tmp_path is too long for that.
    """
    path = Path(tempfile.mkdtemp(prefix="e2e-pod-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
