"""How long the pool keeps what: layer handles and the idle LRU, images and their kept metadata,
layer numbers across restarts, and the filesystem's own node table.

Through `StoreModel` (asked as the kernel asks it, `PathModel`) + the real `ImagePool` over local
layouts: no FUSE, no network.
"""
from __future__ import annotations

import gc
import json
import stat
import weakref

import pytest

from stargz_store.daemon.pool import ImagePool, PoolConfig
from stargz_store.fs.caller import ROOT
from stargz_store.fs.errors import EntryNotFound
from stargz_store.fs.model import StoreModel

from tests.fixtures.waiting import wait_for

from .layout_source import LayoutClient, LayoutResolver
from .paths import PathModel
from .test_model import HOST, IMAGES, b64, manifest_of, read_all, ref_of

ESGZ, ZSTD = "multilayer-esgz", "tricky-zstdchunked"


@pytest.fixture
def make(testdata, tmp_path):
    """`make(**pool_config)` -> (model, pool, resolver) on one data root; the pools made are closed."""
    made: list[ImagePool] = []

    def build(**config):
        client = LayoutClient({name: testdata / name for name in IMAGES})
        resolver = LayoutResolver(client, tmp_path / "cache")
        config.setdefault("release_grace", 3600)
        pool = ImagePool(client, resolver, PoolConfig(**config), metadata_dir=tmp_path / "pool")
        made.append(pool)
        return PathModel(StoreModel(pool)), pool, resolver

    yield build
    for pool in made:
        pool.close()


def diff_of(testdata, name: str, index: int = 0) -> str:
    return f"/{b64(ref_of(testdata, name))}/{manifest_of(testdata, name)['layers'][index]['digest']}/diff"


def number_of(pool: ImagePool, testdata, name: str, index: int = 0) -> int:
    image = pool.images.images[ref_of(testdata, name)]
    return image.slots[manifest_of(testdata, name)["layers"][index]["digest"]].number


# -- layer numbers and inode numbers ------------------------------------------------------------

def test_inode_numbers_survive_a_restart_whatever_the_order_images_come_in(make, testdata):
    """The kernel (and, after a hand-over, a new process) names nodes by these numbers: a restart
    must not renumber a layer because another image was resolved first this time."""
    model, pool, _ = make()
    first = {name: model.getattr(diff_of(testdata, name), caller=ROOT) for name in (ESGZ, ZSTD)}
    deeper = model.getattr(diff_of(testdata, ESGZ) + "/etc", caller=ROOT)
    pool.close()
    model, pool, _ = make()
    again = {name: model.getattr(diff_of(testdata, name), caller=ROOT) for name in (ZSTD, ESGZ)}
    assert again == first and {a.ino for a in again.values()} == {a.ino for a in first.values()}
    assert model.getattr(diff_of(testdata, ESGZ) + "/etc", caller=ROOT).ino == deeper.ino


def test_a_node_is_found_again_from_its_number_alone(make, testdata):
    """What the kernel sends after FORGETting nothing but dropping our process's memory of the
    layer (it was closed): the id leads back to the same file, reopened."""
    model, pool, resolver = make(idle_layers=0)
    path = diff_of(testdata, ESGZ) + "/etc/config.txt"
    nodeid = model.nodeid(path, ROOT)
    data = read_all(model, path)
    model.forget_all()
    assert wait_for(lambda: pool.stats()["pool"]["open_layers"] == 0)  # idle_layers 0: closed at once
    opened = resolver.opened
    assert model.model.read(nodeid, 0, 0, 1 << 20, caller=ROOT) == data
    assert resolver.opened == opened + 1


# -- layer handles ------------------------------------------------------------------------------

def test_a_held_layer_is_never_closed_and_an_idle_one_is(make, testdata):
    model, pool, _ = make()
    model.getattr(diff_of(testdata, ESGZ), caller=ROOT)
    model.forget_all()
    number = number_of(pool, testdata, ESGZ)
    served = pool.hold(number)  # a read under way
    try:
        pool.handles.trim(keep=0)
        assert pool._numbered[number][1].served is served
    finally:
        pool.let_go(served)
    # >= 1: the image's other layers open in parallel and may become idle only now
    assert pool.handles.trim(keep=0) >= 1 and pool._numbered[number][1].served is None


def test_pins_and_uses_hold_a_layer_until_both_end(make, testdata):
    model, pool, _ = make()
    ref = ref_of(testdata, ESGZ)
    key = manifest_of(testdata, ESGZ)["layers"][0]["digest"]
    model.getattr(diff_of(testdata, ESGZ), caller=ROOT)  # the kernel holds the layer directory now
    with pytest.raises(EntryNotFound):
        model.create(f"/{b64(ref)}/{key}/use", caller=ROOT)
    model.forget_all()  # no pin any more; the use still holds
    pool.handles.trim(keep=0)
    assert pool.layer(ref, key) is pool._numbered[number_of(pool, testdata, ESGZ)][1].served
    with pytest.raises(EntryNotFound):
        model.rmdir(f"/{b64(ref)}/{key}", caller=ROOT)  # release; the rmdir's own lookup pins it again
    model.forget_all()
    assert pool.handles.trim(keep=0) >= 1
    assert pool._numbered[number_of(pool, testdata, ESGZ)][1].served is None


