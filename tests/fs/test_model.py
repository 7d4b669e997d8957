"""The whole ALS tree through `StoreModel` + the real `ImagePool` and layers, without FUSE or network.

Reference images come from tests/data OCI layouts (made by tools we did not write); the expected
trees are tests/data/expected-*.json `overlay_diff`.
"""
from __future__ import annotations

import base64
import gc
import hashlib
import json
import stat
import weakref

import pytest

from stargz_store.daemon.pool import ImagePool, PoolConfig
from stargz_store.layer import trees
from stargz_store.fs.caller import ROOT
from stargz_store.fs.errors import (
    EntryNotFound,
    InvalidName,
    IsADirectory,
    NoSuchAttribute,
    NotASymlink,
    ReadOnly,
)
from stargz_store.fs.model import StoreModel

from tests.fixtures.waiting import wait_for

from .layout_source import LayoutClient, LayoutResolver, blob_file
from .overlay_check import compare_overlay, snapshot_model
from .paths import PathModel

HOST = "127.0.0.1:5999"
IMAGES = {
    "tricky-esgz": ("tricky", "esgz"),
    "tricky-zstdchunked": ("tricky", "zstdchunked"),
    "multilayer-esgz": ("multilayer", "esgz"),
    "multilayer-zstdchunked": ("multilayer", "zstdchunked"),
    "podman-zstdchunked": ("podman-zstdchunked", None),
    "multilayer-orig": ("multilayer", "orig"),
}


def b64(ref: str) -> str:
    return base64.b64encode(ref.encode()).decode()


def layout_tag(layout) -> str:
    index = json.loads((layout / "index.json").read_text())
    return index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]


@pytest.fixture
def store(testdata, tmp_path):
    client = LayoutClient({name: testdata / name for name in IMAGES})
    resolver = LayoutResolver(client, tmp_path / "cache")
    pool = ImagePool(client, resolver, PoolConfig(negative_ttl=60, release_grace=3600), metadata_dir=tmp_path / "pool")
    model = PathModel(StoreModel(pool))
    yield model, pool, client, resolver
    pool.close()


def ref_of(testdata, name: str) -> str:
    return f"{HOST}/{name}:{layout_tag(testdata / name)}"


def manifest_of(testdata, name: str) -> dict:
    layout = testdata / name
    index = json.loads((layout / "index.json").read_text())
    return json.loads(blob_file(layout, index["manifests"][0]["digest"]).read_text())


def config_of(testdata, name: str) -> dict:
    layout = testdata / name
    return json.loads(blob_file(layout, manifest_of(testdata, name)["config"]["digest"]).read_text())


def read_all(model: PathModel, path: str) -> bytes:
    fh = model.open(path, caller=ROOT)
    try:
        out = bytearray()
        while True:
            piece = model.read(fh, len(out), 1 << 20)
            if not piece:
                return bytes(out)
            out += piece
    finally:
        model.release(fh)


@pytest.mark.parametrize("name", ["tricky-esgz", "tricky-zstdchunked", "multilayer-esgz", "multilayer-zstdchunked", "podman-zstdchunked"])
def test_diff_matches_expected_tree(store, testdata, name):
    model, *_ = store
    expected = json.loads((testdata / f"expected-{IMAGES[name][0]}.json").read_text())
    ref = ref_of(testdata, name)
    layers = manifest_of(testdata, name)["layers"]
    assert len(layers) == len(expected["source_layers"])
    for desc, want in zip(layers, expected["source_layers"]):
        snap = snapshot_model(model, f"/{b64(ref)}/{desc['digest']}/diff")
        problems = compare_overlay(snap, want)
        assert not problems, f"layer {want['index']}: {len(problems)} differences:\n" + "\n".join(problems[:30])


