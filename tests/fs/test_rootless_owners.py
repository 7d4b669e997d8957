"""A rootless store's owners: shifted into the user's Podman namespace, or the layer refused.

Through `StoreOperations` over `StoreModel` and the real `ImagePool` on the local reference
layouts (no FUSE, no network): what the kernel would be told for each request.
"""
from __future__ import annotations

import stat

import pytest

from stargz_store import fuse
from stargz_store.daemon.pool import ImagePool
from stargz_store.daemon.pool_config import PoolConfig
from stargz_store.fs.caller import Caller
from stargz_store.fs.errors import LayerUnavailable, PermissionDenied
from stargz_store.fs.fuse_adapter import StoreOperations
from stargz_store.fs.idmap import IdMap, Ownership
from stargz_store.fs.model import StoreModel

from .layout_source import LayoutClient, LayoutResolver
from .paths import PathModel
from .test_model import IMAGES, b64, manifest_of, ref_of

USER = 1001
SUBUID = 100000
NAMESPACE = Ownership(store_uid=USER, uids=IdMap.parse(f"0:{USER}:1,1:{SUBUID}:65536"),
                      gids=IdMap.parse(f"0:{USER}:1,1:{SUBUID}:65536"))
PODMAN = fuse.Context(USER, USER, 7)  # rootless Podman's root, as the store's FUSE requests show it
OTHER = fuse.Context(USER + 1, USER + 1, 8)


@pytest.fixture
def pool(testdata, tmp_path):
    client = LayoutClient({name: testdata / name for name in IMAGES})
    pool = ImagePool(client, LayoutResolver(client, tmp_path / "cache"), PoolConfig(negative_ttl=60),
                     metadata_dir=tmp_path / "pool")
    yield pool
    pool.close()


def walk(ops: StoreOperations, path: str, ctx: fuse.Context):
    """LOOKUP each component as the kernel does; the last attributes."""
    node, attr = 1, None
    for part in path.strip("/").split("/"):
        attr = ops.lookup(ctx, node, part.encode())
        node = attr.nodeid
    return attr


def test_owners_are_shifted_into_the_user_s_namespace(pool, testdata):
    ops = StoreOperations(StoreModel(pool, ownership=NAMESPACE))
    ref = ref_of(testdata, "multilayer-esgz")
    key = manifest_of(testdata, "multilayer-esgz")["layers"][0]["digest"]
    diff = walk(ops, f"/{b64(ref)}/{key}/diff", PODMAN)
    assert (diff.uid, diff.gid) == (USER, USER)  # the image's root is the user, root in the namespace
    assert (ops.getattr(PODMAN, diff.nodeid).uid, ops.getattr(PODMAN, 1).uid) == (USER, USER)
    fh = ops.opendir(PODMAN, diff.nodeid).fh
    listed = [e.attr for e in ops.readdir(PODMAN, diff.nodeid, fh, 0) if e.attr is not None]
    assert listed and {(a.uid, a.gid) for a in listed} == {(USER, USER)}


def test_a_non_root_owner_keeps_its_id_inside_the_namespace(pool, testdata):
    """tricky has uid 1000 (-> SUBUID + 999) but also 3000000: with a map wide enough, all show."""
    wide = Ownership(store_uid=USER, uids=IdMap.parse(f"0:{USER}:1,1:{SUBUID}:4000000"),
                     gids=IdMap.parse(f"0:{USER}:1,1:{SUBUID}:4000000"))
    ops = StoreOperations(StoreModel(pool, ownership=wide))
    root = StoreModel(pool)
    ref = ref_of(testdata, "tricky-esgz")
    key = manifest_of(testdata, "tricky-esgz")["layers"][0]["digest"]
    owner = walk(ops, f"/{b64(ref)}/{key}/diff/owner", PODMAN)
    fh = ops.opendir(PODMAN, owner.nodeid).fh
    shown = {e.name.decode(): e.attr for e in ops.readdir(PODMAN, owner.nodeid, fh, 0) if e.attr is not None}
    own = dict(root.readdir(owner.nodeid, caller=Caller(0)))
    assert set(shown) == set(own) == {"big-ids", "dir-4321-8765", "nobody", "uid1234-gid5678"}
    for name, attr in shown.items():
        original = own[name]
        assert attr.uid == SUBUID + original.uid - 1 and attr.gid == SUBUID + original.gid - 1, name
    assert (shown["uid1234-gid5678"].uid, shown["uid1234-gid5678"].gid) == (SUBUID + 1233, SUBUID + 5677)
    hard = walk(ops, f"/{b64(ref)}/{key}/diff/hard/h1", PODMAN)
    assert (hard.uid, hard.gid) == (SUBUID + 999, SUBUID + 999)  # uid 1000 of the image


def test_a_layer_with_an_owner_outside_the_map_is_refused(pool, testdata, caplog):
    model = PathModel(StoreModel(pool, ownership=NAMESPACE))
    ref = ref_of(testdata, "tricky-esgz")
    key = manifest_of(testdata, "tricky-esgz")["layers"][0]["digest"]
    caller = Caller(USER, USER)
    for name in ("diff", "info", "blob"):
        with pytest.raises(LayerUnavailable, match="uid 3000000 of the layer outside the uid map"):
            model.getattr(f"/{b64(ref)}/{key}/{name}", caller=caller)
    assert [r.message for r in caplog.records if "not serving layer" in r.message][:1]
    assert sum("not serving layer" in r.message for r in caplog.records) == 1  # once per layer
    # A root store (no maps) serves it with the image's own owners.
    assert stat.S_ISDIR(PathModel(StoreModel(pool)).getattr(f"/{b64(ref)}/{key}/diff", caller=Caller(0)).mode)


def test_the_store_s_user_may_resolve_and_notify_others_may_not(pool, testdata):
    ops = StoreOperations(StoreModel(pool, ownership=NAMESPACE))
    ref = ref_of(testdata, "multilayer-esgz")
    key = manifest_of(testdata, "multilayer-esgz")["layers"][1]["digest"]
    with pytest.raises(fuse.FuseError) as refused:
        walk(ops, f"/{b64(ref)}/{key}/diff", OTHER)
    assert refused.value.errno == 13  # EACCES: another user cannot make the store resolve
    assert stat.S_ISDIR(walk(ops, f"/{b64(ref)}/{key}/diff", PODMAN).mode)
    layer = walk(ops, f"/{b64(ref)}/{key}", PODMAN)
    with pytest.raises(fuse.FuseError) as answered:
        ops.create(PODMAN, layer.nodeid, b"use", 0o644, 0)
    assert answered.value.errno == 2  # ENOENT: the use notification was taken
    assert pool.stats()["refcounts"] == {f"{ref} {key}": 1}
    assert Caller(USER, USER).privileged and not Caller(USER + 1, USER).privileged and Caller(0, USER).privileged
    rootful = PathModel(StoreModel(pool))
    with pytest.raises(PermissionDenied):  # a root store trusts uid 0 only
        rootful.create(f"/{b64(ref)}/{key}/use", caller=Caller(USER))