def test_idle_layers_beyond_the_lru_or_its_time_are_closed_by_themselves(make, testdata):
    model, pool, _ = make(idle_layers=1)
    for i in range(3):  # (layers opened ahead of their lookups may be closed, and opened again here)
        model.getattr(diff_of(testdata, ESGZ, i), caller=ROOT)
    assert pool.stats()["pool"]["open_layers"] == 3  # each held: the kernel holds its directory
    closed = pool.stats()["pool"]["layers_closed"]
    model.forget_all()
    assert wait_for(lambda: pool.stats()["pool"]["open_layers"] == 1)  # the least recently used went
    assert pool.stats()["pool"]["layers_closed"] == closed + 2
    pool.handles.idle_ttl = 0  # the last one's time is up too
    with pool._lock:
        pool.handles._cond.notify()
    assert wait_for(lambda: pool.stats()["pool"]["open_layers"] == 0)


def test_a_failed_open_leaves_no_reference_cycle(make, testdata):
    """The error of a refused layer is kept by its open's future until the layer is tried again;
    then reference counting alone must free it (the cyclic GC may be frozen: `formats.toc`)."""
    model, pool, _ = make(negative_ttl=3600)
    ref = ref_of(testdata, "multilayer-orig")
    key = manifest_of(testdata, "multilayer-orig")["layers"][0]["digest"]
    with pytest.raises(EntryNotFound):
        pool.layer(ref, key)
    slot = pool.images.images[ref].slots[key]
    assert wait_for(lambda: slot.future.done())
    gc.disable()
    try:
        kept = weakref.ref(slot.future.exception())
        slot.future = None  # what a retry after negative_ttl does
        assert kept() is None, "the error outlived its future: it is in a reference cycle"
    finally:
        gc.enable()


# -- images and what is kept on disk -----------------------------------------------------------

def test_an_image_beyond_max_images_is_forgotten_with_its_metadata_and_numbers(make, testdata, tmp_path):
    model, pool, _ = make(max_images=1)
    model.getattr(diff_of(testdata, ESGZ), caller=ROOT)
    kept = list((tmp_path / "pool").glob("metadata--*"))
    assert len(kept) == 1 and len(pool.numbers) == len(manifest_of(testdata, ESGZ)["layers"])
    model.getattr(diff_of(testdata, ZSTD), caller=ROOT)  # the kernel still holds the first image's layer
    assert pool.resolved(ref_of(testdata, ESGZ)) and len(list((tmp_path / "pool").glob("metadata--*"))) == 2

    model.forget_all()  # nothing holds the first image now
    other = "tricky-esgz"
    model.getattr(diff_of(testdata, other), caller=ROOT)
    assert not pool.resolved(ref_of(testdata, ESGZ)) and not pool.resolved(ref_of(testdata, ZSTD))
    assert [d.name for d in (tmp_path / "pool").glob("metadata--*")] == [pool.metadata.path(ref_of(testdata, other)).name]
    lines = (tmp_path / "pool" / "layer-numbers").read_text().splitlines()
    refs = {json.loads(line)[1] for line in lines if line.startswith("[")}
    assert refs == {ref_of(testdata, other)} and len(pool.numbers) == len(manifest_of(testdata, other)["layers"])
    assert pool.stats()["pool"]["images_dropped"] == 2


# -- the filesystem's node table ----------------------------------------------------------------

def test_the_node_table_holds_what_the_kernel_holds(make, testdata):
    model, pool, _ = make()
    base = f"/{b64(ref_of(testdata, ESGZ))}"
    for i in range(3):
        model.getattr(diff_of(testdata, ESGZ, i), caller=ROOT)
        model.getattr(f"{base}/{manifest_of(testdata, ESGZ)['layers'][i]['digest']}/info", caller=ROOT)
    for n in range(50):  # directories of layers never resolved: valid names, no registry access
        model.getattr(f"{base}/sha256:{n:064x}", caller=ROOT)
    assert model.stats()["nodes"] == 1 + 1 + 3 * 2 + 50  # root, ref dir, layer dirs and info, the 50
    model.forget_all()
    assert model.stats()["nodes"] == 1
    assert pool.stats()["pool"]["pinned_layer_dirs"] == 0


def test_a_release_that_leaves_a_layer_unused_asks_the_kernel_to_forget_its_directory(make, testdata):
    model, pool, _ = make()
    released: list[tuple[int, str]] = []
    model.model.on_released = lambda parent, name: released.append((parent, name))
    ref = ref_of(testdata, ESGZ)
    key = manifest_of(testdata, ESGZ)["layers"][1]["digest"]
    layer = f"/{b64(ref)}/{key}"
    for _ in range(2):
        with pytest.raises(EntryNotFound):
            model.create(f"{layer}/use", caller=ROOT)
    with pytest.raises(EntryNotFound):
        model.rmdir(layer, caller=ROOT)
    assert released == []  # one use left
    with pytest.raises(EntryNotFound):
        model.rmdir(layer, caller=ROOT)
    assert released == [(model.nodeid(f"/{b64(ref)}", ROOT), key)]


def test_store_files_keep_their_modes(make, testdata):
    model, *_ = make()
    assert stat.S_IMODE(model.getattr("/", caller=ROOT).mode) == 0o711
    assert HOST
