"""The start fetch in the mounted daemon: once podman has looked up every layer of an image, the
store fetches what the image config's command runs and names, before anything reads it.

A real registry (its access log is the witness), a real FUSE mount, an eStargz image converted
by the product's own converter. Prefetch and background fetch are off, so every blob GET after
the layers' TOCs is the start fetch's or a read's.
"""
from __future__ import annotations

import pytest

from tests.e2e.app_images import build_source, convert_and_push
from tests.fixtures.images import LayerBuilder, random_bytes
from tests.fixtures.registry_images import fetch_image
from tests.fixtures.waiting import wait_for

from .conftest import FAST_CONFIG
from .test_operations import registry_blob_gets

pytestmark = pytest.mark.root

SCRIPT = b"#!/bin/sh\ncat /data/needed.bin > /dev/null\necho started\n"


@pytest.fixture
def command_image(private_registry, tmp_path):
    base = LayerBuilder().add_busybox()
    app = LayerBuilder().add_dir("data").add_file("data/needed.bin", random_bytes(600_000, seed=31))
    app.add_file("data/other.bin", random_bytes(600_000, seed=32))
    app.add_dir("app").add_file("app/run.sh", SCRIPT, mode=0o755)
    build_source(tmp_path / "src", [base.gzip(), app.gzip()], {"Cmd": ["/bin/sh", "/app/run.sh"]})
    convert_and_push(tmp_path / "src", "src", f"{private_registry.host}/start/app:esgz")
    return fetch_image(private_registry.host, "start/app", "esgz")


@pytest.mark.parametrize("start_fetch_mb", [64, 0])
def test_layers_looked_up_bring_what_the_command_reads(start_fetch_mb, command_image, private_registry,
                                                        store_daemon_factory):
    image = command_image
    ref = image.ref(private_registry.host)
    config_digest = image.manifest["config"]["digest"]
    store = store_daemon_factory(FAST_CONFIG.replace("[store]\n", f"[store]\nstart_fetch_mb = {start_fetch_mb}\n"))
    mark = private_registry.log_mark()
    for layer in image.layers:  # what podman does at pull: every layer's directory, nothing read yet
        assert (store.layer_dir(ref, layer["digest"]) / "info").read_bytes()
    opened, _ = registry_blob_gets(private_registry.log_since(mark), config_digest)
    assert opened >= len(image.layers)  # the TOCs

    def fetched() -> int:
        return registry_blob_gets(private_registry.log_since(mark), config_digest)[1]

    app_diff = store.layer_dir(ref, image.layers[1]["digest"]) / "diff"
    if start_fetch_mb:
        logged = lambda: "start fetch of" in store.log_tail(200000)  # noqa: E731
        wait_for(logged, timeout=60, interval=0.1)
        # The log line comes once the fetches are started; the count below must wait until they
        # are answered (no flight left in any layer), not for a moment after the line.
        quiet = lambda: all(s.get("in_flight", 0) == 0 for s in store.stats().get("layers", {}).values())  # noqa: E731
        assert wait_for(quiet, timeout=60, interval=0.1)
        settled = fetched()
        assert settled > 600_000  # busybox, the script and the file it names
        line = next(l for l in store.log_tail(200000).splitlines() if "start fetch of" in l)
        assert "1 program(s) and 2 file(s)" in line, line  # /bin/busybox; /app/run.sh, /data/needed.bin
        # The command's reads are answered from the cache: no request, no byte more.
        assert (app_diff / "app" / "run.sh").read_bytes() == SCRIPT
        assert (app_diff / "data" / "needed.bin").read_bytes() == random_bytes(600_000, seed=31)
        assert (store.layer_dir(ref, image.layers[0]["digest"]) / "diff" / "bin" / "busybox").stat().st_size
        assert fetched() == settled
    before = fetched()
    # What the command does not name is not fetched until read.
    assert (app_diff / "data" / "other.bin").read_bytes() == random_bytes(600_000, seed=32)
    assert fetched() > before + 400_000
