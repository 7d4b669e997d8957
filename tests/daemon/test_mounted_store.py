"""The mounted store (real FUSE, real registry) seen through ordinary system calls."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import pytest

from tests.fs.overlay_check import compare_overlay, snapshot_mount

LAZY = ["tricky-esgz", "tricky-zstdchunked", "multilayer-esgz", "multilayer-zstdchunked", "podman-zstdchunked"]


def toc_key(desc: dict) -> str:
    a = desc.get("annotations") or {}
    return (a.get("containerd.io/snapshot/stargz/toc.digest")
            or a.get("io.github.containers.zstd-chunked.manifest-checksum")
            or a["io.containers.zstd-chunked.manifest-checksum"])


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


@pytest.mark.parametrize("name", LAZY)
def test_diff_equals_expected_tree(shared_store, pushed, name):
    image = pushed[name]
    for desc, want in zip(image.layers, image.expected["source_layers"], strict=True):
        layer_dir = shared_store.layer_dir(image.ref, desc["digest"])
        # what containers/storage checks first, in its order
        for part in ("diff", "info", "blob"):
            os.stat(layer_dir / part)
        problems = compare_overlay(snapshot_mount(layer_dir / "diff"), want)
        assert not problems, f"layer {want['index']}: {len(problems)} differences:\n" + "\n".join(problems[:30])


@pytest.mark.parametrize("name", ["multilayer-esgz", "tricky-zstdchunked", "podman-zstdchunked"])
def test_info_blob_and_both_keys(shared_store, pushed, name):
    image = pushed[name]
    for i, desc in enumerate(image.layers):
        diff_id = image.config["rootfs"]["diff_ids"][i]
        compression = 4 if "zstd" in desc["mediaType"] else 2
        old_dir = shared_store.layer_dir(image.ref, desc["digest"])
        raw = (old_dir / "info").read_bytes()
        assert raw.endswith(b"\n")
        old = json.loads(raw)
        assert old["compressed-diff-digest"] == desc["digest"] and old["diff-digest"] == diff_id
        assert old["compressed-size"] == desc["size"] and old["compression"] == compression
        assert isinstance(old["diff-size"], int) and old["uidset"] and old["gidset"]

        new_dir = shared_store.layer_dir(image.ref, toc_key(desc))
        new = json.loads((new_dir / "info").read_bytes())
        assert new["toc-digest"] == toc_key(desc)
        assert new["flags"]["expected-layer-diffid"] == diff_id
        assert "diff-digest" not in new and "compressed-diff-digest" not in new
        assert new["compression"] == compression and new["compressed-size"] == desc["size"]
        assert sorted(os.listdir(new_dir / "diff")) == sorted(os.listdir(old_dir / "diff"))

        st = os.stat(old_dir / "blob")
        assert st.st_size == desc["size"] and stat.S_IMODE(st.st_mode) == 0o400
        blob = (old_dir / "blob").read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]


def test_use_and_rmdir_notifications(shared_store, pushed):
    image = pushed["multilayer-esgz"]
    key = image.layers[1]["digest"]
    layer_dir = shared_store.layer_dir(image.ref, key)
    for _ in range(2):  # what Go's os.Create does
        assert errno_of(os.open, layer_dir / "use", os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644) == errno.ENOENT
    assert shared_store.stats()["refcounts"].get(f"{image.ref} {key}") == 2
    assert errno_of(os.rmdir, layer_dir) == errno.ENOENT
    assert shared_store.stats()["refcounts"].get(f"{image.ref} {key}") == 1
    assert errno_of(os.rmdir, layer_dir) == errno.ENOENT
    assert errno_of(os.rmdir, layer_dir) == errno.ENOENT  # unknown release: tolerated
    assert f"{image.ref} {key}" not in shared_store.stats()["refcounts"]
    assert os.path.isdir(layer_dir / "diff")  # still served


def test_other_writes_are_refused(shared_store, pushed):
    image = pushed["multilayer-esgz"]
    diff = shared_store.layer_dir(image.ref, image.layers[0]["digest"]) / "diff"
    assert errno_of(os.open, diff / "etc" / "new", os.O_CREAT | os.O_WRONLY, 0o644) == errno.EROFS
    assert errno_of(os.mkdir, diff / "newdir") == errno.EROFS
    assert errno_of(os.unlink, diff / "etc" / "config.txt") == errno.EROFS
    # With FUSE passthrough every open reaches the store, which refuses one for writing (EROFS).
    # Without it the kernel sends no OPEN once the store has said it needs none (no_open), so
    # opening an existing file for writing succeeds; every write, truncation or attribute change
    # is EROFS.
    before = (diff / "etc" / "config.txt").read_bytes()
    if not _no_open(shared_store):
        assert errno_of(os.open, diff / "etc" / "config.txt", os.O_WRONLY) == errno.EROFS
    else:
        fd = os.open(diff / "etc" / "config.txt", os.O_WRONLY)
        try:
            assert errno_of(os.write, fd, b"changed") == errno.EROFS
            assert errno_of(os.ftruncate, fd, 0) == errno.EROFS
        finally:
            os.close(fd)
    assert errno_of(os.open, diff / "etc" / "config.txt", os.O_WRONLY | os.O_TRUNC) == errno.EROFS
    assert (diff / "etc" / "config.txt").read_bytes() == before
    assert errno_of(os.chmod, diff / "etc" / "config.txt", 0o600) == errno.EROFS
    assert errno_of(os.rmdir, diff / "etc") == errno.EROFS


def _no_open(store) -> bool:
    """Whether the connection negotiated no_open (the daemon logs it at INIT)."""
    return "no_open on" in store.log_path.read_text(errors="replace")


def test_unknown_and_invalid_names(shared_store, pushed, registry):
    mnt = shared_store.mountpoint
    image = pushed["multilayer-esgz"]
    missing = "sha256:" + "0" * 64
    assert errno_of(os.stat, shared_store.layer_dir(image.ref, missing) / "diff") == errno.ENOENT
    unknown_ref = f"{registry.host}/no/such-repo:1"
    for _ in range(4):
        assert errno_of(os.stat, shared_store.layer_dir(unknown_ref, missing) / "diff") == errno.ENOENT
    assert errno_of(os.stat, mnt / "!!notbase64") == errno.EINVAL
    assert errno_of(os.stat, shared_store.ref_dir("Not A Reference")) == errno.EINVAL
    assert errno_of(os.stat, shared_store.ref_dir(image.ref) / "not-a-digest") == errno.EINVAL
    assert errno_of(os.stat, shared_store.layer_dir(image.ref, image.layers[0]["digest"]) / "nothing") == errno.ENOENT
    stats = shared_store.stats()["pool"]
    assert stats["negative_hits"] >= 3  # the retries of the unknown ref never reached the registry


def test_plain_gzip_layers_decline_with_enoent(shared_store, pushed):
    image = pushed["multilayer-orig"]
    for desc in image.layers:
        layer_dir = shared_store.layer_dir(image.ref, desc["digest"])
        assert errno_of(os.stat, layer_dir / "diff") == errno.ENOENT
        assert errno_of(os.stat, layer_dir / "info") == errno.ENOENT
    # the notifications still answer as containers/storage expects
    assert errno_of(os.open, layer_dir / "use", os.O_CREAT | os.O_RDWR, 0o644) == errno.ENOENT


def test_ref_directory_for_humans_and_statfs(shared_store, pushed):
    image = pushed["podman-zstdchunked"]
    ref_dir = shared_store.ref_dir(image.ref)
    assert json.loads((ref_dir / "manifest").read_bytes()) == image.manifest
    assert json.loads((ref_dir / "config").read_bytes()) == image.config
    names = os.listdir(ref_dir)
    assert {"manifest", "config", image.layers[0]["digest"]} <= set(names)
    assert ref_dir.name in os.listdir(shared_store.mountpoint)
    st = os.statvfs(ref_dir)
    assert st.f_bsize == 4096 and st.f_namemax == 255


def test_hardlinks_share_one_inode_through_the_mount(shared_store, pushed):
    image = pushed["tricky-esgz"]
    diff = shared_store.layer_dir(image.ref, image.layers[0]["digest"]) / "diff"
    for group in image.expected["source_layers"][0]["hardlink_groups"]:
        stats = [os.lstat(diff / p) for p in group]
        assert len({s.st_ino for s in stats}) == 1
        assert all(s.st_nlink == len(group) for s in stats)


def test_pool_link_is_the_readiness_probe(shared_store):
    link = shared_store.mountpoint / "pool"
    assert os.readlink(link) == str(shared_store.root / "pool")
    os.listdir(link)  # what the Go store's scripts run to wait for the mount


def test_the_mounts_readahead_window_is_raised(shared_store):
    """`read_ahead_kb` (4096 by default) on the mount's backing device, set once the kernel's INIT
    was answered (INIT itself would lower it again to the kernel's 128 KiB)."""
    from stargz_store.fuse.mount import mount_device

    device = mount_device(str(shared_store.mountpoint))
    assert device is not None
    assert open(f"/sys/class/bdi/{device}/read_ahead_kb").read().strip() == "4096"
