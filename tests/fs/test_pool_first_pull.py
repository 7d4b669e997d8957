"""The pool's first pull of an image: what it asks for at the same time instead of in a row.

On a 20 ms link each request that waits for another costs a round trip, so the pool asks for the
tail of the layer podman looks up first while the manifest is on its way, and for the layers'
TOCs while the config is. These tests hold one request back and check the other went out
meanwhile, and that a guess that went wrong (another size, bad bytes, a TOC digest that names no
blob, a config that never comes) changes nothing but the timing.
"""
from __future__ import annotations

import json

import pytest

from stargz_store.daemon.pool import ImagePool, PoolConfig
from stargz_store.fs.caller import ROOT
from stargz_store.fs.errors import EntryNotFound
from stargz_store.fs.model import StoreModel
from stargz_store.registry.errors import NotFoundError

from tests.fixtures.waiting import wait_for

from .layout_source import LayoutClient, LayoutResolver
from .paths import PathModel
from .test_model import HOST, b64, config_of, layout_tag, manifest_of, read_all

NAME = "multilayer-esgz"


class GatedClient(LayoutClient):
    """Holds the manifest until `manifest_gate()` is true, the config until `config_gate()` is
    (or `wait_for`'s bound passes), and remembers whether each gate opened before that."""

    def __init__(self, layouts, manifest_gate=lambda: True, config_gate=lambda: True, config_error=None):
        super().__init__(layouts)
        self.manifest_gate, self.config_gate, self.config_error = manifest_gate, config_gate, config_error
        self.gates_opened: dict[str, bool] = {}

    def get_manifest(self, ref, platform=None):
        self.gates_opened["manifest"] = wait_for(self.manifest_gate)
        return super().get_manifest(ref, platform)

    def get_blob(self, ref, digest):
        self.gates_opened["config"] = wait_for(self.config_gate)
        if self.config_error is not None:
            raise self.config_error
        return super().get_blob(ref, digest)


@pytest.fixture
def setup(testdata, tmp_path):
    made = []

    def make(**client_kwargs):
        client = GatedClient({NAME: testdata / NAME}, **client_kwargs)
        resolver = LayoutResolver(client, tmp_path / "cache")
        pool = ImagePool(client, resolver, PoolConfig(negative_ttl=60, release_grace=3600), metadata_dir=tmp_path / "pool")
        made.append(pool)
        return PathModel(StoreModel(pool)), pool, client, resolver

    yield make
    for pool in made:
        pool.close()


def ref_and_layers(testdata):
    return f"{HOST}/{NAME}:{layout_tag(testdata / NAME)}", manifest_of(testdata, NAME)["layers"]


def tail_was_read(resolver: LayoutResolver, digest: str) -> bool:
    """Did the layer's own source serve a read of the blob's last `tail_size` bytes?"""
    tail = resolver.inner.config.tail_size
    for source in resolver.sources:
        if source.path.name == digest.split(":")[1]:
            return any(off + length == source.size and length == min(tail, source.size) for off, length in source.log)
    raise AssertionError(f"layer {digest} was never opened")


@pytest.mark.parametrize("ref_dir_first", [True, False], ids=["ref-dir-then-layer", "layer-only"])
def test_first_layer_tail_is_fetched_while_the_manifest_is(setup, testdata, ref_dir_first):
    """Podman looks up the ref directory (which starts the resolve) and then the layer."""
    ref, layers = ref_and_layers(testdata)
    first = layers[1]["digest"]
    model, pool, client, resolver = setup(manifest_gate=lambda: first in resolver_box[0].tails_fetched)
    resolver_box = [resolver]
    if ref_dir_first:
        model.getattr(f"/{b64(ref)}", caller=ROOT)
    attr = model.getattr(f"/{b64(ref)}/{first}/diff", caller=ROOT)
    assert attr.mode and client.gates_opened["manifest"], "the manifest request waited in vain for the tail request"
    assert resolver.tails_fetched == [first]
    assert not tail_was_read(resolver, first)  # the early bytes made the TOC
    for d in layers:
        model.getattr(f"/{b64(ref)}/{d['digest']}/diff", caller=ROOT)
    assert all(tail_was_read(resolver, d["digest"]) for d in layers if d["digest"] != first)
    assert pool.images._early_tails == {}


def test_layers_open_while_the_config_is_fetched(setup, testdata):
    ref, layers = ref_and_layers(testdata)
    model, pool, client, resolver = setup(config_gate=lambda: resolver_box[0].opened == len(layers))
    resolver_box = [resolver]
    info = json.loads(read_all(model, f"/{b64(ref)}/{layers[0]['digest']}/info"))
    assert client.gates_opened["config"], "the config request waited in vain for the layers to open"
    assert info["diff-digest"] == config_of(testdata, NAME)["rootfs"]["diff_ids"][0]


def test_a_config_that_never_comes_fails_the_lookup_and_closes_the_layers(setup, testdata):
    ref, layers = ref_and_layers(testdata)
    model, pool, client, resolver = setup(
        config_gate=lambda: resolver_box[0].opened == len(layers), config_error=NotFoundError("config blob unknown"))
    resolver_box = [resolver]
    with pytest.raises(EntryNotFound, match="config blob unknown"):
        model.getattr(f"/{b64(ref)}/{layers[0]['digest']}/diff", caller=ROOT)
    assert resolver.opened == len(layers)
    assert wait_for(lambda: all(s._fd < 0 for s in resolver.sources)), "opened layers were left open"
    assert pool.stats()["pool"]["image_resolve_failures"] == 1


@pytest.mark.parametrize("spoil", ["size", "bytes", "error"])
def test_an_early_tail_that_does_not_fit_is_not_trusted(setup, testdata, spoil):
    ref, layers = ref_and_layers(testdata)
    first = layers[0]["digest"]
    model, pool, client, resolver = setup()
    real_fetch = resolver.fetch_tail

    def spoiled(r, digest):
        start, total, data = real_fetch(r, digest)
        if spoil == "size":
            return start + 1, total + 1, data
        if spoil == "bytes":
            return start, total, bytes(b ^ 0xFF for b in data)
        raise NotFoundError("gone")

    resolver.fetch_tail = spoiled
    listing = model.readdir(f"/{b64(ref)}/{first}/diff", caller=ROOT)
    assert listing
    assert tail_was_read(resolver, first)  # fetched again through the layer's own source
    assert pool.stats()["pool"]["layer_open_failures"] == 0


def test_a_toc_digest_key_guess_is_dropped(setup, testdata):
    """Podman 5.1+ looks layers up by TOC digest: the early tail of that 'blob' is a 404."""
    ref, layers = ref_and_layers(testdata)
    toc_key = layers[0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
    model, pool, client, resolver = setup()
    assert model.getattr(f"/{b64(ref)}/{toc_key}/diff", caller=ROOT).mode
    assert resolver.tails_fetched == [toc_key]
    assert tail_was_read(resolver, layers[0]["digest"])
    assert pool.images._early_tails == {}


def test_no_early_tail_for_an_image_known_on_disk(testdata, tmp_path):
    ref, layers = ref_and_layers(testdata)
    for run in range(2):
        client = LayoutClient({NAME: testdata / NAME})
        resolver = LayoutResolver(client, tmp_path / "cache")
        pool = ImagePool(client, resolver, metadata_dir=tmp_path / "pool")
        try:
            PathModel(StoreModel(pool)).getattr(f"/{b64(ref)}/{layers[0]['digest']}/diff", caller=ROOT)
            assert resolver.tails_fetched == ([layers[0]["digest"]] if run == 0 else [])
        finally:
            pool.close()
