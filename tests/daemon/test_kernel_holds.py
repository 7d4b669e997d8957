"""The store keeps a node only while the kernel holds it, and lets the kernel go of what is released.

Through a real mount: the kernel's dentry cache decides what the store's node table holds (it
sends FORGET when it drops a node), so names looked up once cannot grow the store's bookkeeping
for ever; and a release notification that leaves a layer unused makes the kernel forget that
layer's directory, which ends its hold on the layer (its memory can then be freed).
"""
from __future__ import annotations

import errno
import os

import pytest

from tests.fixtures.waiting import wait_for

from .conftest import FAST_CONFIG


def drop_dentries() -> None:
    """The kernel drops unused dentries and inodes (it sends FORGET for ours)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_store_nodes_live_as_long_as_the_kernel_holds_them(store_daemon_factory):
    store = store_daemon_factory(FAST_CONFIG)
    ref = "127.0.0.1:9/never/pulled:1"  # layer directories exist for any valid name: no registry access
    for n in range(200):
        os.stat(store.layer_dir(ref, f"sha256:{n:064x}"))
    assert store.stats()["fs"]["nodes"] >= 1 + 1 + 200
    drop_dentries()
    assert wait_for(lambda: store.stats()["fs"]["nodes"] <= 2, timeout=30)
    assert store.stats()["pool"]["pinned_layer_dirs"] == 0


def test_a_release_lets_the_kernel_forget_the_layer_directory(store_daemon_factory, pushed):
    image = pushed["multilayer-esgz"]
    store = store_daemon_factory(FAST_CONFIG)
    layer_dir = store.layer_dir(image.ref, image.layers[0]["digest"])
    assert (layer_dir / "diff" / "etc").is_dir()
    assert store.stats()["pool"]["pinned_layer_dirs"] == 1  # the kernel holds the directory we walked
    with pytest.raises(OSError) as info:
        os.open(layer_dir / "use", os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        os.rmdir(layer_dir)
    assert info.value.errno == errno.ENOENT
    assert wait_for(lambda: store.stats()["pool"]["pinned_layer_dirs"] == 0, timeout=30)
    assert (layer_dir / "diff" / "etc").is_dir()  # still served: looked up (and held) again
