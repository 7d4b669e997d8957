"""Reference images pushed to a real registry, and a store daemon mounted on them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.images import push_oci_layout
from tests.fixtures.store import StoreDaemon, is_mounted, lazy_unmount, private_tmpdir, remove_tmpdir

REFERENCE_IMAGES = {
    # layout name: (expected-<name>.json, tag inside the layout)
    "tricky-esgz": ("tricky", "esgz"),
    "tricky-zstdchunked": ("tricky", "zstdchunked"),
    "multilayer-esgz": ("multilayer", "esgz"),
    "multilayer-zstdchunked": ("multilayer", "zstdchunked"),
    "podman-zstdchunked": ("podman-zstdchunked", None),
    "multilayer-orig": ("multilayer", "orig"),
}

# Small, quick-failing settings: tests stop registries and must not wait 30 s for an EIO.
FAST_CONFIG = """
noprefetch = true
no_background_fetch = true
[blob]
fetching_timeout_sec = 5
max_retries = 0
[resolver]
request_timeout_sec = 5
connect_timeout_sec = 2
[store]
resolve_timeout_sec = 20
"""


@dataclass(frozen=True)
class PushedImage:
    name: str
    ref: str
    layout: Path
    manifest: dict
    config: dict
    expected: dict

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]


def layout_tag(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]


def load_pushed(testdata: Path, name: str, ref: str) -> PushedImage:
    layout = testdata / name
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: layout / "blobs" / "sha256" / d.split(":", 1)[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    expected = json.loads((testdata / f"expected-{REFERENCE_IMAGES[name][0]}.json").read_text())
    return PushedImage(name, ref, layout, manifest, config, expected)


def push_reference(testdata: Path, registry_host: str, name: str, repo: str | None = None) -> PushedImage:
    layout = testdata / name
    tag = layout_tag(layout)
    ref = f"{registry_host}/{repo or 'ref/' + name}:{tag}"
    push_oci_layout(layout, tag, ref)
    return load_pushed(testdata, name, ref)


@pytest.fixture(scope="session")
def pushed(registry, testdata) -> dict[str, PushedImage]:
    """Every reference image in the shared session registry (pushed byte-exact with skopeo)."""
    return {name: push_reference(testdata, registry.host, name) for name in REFERENCE_IMAGES}


@pytest.fixture(scope="module")
def shared_store(pushed):
    """One daemon for the read-only tests of a module."""
    base = private_tmpdir()
    config = base / "config.toml"
    config.write_text(FAST_CONFIG)
    daemon = StoreDaemon(root=base / "root", mountpoint=base / "mnt", config_path=config, log_path=base / "store.log")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        if is_mounted(daemon.mountpoint):
            lazy_unmount(daemon.mountpoint)
        remove_tmpdir(base)


@pytest.fixture(scope="module")
def restart_image(registry, tmp_path_factory):
    """`restart_layer()` converted to eStargz, in the session registry as `restart/files:esgz`:
    many small files and one 24 MiB random one (the restart and passthrough tests read it)."""
    from tests.e2e.app_images import convert_and_push
    from tests.fixtures.images import write_oci_image
    from tests.fixtures.registry_images import fetch_image
    from tests.fixtures.restart_load import restart_layer

    work = tmp_path_factory.mktemp("restart-image")
    write_oci_image(work / "src", [restart_layer().gzip()], tag="src")
    convert_and_push(work / "src", "src", f"{registry.host}/restart/files:esgz")
    return fetch_image(registry.host, "restart/files", "esgz")
