"""`IdMap` (podman's --uidmap format) and `Ownership`: which host id each container id shows as."""
from __future__ import annotations

import pytest

from stargz_store.fs.attrs import Attr
from stargz_store.fs.idmap import ROOTFUL, IdMap, IdMapError, Ownership

ROOTLESS = IdMap.parse("0:1001:1,1:100000:65536")


@pytest.mark.parametrize("container, host", [
    (0, 1001), (1, 100000), (1000, 100999), (65536, 165535), (65537, None), (3_000_000, None),
])
def test_a_rootless_namespace_maps_root_to_the_user_and_the_rest_to_the_subordinate_range(container, host):
    assert ROOTLESS.to_host(container) == host


def test_ranges_are_kept_sorted_and_printed_as_given():
    idmap = IdMap.parse("10:500:5, 0:1000:1")
    assert str(idmap) == "0:1000:1,10:500:5" and idmap.size == 6
    assert [idmap.to_host(i) for i in (0, 1, 9, 10, 14, 15)] == [1000, None, None, 500, 504, None]
    assert IdMap.parse("0/1000/1") == IdMap.parse("0:1000:1")


@pytest.mark.parametrize("text", ["", "0:1000", "0:1000:0", "a:b:c", "0:1000:10,5:2000:10", "0:1000:10,20:1005:10",
                                  "0:4294967290:100"])
def test_bad_maps_are_refused(text):
    with pytest.raises(IdMapError):
        IdMap.parse(text)


def test_ownership_shifts_owners_and_names_what_it_cannot_map():
    owners = Ownership(store_uid=1001, uids=ROOTLESS, gids=IdMap.parse("0:1001:1,1:200000:10"))
    shifted = owners.attr(Attr(ino=5, mode=0o100644, uid=1000, gid=3, nodeid=9))
    assert (shifted.uid, shifted.gid, shifted.ino, shifted.nodeid, shifted.mode) == (100999, 200002, 5, 9, 0o100644)
    assert owners.attr(Attr(ino=1, mode=0o40755, gid=50)).gid == 65534  # never someone else's id
    assert owners.problem([0, 1000], [0, 10]) is None
    problem = owners.problem([0, 70000, 3_000_000], [0])
    assert problem is not None and problem.startswith("uid 70000, 3000000 of the layer outside the uid map")
    assert "gid 11 " in owners.problem([0], [11])
    attr = Attr(ino=1, mode=0o40755, uid=7)
    assert ROOTFUL.attr(attr) is attr and ROOTFUL.problem([7], [7]) is None
