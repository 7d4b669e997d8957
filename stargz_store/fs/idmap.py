"""Owners as a rootless Podman's user namespace needs them (pure: no FUSE, no files read).

A store that runs as an unprivileged user, outside Podman's user namespace, must show each file
with the *host* owner that Podman's namespace maps to the layer's owner: a layer's `0` is the
user's own uid, `1..65536` the user's `/etc/subuid` range, as `podman unshare` shows them. The
kernel reports anything it cannot map as the overflow id (65534) inside the namespace, where a
normal rootless pull would have failed with "insufficient UIDs or GIDs"; so a layer with an
owner the map cannot carry is refused whole (`Ownership.problem`), never served with wrong owners.

`IdMap` is podman's `--uidmap` format, `CONTAINER:HOST:SIZE[,CONTAINER:HOST:SIZE...]`: container
id `c` in `[CONTAINER, CONTAINER+SIZE)` is host id `HOST + (c - CONTAINER)`.
"""
from __future__ import annotations

import dataclasses
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterable

from .attrs import Attr

MAX_ID = (1 << 32) - 2  # (uid_t)-1 is "no id"


class IdMapError(ValueError):
    """A map that is not `CONTAINER:HOST:SIZE[,...]` of non-overlapping ranges (the message says where)."""


@dataclass(frozen=True)
class IdRange:
    container: int
    host: int
    size: int

    def __str__(self) -> str:
        return f"{self.container}:{self.host}:{self.size}"


class IdMap:
    """Container ids -> host ids over a few ranges, as a user namespace's `uid_map` (sorted, disjoint)."""

    def __init__(self, ranges: Iterable[IdRange]) -> None:
        self.ranges = tuple(sorted(ranges, key=lambda r: r.container))
        if not self.ranges:
            raise IdMapError("an id map needs at least one range")
        for r in self.ranges:
            if r.size < 1 or r.container < 0 or r.host < 0 or r.container + r.size - 1 > MAX_ID or r.host + r.size - 1 > MAX_ID:
                raise IdMapError(f"range {r} is out of bounds (ids 0..{MAX_ID}, size at least 1)")
        for a, b in zip(self.ranges, self.ranges[1:]):
            if a.container + a.size > b.container:
                raise IdMapError(f"ranges {a} and {b} overlap")
        hosts = sorted(self.ranges, key=lambda r: r.host)
        for a, b in zip(hosts, hosts[1:]):
            if a.host + a.size > b.host:
                raise IdMapError(f"host ranges of {a} and {b} overlap")
        self._starts = [r.container for r in self.ranges]

    @classmethod
    def parse(cls, text: str) -> IdMap:
        """`0:1000:1,1:100000:65536` (podman's `--uidmap`; `/` is accepted for `:` as well)."""
        ranges = []
        for part in text.replace("/", ":").split(","):
            fields = part.strip().split(":")
            if len(fields) != 3 or not all(f.strip().isdigit() for f in fields):
                raise IdMapError(f"{part.strip()!r} is not CONTAINER:HOST:SIZE")
            ranges.append(IdRange(*(int(f) for f in fields)))
        return cls(ranges)

    def to_host(self, container_id: int) -> int | None:
        """The host id of `container_id`, or None when no range covers it."""
        i = bisect_right(self._starts, container_id) - 1
        if i < 0:
            return None
        r = self.ranges[i]
        offset = container_id - r.container
        return r.host + offset if offset < r.size else None

    @property
    def size(self) -> int:
        """How many container ids are mapped."""
        return sum(r.size for r in self.ranges)

    def __str__(self) -> str:
        return ",".join(map(str, self.ranges))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and self.ranges == other.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)


@dataclass(frozen=True)
class Ownership:
    """Who the store acts for and how owners are shown.

    `store_uid`: besides root, the uid whose requests may make the store resolve images and
    send `use`/`rmdir` notifications (the rootless user: Podman's root inside its namespace is
    that uid to the kernel's FUSE requests). `uids`/`gids`: container -> host maps applied to
    every attribute the kernel sees; None shows the layers' own ids (a root store)."""

    store_uid: int = 0
    uids: IdMap | None = None
    gids: IdMap | None = None

    @property
    def maps_ids(self) -> bool:
        return self.uids is not None or self.gids is not None

    def attr(self, attr: Attr) -> Attr:
        """`attr` with host owners (ids already refused by `problem` never get here; one that
        does, e.g. a store file's, shows as the overflow id rather than as someone else's)."""
        if not self.maps_ids:
            return attr
        uid = _mapped(self.uids, attr.uid)
        gid = _mapped(self.gids, attr.gid)
        if uid == attr.uid and gid == attr.gid:
            return attr
        return dataclasses.replace(attr, uid=uid, gid=gid, nodeid=attr.nodeid)

    def problem(self, uids: Iterable[int], gids: Iterable[int]) -> str | None:
        """Why a layer with these owners cannot be served through the maps, or None."""
        for kind, idmap, ids in (("uid", self.uids, uids), ("gid", self.gids, gids)):
            if idmap is None:
                continue
            missing = sorted(i for i in set(ids) if idmap.to_host(i) is None)
            if missing:
                shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
                return (f"{kind} {shown} of the layer outside the {kind} map {idmap} "
                        f"({idmap.size} ids; a rootless pull of it would fail too: add subordinate ids "
                        f"in /etc/sub{kind} and run `podman system migrate`)")
        return None


OVERFLOW_ID = 65534


def _mapped(idmap: IdMap | None, value: int) -> int:
    if idmap is None:
        return value
    host = idmap.to_host(value)
    return OVERFLOW_ID if host is None else host


ROOTFUL = Ownership()
