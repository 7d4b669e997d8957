"""Hostile layers pushed to a real registry and looked up through the mounted store.

One image holds a good layer and one crafted layer per way a TOC can be hostile (over the byte
cap, a gzip or zstd bomb, too many entries, too deep, names the kernel cannot have, chunk offsets
outside the blob, a TOC digest that does not match, a footer past the blob), and one whose TOC is
valid but points a file at another file's data (`tests/fixtures/hostile_layers.py`). The store
runs with small caps, so every layer is tiny and the image builds in about a second. Each
crafted layer must be refused with EIO, for its own reason (logged, and matched here: a timeout
would also give EIO), while the good layer and a reference image keep serving the right bytes
and the daemon stays up.
"""
from __future__ import annotations

import errno
import os
import re

import pytest

from tests.fixtures.hostile_layers import GOOD_FILES, Limits, good_layer, hostile_suite, write_image
from tests.fixtures.images import push_oci_layout

from .conftest import FAST_CONFIG

LIMITS = Limits(max_toc_size=1 << 20, max_entries=2000, max_depth=64)


@pytest.fixture(scope="module")
def hostile_image(registry, tmp_path_factory):
    layers = [good_layer(), *hostile_suite(LIMITS)]
    layout = tmp_path_factory.mktemp("hostile") / "layout"
    write_image(layout, layers, "v1")
    ref = f"{registry.host}/hostile/all:v1"
    push_oci_layout(layout, "v1", ref)
    return ref, layers


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def test_hostile_layers_are_refused_while_good_ones_serve(store_daemon_factory, hostile_image, pushed):
    ref, layers = hostile_image
    store = store_daemon_factory(FAST_CONFIG + LIMITS.config())
    good = layers[0]
    good_diff = store.layer_dir(ref, good.descriptor["digest"]) / "diff"
    for name, data in GOOD_FILES.items():
        assert (good_diff / name).read_bytes() == data

    refused = [layer for layer in layers if layer.refusal]
    assert len(refused) >= 15
    for layer in refused:
        digest = layer.descriptor["digest"]
        code = errno_of(os.stat, store.layer_dir(ref, digest) / "diff")
        assert code == errno.EIO, f"{layer.name}: {errno.errorcode[code]}"
        reasons = [line for line in store.log_path.read_text(errors="replace").splitlines()
                   if digest in line and "WARNING" in line]
        assert reasons and any(re.search(layer.refusal, line) for line in reasons), f"{layer.name}: {reasons[-1:]}"
        assert "not ready after" not in "".join(reasons)  # refused at once, not timed out
        # Each lookup is still answered, the good layer still serves (also after the refusal).
        assert (good_diff / "hello.txt").read_bytes() == GOOD_FILES["hello.txt"]

    # A valid TOC pointing a file at another file's data: only that file fails to read.
    for layer in (x for x in layers if x.bad_files):
        diff = store.layer_dir(ref, layer.descriptor["digest"]) / "diff"
        for name, data in layer.files.items():
            if name in layer.bad_files:
                assert errno_of((diff / name).read_bytes) == errno.EIO
            else:
                assert (diff / name).read_bytes() == data

    # Another image, and the daemon itself, are unaffected.
    image = pushed["multilayer-esgz"]
    other = store.layer_dir(image.ref, image.layers[0]["digest"]) / "diff"
    assert (other / "etc" / "config.txt").read_bytes()
    assert store.proc is not None and store.proc.poll() is None
    pool = store.stats()["pool"]
    assert pool["layer_open_failures"] >= len(refused)


def test_caps_reach_the_toc_readers_from_the_config():
    from stargz_store.daemon.config import config_from_toml
    from stargz_store.formats.toc import TocLimits

    layer = config_from_toml({"store": {"max_toc_size_mb": 3, "max_toc_entries": 5, "max_path_depth": 7,
                                        "max_chunk_size_mb": 9}}).layer
    assert layer.max_toc_size == 3 << 20
    assert layer.toc_limits == TocLimits(max_entries=5, max_depth=7, max_implicit_names=3 << 20,
                                         max_chunk_size=9 << 20)
    assert config_from_toml({}).layer.toc_limits == TocLimits(max_entries=1_000_000, max_depth=2048,
                                                             max_implicit_names=150 << 20)
