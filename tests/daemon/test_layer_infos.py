"""The pool's per-layer `info` mapping: keys known at once, JSON built at first read, once."""
from __future__ import annotations

import json
from types import SimpleNamespace

from stargz_store.daemon.images import Slot
from stargz_store.daemon.info import LayerInfos

BLOB = "sha256:" + "b" * 64
TOC = "sha256:" + "c" * 64
DIFF = "sha256:" + "d" * 64


class _CountingToc:
    def __init__(self) -> None:
        self.scans = 0

    def uids(self) -> list[int]:
        self.scans += 1
        return [0, 1000]

    def gids(self) -> list[int]:
        return [0]


def test_keys_are_known_without_building_and_json_is_built_once():
    toc = _CountingToc()
    descriptor = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": BLOB, "size": 123,
                  "annotations": {"containerd.io/snapshot/stargz/toc.digest": TOC}}
    slot = Slot("registry.example/image:1", 0, descriptor, 1)
    slot.diff_id = DIFF
    parsed = SimpleNamespace(toc=toc, toc_digest=TOC, compression="gzip")
    infos = LayerInfos(slot, parsed)
    assert BLOB in infos and TOC in infos and DIFF not in infos
    assert sorted(infos) == sorted([BLOB, TOC]) and len(infos) == 2
    assert infos.get(DIFF) is None
    assert toc.scans == 0
    blob_info = json.loads(infos[BLOB])
    toc_info = json.loads(infos[TOC])
    assert blob_info["uidset"] == [0, 1000] == toc_info["uidset"]
    assert toc.scans == 1