@pytest.mark.parametrize("name", ["multilayer-esgz", "podman-zstdchunked", "tricky-zstdchunked"])
def test_info_for_both_keys_and_blob(store, testdata, name):
    model, *_ = store
    ref = ref_of(testdata, name)
    manifest, config = manifest_of(testdata, name), config_of(testdata, name)
    for i, desc in enumerate(manifest["layers"]):
        blob_key = desc["digest"]
        base = f"/{b64(ref)}/{blob_key}"
        old = json.loads(read_all(model, f"{base}/info"))
        assert read_all(model, f"{base}/info").endswith(b"}\n")
        assert old["compressed-diff-digest"] == blob_key
        assert old["diff-digest"] == config["rootfs"]["diff_ids"][i]
        assert old["compressed-size"] == desc["size"]
        want_compression = 4 if "zstd" in desc["mediaType"] else 2
        assert old["compression"] == want_compression
        annotations = desc.get("annotations") or {}
        size = annotations.get("io.containers.estargz.uncompressed-size")
        assert old["diff-size"] == (int(size) if size else 0)  # 0, not -1: Podman 4.3 refuses negative sizes
        assert isinstance(old["uidset"], list) and isinstance(old["gidset"], list)
        assert "toc-digest" not in old

        # podman 4.3's zstd:chunked only has the old annotation name; its value is still the TOC digest
        toc_key = (annotations.get("containerd.io/snapshot/stargz/toc.digest")
                   or annotations.get("io.github.containers.zstd-chunked.manifest-checksum")
                   or annotations["io.containers.zstd-chunked.manifest-checksum"])
        new = json.loads(read_all(model, f"/{b64(ref)}/{toc_key}/info"))
        assert new["toc-digest"] == toc_key
        assert new["flags"] == {"expected-layer-diffid": config["rootfs"]["diff_ids"][i]}
        assert "diff-digest" not in new and "compressed-diff-digest" not in new
        assert new["compressed-size"] == desc["size"] and new["compression"] == want_compression
        assert new["diff-size"] == (int(size) if size else -1)

        # Both keys show the same tree (same inode numbers: one layer behind both).
        a, b = model.getattr(f"{base}/diff", caller=ROOT), model.getattr(f"/{b64(ref)}/{toc_key}/diff", caller=ROOT)
        assert a == b and stat.S_ISDIR(a.mode)

        blob = read_all(model, f"{base}/blob")
        assert model.getattr(f"{base}/blob", caller=ROOT).size == desc["size"] == len(blob)
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == blob_key


def test_tricky_uidset(store, testdata):
    model, *_ = store
    ref = ref_of(testdata, "tricky-esgz")
    desc = manifest_of(testdata, "tricky-esgz")["layers"][0]
    info = json.loads(read_all(model, f"/{b64(ref)}/{desc['digest']}/info"))
    expected = json.loads((testdata / "expected-tricky.json").read_text())["source_layers"][0]["entries"]
    assert set(info["uidset"]) >= {e["uid"] for e in expected.values()}
    assert 3000000 in info["uidset"]


