"""Node ids and inode numbers of the mount, and the table of store nodes the kernel holds.

The kernel names a node in every request by the id we gave it in a LOOKUP (or READDIRPLUS)
reply, and holds it until it sends FORGET. Ids must stay valid for as long as the kernel holds
them, and must mean the same thing to a process that takes over the mount later (issue 14: it
answers for ids the kernel already holds). So every id is derived from what the node *is*, never
from the order in which nodes were first seen:

- a node of a layer's `diff` tree: `layer_number << 32 | entry ino`. Entry inos are assigned
  deterministically by the TOC builder (the root is 1, hardlinks share their target's), and
  layer numbers are assigned once per (image reference, blob digest) and kept on disk
  (`daemon.metadata.LayerNumbers`). The same tree shown under the layer's TOC digest (Podman
  5.1+ looks layers up by it) has `VIEW_BIT` set in its node ids and the same `ino`: the kernel
  allows a directory at one place only, stat shows one file;
- a node of the store's own tree (reference and layer directories, `info`, `blob`, `manifest`,
  `config`, the `pool` link): `STORE_BIT` | 63 bits of a hash of its key, the names that lead to
  it. The root is `ROOT_ID` (1).

Store nodes are remembered (`NodeTable`) from their LOOKUP until the kernel forgets them, with
the kernel's lookup count, so the table is as large as what the kernel caches and no larger:
refused lookups (EACCES, EINVAL, ENOENT) leave nothing behind. Diff nodes need no table: their
id names their layer and entry.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import Callable, Generic, Protocol, TypeVar

from .errors import LayerUnavailable

log = logging.getLogger(__name__)

ROOT_ID = 1
ENTRY_BITS = 32
ENTRY_MASK = (1 << ENTRY_BITS) - 1
VIEW_BIT = 1 << 62
STORE_BIT = 1 << 63
MAX_LAYER_NUMBER = (1 << 30) - 1  # numbers stay below VIEW_BIT


def diff_ino(layer_number: int, entry_ino: int) -> int:
    """What stat shows for entry `entry_ino` of layer `layer_number` (under either key)."""
    return layer_number << ENTRY_BITS | entry_ino


def is_diff_nodeid(nodeid: int) -> bool:
    return not nodeid & STORE_BIT and nodeid > ENTRY_MASK


def split_diff_nodeid(nodeid: int) -> tuple[int, int, int]:
    """(layer number, view bit, entry ino) of a diff node id."""
    return (nodeid & ~VIEW_BIT) >> ENTRY_BITS, nodeid & VIEW_BIT, nodeid & ENTRY_MASK


def store_nodeid(key: tuple[str, ...]) -> int:
    """The id of the store node with `key` (e.g. `("layer", "<base64 ref>", "sha256:...")`)."""
    digest = hashlib.blake2b("\0".join(key).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return STORE_BIT | int.from_bytes(digest, "little") & (STORE_BIT - 1)


class Tracked(Protocol):
    """A store node as the table sees it: its key and what happens when the kernel first holds
    it and when it lets go (a layer directory pins its layer meanwhile)."""

    key: tuple[str, ...]

    def held(self) -> None: ...

    def let_go(self) -> None: ...


N = TypeVar("N", bound=Tracked)


class NodeTable(Generic[N]):
    """Store nodes by node id, with the kernel's lookup count. Thread-safe; `get` takes no lock
    (a dict read is atomic): it is on the path of every request."""

    def __init__(self, root: N) -> None:
        self._nodes: dict[int, N] = {ROOT_ID: root}
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()
        # Told (under the lock, before the LOOKUP is answered) when a node enters or leaves the
        # table: the restart holder keeps the keys, to rebuild the table if this process dies.
        self.on_added: Callable[[int, tuple[str, ...]], None] | None = None
        self.on_dropped: Callable[[int], None] | None = None

    def get(self, nodeid: int) -> N | None:
        return self._nodes.get(nodeid)

    def remember(self, nodeid: int, node: N) -> N:
        """Count one kernel lookup of `node`; returns the node the table holds under `nodeid`
        (the one made at the first lookup: later lookups reuse it)."""
        if nodeid == ROOT_ID:
            return self._nodes[ROOT_ID]
        with self._lock:  # held() and let_go() under it too: a FORGET racing a LOOKUP keeps them paired
            known = self._nodes.get(nodeid)
            if known is not None and known.key != node.key:
                log.error("node id %#x of %r is taken by %r", nodeid, node.key, known.key)
                raise LayerUnavailable(f"node id collision for {node.key!r}")
            if known is None:
                self._nodes[nodeid] = known = node
                node.held()
                if self.on_added is not None:
                    self.on_added(nodeid, node.key)
            self._counts[nodeid] = self._counts.get(nodeid, 0) + 1
        return known

    def adopt(self, nodeid: int, node: N, count: int) -> None:
        """A node the kernel already holds `count` times, looked up by an earlier process that
        served this mount (restart hand-over). Counts add up with what is known already."""
        if nodeid == ROOT_ID or count <= 0:
            return
        with self._lock:
            known = self._nodes.get(nodeid)
            if known is None:
                self._nodes[nodeid] = node
                node.held()
            elif known.key != node.key:
                log.error("node id %#x of %r is taken by %r", nodeid, node.key, known.key)
                return
            self._counts[nodeid] = self._counts.get(nodeid, 0) + count

    def forget(self, nodeid: int, count: int) -> None:
        """The kernel dropped `count` lookups of `nodeid`; at zero the node is dropped."""
        with self._lock:
            left = self._counts.get(nodeid)
            if left is None:
                return  # a diff node, the root, or one we never counted
            left -= count
            if left > 0:
                self._counts[nodeid] = left
                return
            del self._counts[nodeid]
            self._nodes.pop(nodeid).let_go()
            if self.on_dropped is not None:
                self.on_dropped(nodeid)

    def __len__(self) -> int:
        return len(self._nodes)

    def held_keys(self) -> list[tuple[tuple[str, ...], int]]:
        """(key, lookup count) of every node the kernel holds: what a process taking over the
        mount needs to rebuild the table (the ids follow from the keys)."""
        with self._lock:
            return [(self._nodes[i].key, n) for i, n in self._counts.items()]
