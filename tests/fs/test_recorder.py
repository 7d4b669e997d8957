"""First reads recorded by the filesystem model (`fs.recorder`), through the real pool and layers.

The reference image `multilayer-esgz` (made by tools we did not write) has files in both layers,
one path in both (`etc/config.txt`) and a symlink (`mod/link`); reads go through `StoreModel`
by node id as the kernel sends them, with and without a handle.
"""
from __future__ import annotations

import json

import pytest

from stargz_store.daemon.pool import ImagePool, PoolConfig
from stargz_store.fs.caller import ROOT
from stargz_store.fs.model import StoreModel
from stargz_store.fs.recorder import ALL_IMAGES, AccessRecorder, record_entries

from .layout_source import LayoutClient, LayoutResolver, blob_file
from .paths import PathModel
from .test_model import b64, layout_tag

HOST = "127.0.0.1:5999"
NAME = "multilayer-esgz"


class NeverCalled(AccessRecorder):
    """A recorder that is off and fails the test if the read path asks it anything."""

    def first_read(self, *args, **kwargs) -> None:  # type: ignore[override]
        raise AssertionError("the read path consulted a recorder that is off")


@pytest.fixture
def image(testdata):
    layout = testdata / NAME
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob_file(layout, index["manifests"][0]["digest"]).read_text())
    ref = f"{HOST}/{NAME}:{layout_tag(layout)}"
    return ref, [layer["digest"] for layer in manifest["layers"]]


@pytest.fixture
def make_model(testdata, tmp_path):
    pools = []

    def make(recorder: AccessRecorder) -> PathModel:
        client = LayoutClient({NAME: testdata / NAME})
        pool = ImagePool(client, LayoutResolver(client, tmp_path / f"cache{len(pools)}"),
                         PoolConfig(negative_ttl=60, release_grace=3600), metadata_dir=tmp_path / f"pool{len(pools)}")
        pools.append(pool)
        return PathModel(StoreModel(pool, recorder=recorder))

    yield make
    for pool in pools:
        pool.close()


def _read_some(model: PathModel, ref: str, layers: list[str]) -> None:
    lower, upper = (f"/{b64(ref)}/{digest}/diff" for digest in layers[:2])
    model.read_path(f"{upper}/add/new.txt", 0, 4096, caller=ROOT)
    model.read_path(f"{lower}/nested/keep.txt", 2, 4096, caller=ROOT)  # a first read need not start at 0
    fh = model.open(f"{upper}/etc/config.txt", caller=ROOT)  # with a handle
    model.read(fh, 0, 4096)
    model.release(fh)
    model.read_path(f"{lower}/etc/config.txt", 0, 4096, caller=ROOT)  # the same path, hidden in the image
    assert model.readlink(f"{lower}/mod/link", caller=ROOT)
    model.read_path(f"{upper}/add/new.txt", 0, 4096, caller=ROOT)  # read again: recorded once
    model.read_path(f"{lower}/nested/keep.txt", 0, 4096, caller=ROOT)


def test_first_reads_are_recorded_once_in_order_with_their_layer(make_model, image):
    ref, layers = image
    recorder = AccessRecorder([ref])
    _read_some(make_model(recorder), ref, layers)

    entries = record_entries(recorder.reads_in(layers), layers, "sha256:feed", recorder.started(ref))
    assert [(e["path"], e["layerIndex"], e["kind"]) for e in entries] == [
        ("add/new.txt", 1, "reg"), ("nested/keep.txt", 0, "reg"), ("etc/config.txt", 1, "reg"),
        ("mod/link", 0, "symlink"),
    ]
    assert all(e["manifestDigest"] == "sha256:feed" and e["layerDigest"] == layers[e["layerIndex"]] for e in entries)
    seconds = [e["seconds"] for e in entries]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert entries[0]["size"] > 0


def test_only_recorded_images_are_recorded(make_model, image):
    ref, layers = image
    recorder = AccessRecorder([f"{HOST}/other:1"])
    _read_some(make_model(recorder), ref, layers)
    assert recorder.reads_in(layers) == []

    everything = AccessRecorder([ALL_IMAGES])
    _read_some(make_model(everything), ref, layers)
    assert len(everything.reads_in(layers)) == 5  # four files (one twice, in two layers) and a symlink


def test_recording_off_never_reaches_the_recorder(make_model, image):
    ref, layers = image
    recorder = NeverCalled()
    _read_some(make_model(recorder), ref, layers)
    assert recorder.stats()["entries"] == 0


def test_start_stop_clear_and_the_bound():
    recorder = AccessRecorder(max_entries=2)
    assert not recorder.active
    recorder.first_read("sha256:a", 1, "x")
    assert recorder.reads_in(["sha256:a"]) == []  # off: nothing kept
    recorder.start("reg/img:1")
    recorder.layer_opened("reg/img:1", "sha256:a")
    recorder.layer_opened("reg/other:1", "sha256:b")
    for ino, path in enumerate(["x", "y", "z"]):
        recorder.first_read("sha256:a", ino, path)
    recorder.first_read("sha256:b", 9, "w")
    assert [r.path for r in recorder.reads_in(["sha256:a", "sha256:b"])] == ["x", "y"]  # bounded, b not recorded
    assert recorder.clear(["sha256:a"]) == 2
    recorder.first_read("sha256:a", 0, "x")
    assert [r.path for r in recorder.reads_in(["sha256:a"])] == ["x"]
    assert recorder.stop("reg/img:1") and not recorder.active and not recorder.stop("reg/img:1")