def test_plain_layer_and_unknown_names_are_enoent(store, testdata):
    model, pool, client, _ = store
    ref = ref_of(testdata, "multilayer-orig")
    desc = manifest_of(testdata, "multilayer-orig")["layers"][0]
    with pytest.raises(EntryNotFound):
        model.getattr(f"/{b64(ref)}/{desc['digest']}/diff", caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.getattr(f"/{b64(ref)}/{desc['digest']}/info", caller=ROOT)
    esgz = ref_of(testdata, "multilayer-esgz")
    with pytest.raises(EntryNotFound):
        model.getattr(f"/{b64(esgz)}/sha256:{'0' * 64}/diff", caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.getattr(f"/{b64(HOST + '/nosuchrepo:1')}/sha256:{'0' * 64}/diff", caller=ROOT)
    good = manifest_of(testdata, "multilayer-esgz")["layers"][0]["digest"]
    with pytest.raises(EntryNotFound):
        model.getattr(f"/{b64(esgz)}/{good}/other", caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.getattr(f"/{b64(esgz)}/{good}/use", caller=ROOT)


def test_invalid_names_are_einval(store):
    model, *_ = store
    for path in ("/not-base64!", "/" + b64("UPPER/Case::bad"), "/" + b64("http://x/y:1"),
                 f"/{b64(HOST + '/repo:1')}/not-a-digest", f"/{b64(HOST + '/repo:1')}/sha256:abc/diff"):
        with pytest.raises(InvalidName):
            model.getattr(path, caller=ROOT)


def test_negative_answers_are_cached(store, testdata):
    model, pool, client, resolver = store
    path = f"/{b64(HOST + '/nosuchrepo:1')}/sha256:{'0' * 64}/diff"
    for _ in range(5):
        with pytest.raises(EntryNotFound):
            model.getattr(path, caller=ROOT)
    assert client.manifest_calls == 1
    ref = ref_of(testdata, "multilayer-orig")
    desc = manifest_of(testdata, "multilayer-orig")["layers"][1]
    for _ in range(5):
        with pytest.raises(EntryNotFound):
            model.getattr(f"/{b64(ref)}/{desc['digest']}/diff", caller=ROOT)
    # one image resolution (all three layers tried once, in parallel), no retries
    assert wait_for(lambda: pool.stats()["pool"]["layer_open_failures"] >= 3)
    for _ in range(3):
        with pytest.raises(EntryNotFound):
            model.getattr(f"/{b64(ref)}/{desc['digest']}/diff", caller=ROOT)
    assert client.manifest_calls == 2 and resolver.opened == 3
    assert pool.stats()["pool"]["negative_hits"] >= 8


def test_image_resolved_once_with_all_layers(store, testdata):
    model, pool, client, resolver = store
    ref = ref_of(testdata, "multilayer-esgz")
    layers = manifest_of(testdata, "multilayer-esgz")["layers"]
    model.getattr(f"/{b64(ref)}/{layers[0]['digest']}/diff", caller=ROOT)
    for desc in layers:
        model.getattr(f"/{b64(ref)}/{desc['digest']}/diff", caller=ROOT)
    assert client.manifest_calls == 1 and resolver.opened == len(layers)
    listing = [n for n, _ in model.readdir(f"/{b64(ref)}", caller=ROOT)]
    assert "manifest" in listing and "config" in listing and layers[1]["digest"] in listing
    assert json.loads(read_all(model, f"/{b64(ref)}/manifest")) == manifest_of(testdata, "multilayer-esgz")
    assert json.loads(read_all(model, f"/{b64(ref)}/config")) == config_of(testdata, "multilayer-esgz")
    assert [n for n, _ in model.readdir("/", caller=ROOT)] == [b64(ref)]
    assert [n for n, _ in model.readdir(f"/{b64(ref)}/{layers[0]['digest']}", caller=ROOT)] == ["blob", "diff", "info"]


def test_use_and_release_notifications(store, testdata):
    model, pool, *_ = store
    ref = ref_of(testdata, "multilayer-esgz")
    key = manifest_of(testdata, "multilayer-esgz")["layers"][0]["digest"]
    layer_dir = f"/{b64(ref)}/{key}"
    # use works without any resolution, and answers ENOENT
    with pytest.raises(EntryNotFound):
        model.create(f"{layer_dir}/use", caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.create(f"{layer_dir}/use", caller=ROOT)
    assert pool.stats()["refcounts"] == {f"{ref} {key}": 2}
    for _ in range(3):  # releases beyond the count (e.g. after a restart) are tolerated
        with pytest.raises(EntryNotFound):
            model.rmdir(layer_dir, caller=ROOT)
    st = pool.stats()
    assert st["refcounts"] == {} and st["pool"]["untracked_releases"] == 1
    with pytest.raises(ReadOnly):
        model.create(f"{layer_dir}/diff/newfile", caller=ROOT)
    with pytest.raises(ReadOnly):
        model.rmdir(f"{layer_dir}/diff/etc", caller=ROOT)
    with pytest.raises(ReadOnly):
        model.open(f"{layer_dir}/info", 1, caller=ROOT)  # O_WRONLY


def test_unused_layers_are_closed_and_reopened(store, testdata):
    model, pool, client, resolver = store
    ref = ref_of(testdata, "multilayer-esgz")
    layers = manifest_of(testdata, "multilayer-esgz")["layers"]
    used, unused = layers[0]["digest"], layers[1]["digest"]
    for desc in layers:  # all three open before reaping
        model.getattr(f"/{b64(ref)}/{desc['digest']}/diff", caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.create(f"/{b64(ref)}/{used}/use", caller=ROOT)
    before = model.getattr(f"/{b64(ref)}/{unused}/diff/etc", caller=ROOT)
    fh = model.open(f"/{b64(ref)}/{layers[2]['digest']}/blob", caller=ROOT)  # an open handle pins its layer
    model.forget_all()  # the kernel drops its caches: no layer directory is held any more
    closed = pool.handles.trim(keep=0)  # close every idle layer now
    assert closed == 1  # only the unused, unpinned one
    assert pool.stats()["pool"]["open_layers"] == 2
    model.release(fh)
    after = model.getattr(f"/{b64(ref)}/{unused}/diff/etc", caller=ROOT)  # reopened on demand, same inode
    assert after == before and resolver.opened == len(layers) + 1
    assert client.manifest_calls == 1


def test_a_closed_layer_frees_its_tree(store, testdata):
    """Built trees are frozen out of the cyclic GC (layer.trees.building_trees); reaping must still
    free a closed layer's tree, also when something it held was part of a reference cycle."""
    model, pool, client, resolver = store
    ref = ref_of(testdata, "multilayer-esgz")
    layers = manifest_of(testdata, "multilayer-esgz")["layers"]
    digest = layers[1]["digest"]
    model.getattr(f"/{b64(ref)}/{digest}/diff/etc", caller=ROOT)
    # Quiesce what could keep the tree alive past the reap: the image's other layers are opened
    # in the background, and while any TOC build runs (here, or a closed pool's thread of an
    # earlier test) the reaper defers its collection (layer.trees.release_frozen).
    for other in layers:
        model.getattr(f"/{b64(ref)}/{other['digest']}/diff", caller=ROOT)
    assert wait_for(lambda: trees.builds_running() == 0)
    served = pool.layer(ref, digest)
    tree = weakref.ref(served.layer.toc)
    cycle: list = [served.layer.toc]
    cycle.append(cycle)  # the tree now also hangs off a cycle, which refcounting alone never frees
    served.layer.cycle = cycle
    del served, cycle
    gc.freeze()  # as after a build: everything alive so far is out of the GC's sight
    model.forget_all()
    assert pool.handles.trim(keep=0) >= 1
    assert tree() is None


def test_reads_by_path_match_reads_by_handle(store, testdata):
    """With no_open the kernel sends reads without an OPEN: `read_path` finds the file itself."""
    model, *_ = store
    ref = ref_of(testdata, "tricky-esgz")
    key = manifest_of(testdata, "tricky-esgz")["layers"][0]["digest"]
    layer_dir = f"/{b64(ref)}/{key}"
    for name, _ in model.readdir(f"{layer_dir}/diff", caller=ROOT):
        path = f"{layer_dir}/diff/{name}"
        if not stat.S_ISREG(model.getattr(path, caller=ROOT).mode):
            continue
        fh = model.open(path, caller=ROOT)
        try:
            assert model.read_path(path, 0, 1 << 20, caller=ROOT) == model.read(fh, 0, 1 << 20)
            assert model.read_path(path, 3, 5, caller=ROOT) == model.read(fh, 3, 5)
        finally:
            model.release(fh)
    info = model.read_path(f"{layer_dir}/info", 0, 1 << 20, caller=ROOT)
    assert json.loads(info)
    with pytest.raises(IsADirectory):
        model.read_path(f"{layer_dir}/diff", 0, 10, caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.read_path(f"{layer_dir}/diff/no-such-file", 0, 10, caller=ROOT)


def test_other_model_errors(store, testdata):
    model, *_ = store
    ref = ref_of(testdata, "tricky-esgz")
    key = manifest_of(testdata, "tricky-esgz")["layers"][0]["digest"]
    diff = f"/{b64(ref)}/{key}/diff"
    with pytest.raises(IsADirectory):
        model.open(diff, caller=ROOT)
    with pytest.raises(NotASymlink):
        model.readlink(f"{diff}/files", caller=ROOT)
    with pytest.raises(NoSuchAttribute):
        model.getxattr(f"{diff}/files", "user.nothing", caller=ROOT)
    assert model.statfs()["f_bsize"] == 4096


def test_metadata_survives_a_restart(testdata, tmp_path):
    """A new pool on the same root serves a known ref without asking the registry for the manifest."""
    ref = ref_of(testdata, "multilayer-esgz")
    key = manifest_of(testdata, "multilayer-esgz")["layers"][2]["digest"]
    before = None
    for run in range(2):
        client = LayoutClient({"multilayer-esgz": testdata / "multilayer-esgz"})
        pool = ImagePool(client, LayoutResolver(client, tmp_path / "cache"), metadata_dir=tmp_path / "pool")
        try:
            attr = PathModel(StoreModel(pool)).getattr(f"/{b64(ref)}/{key}/diff/add", caller=ROOT)
            assert before is None or attr == before
            before = attr
            assert client.manifest_calls == (1 if run == 0 else 0)
            assert pool.stats()["pool"]["image_loads_from_disk"] == run
        finally:
            pool.close()


def test_moved_tag_adds_new_layers_and_keeps_old_ones(testdata, tmp_path):
    client = LayoutClient({"moving": testdata / "multilayer-esgz"})
    resolver = LayoutResolver(client, tmp_path / "cache")
    pool = ImagePool(client, resolver, PoolConfig(negative_ttl=0), metadata_dir=tmp_path / "pool")
    model = PathModel(StoreModel(pool))
    try:
        ref = f"{HOST}/moving:esgz"  # both layouts below carry the tag "esgz"
        old_key = manifest_of(testdata, "multilayer-esgz")["layers"][0]["digest"]
        new_key = manifest_of(testdata, "tricky-esgz")["layers"][0]["digest"]
        model.getattr(f"/{b64(ref)}/{old_key}/diff/etc", caller=ROOT)
        client.layouts["moving"] = testdata / "tricky-esgz"  # the tag is pushed again
        assert stat.S_ISREG(model.getattr(f"/{b64(ref)}/{new_key}/diff/files/hello.txt", caller=ROOT).mode)
        assert client.manifest_calls == 2
        model.getattr(f"/{b64(ref)}/{old_key}/diff/etc", caller=ROOT)  # still served for containers of the old image
        assert json.loads(read_all(model, f"/{b64(ref)}/manifest")) == manifest_of(testdata, "tricky-esgz")
        old_info = json.loads(read_all(model, f"/{b64(ref)}/{old_key}/info"))
        assert old_info["diff-digest"] == config_of(testdata, "multilayer-esgz")["rootfs"]["diff_ids"][0]
    finally:
        pool.close()


def test_pool_symlink_for_readiness_probes(testdata, tmp_path):
    client = LayoutClient({})
    pool = ImagePool(client, LayoutResolver(client, tmp_path / "cache"))
    try:
        model = PathModel(StoreModel(pool, pool_target="/var/lib/stargz-store/pool"))
        attr = model.getattr("/pool", caller=ROOT)
        assert stat.S_ISLNK(attr.mode) and attr.size == len("/var/lib/stargz-store/pool")
        assert model.readlink("/pool", caller=ROOT) == "/var/lib/stargz-store/pool"
        assert [n for n, _ in model.readdir("/", caller=ROOT)] == ["pool"]
        with pytest.raises(InvalidName):
            PathModel(StoreModel(pool)).getattr("/pool", caller=ROOT)  # without a target it is just an invalid ref name
    finally:
        pool.close()


def test_log_file_access_logs_each_file_once(store, testdata, caplog):
    _, pool, *_ = store
    model = PathModel(StoreModel(pool, log_file_access=True))
    ref = ref_of(testdata, "multilayer-esgz")
    key = manifest_of(testdata, "multilayer-esgz")["layers"][0]["digest"]
    with caplog.at_level("DEBUG", logger="stargz_store.fs.model"):
        for _ in range(2):
            read_all(model, f"/{b64(ref)}/{key}/diff/etc/config.txt")
    lines = [r.getMessage() for r in caplog.records if "first access" in r.getMessage()]
    assert len(lines) == 1 and "etc/config.txt" in lines[0]
