"""Who may make the store resolve: root only. Others see what is resolved, and leave no trace.

Through `StoreModel` + the real `ImagePool` over local layouts (no FUSE, no network): the
layout client and resolver count every manifest, blob and TOC request a registry would get.
"""
from __future__ import annotations

import stat

import pytest

from stargz_store.fs.caller import ROOT, Caller
from stargz_store.fs.errors import EntryNotFound, PermissionDenied
from stargz_store.fs.inodes import store_nodeid
from tests.fixtures.waiting import wait_for

from .test_model import b64, manifest_of, read_all, ref_of, store  # noqa: F401  (store: the fixture)

NOBODY = Caller(65534)
IMAGE = "multilayer-esgz"


def every_call(model, ref: str, key: str, caller: Caller) -> dict:
    """Each model call that takes a path, on the nodes of one layer of `ref`."""
    base = f"/{b64(ref)}"
    layer = f"{base}/{key}"
    return {
        "getattr ref": lambda: model.getattr(base, caller=caller),
        "getattr manifest": lambda: model.getattr(f"{base}/manifest", caller=caller),
        "getattr layer": lambda: model.getattr(layer, caller=caller),
        "getattr diff": lambda: model.getattr(f"{layer}/diff", caller=caller),
        "getattr diff file": lambda: model.getattr(f"{layer}/diff/etc", caller=caller),
        "getattr info": lambda: model.getattr(f"{layer}/info", caller=caller),
        "getattr blob": lambda: model.getattr(f"{layer}/blob", caller=caller),
        "readdir ref": lambda: model.readdir(base, caller=caller),
        "readdir layer": lambda: model.readdir(layer, caller=caller),
        "readdir diff": lambda: model.readdir(f"{layer}/diff", caller=caller),
        "open config": lambda: model.open(f"{base}/config", caller=caller),
        "check_open info": lambda: model.check_open(f"{layer}/info", caller=caller),
        "read_path blob": lambda: model.read_path(f"{layer}/blob", 0, 10, caller=caller),
        "readlink": lambda: model.readlink(f"{layer}/diff/etc", caller=caller),
        "listxattr": lambda: model.listxattr(f"{layer}/diff", caller=caller),
        "getxattr": lambda: model.getxattr(f"{layer}/diff", "user.x", caller=caller),
        "use": lambda: model.create(f"{layer}/use", caller=caller),
        "release": lambda: model.rmdir(layer, caller=caller),
    }


def test_an_unprivileged_caller_cannot_make_the_store_resolve(store, testdata):
    model, pool, client, resolver = store
    ref = ref_of(testdata, IMAGE)
    key = manifest_of(testdata, IMAGE)["layers"][0]["digest"]
    assert answered(every_call(model, ref, key, NOBODY)) == []
    assert (client.manifest_calls, client.blob_calls, resolver.opened, resolver.tails_fetched) == (0, 0, 0, [])
    # and nothing was recorded for it, anywhere
    assert pool.stats()["pool"]["images"] == 0 and pool.stats()["refcounts"] == {}
    assert (pool.images._pending, pool.images._negative, pool.images._early_tails, len(pool.numbers)) == ({}, {}, {}, 0)
    assert len(model.nodes) == 1 and model._handles == {}  # the root only: no node was made for them


def test_root_still_resolves_and_notifies_without_resolving(store, testdata):
    model, pool, client, resolver = store
    ref = ref_of(testdata, IMAGE)
    key = manifest_of(testdata, IMAGE)["layers"][0]["digest"]
    with pytest.raises(EntryNotFound):  # the notification's answer, as before, and no resolution
        model.create(f"/{b64(ref)}/{key}/use", caller=ROOT)
    assert client.manifest_calls == 0 and pool.stats()["refcounts"] == {f"{ref} {key}": 1}
    assert stat.S_ISDIR(model.getattr(f"/{b64(ref)}/{key}/diff", caller=ROOT).mode)
    assert client.manifest_calls == 1


def test_an_unprivileged_caller_sees_a_resolved_image_and_only_its_layers(store, testdata):
    model, pool, client, resolver = store
    ref = ref_of(testdata, IMAGE)
    layers = manifest_of(testdata, IMAGE)["layers"]
    key = layers[0]["digest"]
    model.getattr(f"/{b64(ref)}/{key}/diff", caller=ROOT)
    # The image's other layers are opened in parallel with this one: counted once all are.
    assert wait_for(lambda: resolver.opened == len(layers), timeout=30)
    manifests, opened = client.manifest_calls, resolver.opened

    calls = every_call(model, ref, key, NOBODY)
    looks = {name: calls[name] for name in calls if name.startswith(("getattr", "readdir", "listxattr"))}
    assert answered(looks) == list(looks)
    # notifications pin layers: root's alone (reading blob, info or config is refused by the kernel,
    # from their 0400 modes, before the model is asked)
    assert answered({name: calls[name] for name in ("use", "release")}) == []
    assert pool.stats()["refcounts"] == {}
    listing = dict(model.readdir(f"/{b64(ref)}/{key}/diff", caller=NOBODY))
    file_name = next(n for n, a in listing.items() if a is not None and a.is_reg)
    assert read_all_as(model, f"/{b64(ref)}/{key}/diff/{file_name}", NOBODY) == read_all(model, f"/{b64(ref)}/{key}/diff/{file_name}")

    # a layer key the image does not list would make the pool re-read a tag's manifest: root only
    pool.config.negative_ttl = 0
    unknown = f"/{b64(ref)}/sha256:{'0' * 64}"
    for path in (unknown, f"{unknown}/diff", f"{unknown}/info"):
        with pytest.raises(PermissionDenied):
            model.getattr(path, caller=NOBODY)
    assert client.manifest_calls == manifests and resolver.opened == opened
    assert model.nodes.get(store_nodeid(("layer", b64(ref), f"sha256:{'0' * 64}"))) is None
    with pytest.raises(EntryNotFound):
        model.getattr(f"{unknown}/diff", caller=ROOT)  # ENOENT, after asking the registry again
    assert client.manifest_calls == manifests + 1


def test_store_node_modes(store, testdata):
    model, *_ = store
    ref = ref_of(testdata, IMAGE)
    key = manifest_of(testdata, IMAGE)["layers"][0]["digest"]
    base, layer = f"/{b64(ref)}", f"/{b64(ref)}/{key}"
    modes = {path: model.getattr(path, caller=ROOT).mode for path in
             ("/", base, f"{base}/manifest", f"{base}/config", layer, f"{layer}/info", f"{layer}/blob")}
    assert modes == {
        "/": stat.S_IFDIR | 0o711,
        base: stat.S_IFDIR | 0o555,
        f"{base}/manifest": stat.S_IFREG | 0o400,
        f"{base}/config": stat.S_IFREG | 0o400,
        layer: stat.S_IFDIR | 0o555,
        f"{layer}/info": stat.S_IFREG | 0o400,
        f"{layer}/blob": stat.S_IFREG | 0o400,
    }


def answered(calls: dict) -> list[str]:
    """The names of the calls that were answered (not refused with PermissionDenied)."""
    out = []
    for name, call in calls.items():
        try:
            call()
        except PermissionDenied:
            continue
        out.append(name)
    return out


def read_all_as(model, path: str, caller: Caller) -> bytes:
    return model.read_path(path, 0, 1 << 30, caller=caller)
