"""The Additional Layer Store tree, free of FUSE: node ids in, `Attr`/bytes/typed errors out.

Layout (additional-layer-store.md §2, §9.1), with the modes the kernel enforces (the mount has
`default_permissions`; every store node is owned by root); one node class each (`nodes`)::

    /                                  0711; lists the references resolved so far (to root)
    /pool                              symlink to `<root>/pool` (readiness probe of stargz-store scripts)
    /<base64(ref)>/                    0555; EINVAL unless strict base64 of a valid reference
    /<base64(ref)>/manifest, config    0400: the image's manifest and config, for humans
    /<base64(ref)>/<digest>/           0555; EINVAL unless a digest; `rmdir` = release notification
    /<base64(ref)>/<digest>/diff/...   the layer tree (`LayerTree`), with the TOC's modes and owners
    /<base64(ref)>/<digest>/info       0400: containers/storage layer JSON for this key
    /<base64(ref)>/<digest>/blob       0400: the raw compressed layer (every file's bytes: root only)
    /<base64(ref)>/<digest>/use        never exists; creating it = use notification (ENOENT)

So another user reads, of the images root has resolved, what the layers' own mode bits allow (as
inside a container), but cannot list which images the node holds, nor read manifests, configs
(they may hold secrets in `Env`) or raw blobs. Only root may make the store resolve: any other
caller's lookup of an image that is not resolved yet, or of a layer key its image does not list,
is EACCES before any registry request or any bookkeeping (`Node.admit`, checked on every request).
The notifications need write access to their directory, which only root has. A rootless store
(`idmap.Ownership`) trusts its own user as it trusts root, and serves no layer with an owner its
id maps cannot show (`diff`, `info` and `blob` are EIO, the reason logged: Podman pulls normally
and fails as loudly as it does without the store).

Ref and layer directories exist as soon as their names are valid, without any registry access, so
that `use` and `rmdir` work for layers that were never resolved (and after a restart). Resolving
happens at the lookup of `diff`, `info`, `blob`, `manifest` and `config`.

Requests name nodes by id, as the kernel does (`inodes`): a LOOKUP makes the child's node and
returns its attributes (their `nodeid` is the id later requests use); FORGET drops what the kernel
no longer holds. The model talks to a `LayerProvider` (the daemon's image pool) for everything
that needs the registry or an open layer.
"""
from __future__ import annotations

import itertools
import secrets
import logging
import os
import threading
from functools import lru_cache
from typing import Callable

from .attrs import Attr
from .caller import Caller
from .errors import BadHandle, NoSuchAttribute, ReadOnly, StaleNode
from .idmap import ROOTFUL, Ownership
from .inodes import ROOT_ID, NodeTable, is_diff_nodeid, split_diff_nodeid
from .nodes import POOL_LINK, DiffEntry, Listing, Node, Opened, Root, Scope, StoreNode, decode_ref_name
from .provider import ImageFiles, LayerProvider, ServedLayer
from .recorder import KIND_SYMLINK, AccessRecorder

log = logging.getLogger(__name__)

__all__ = ["ImageFiles", "LayerProvider", "ServedLayer", "StoreModel"]

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class StoreModel:
    """Answers filesystem questions for the whole mount. Thread-safe.

    `on_released(ref directory id, layer directory name)` is called after a release notification
    left its layer held by no notification: the FUSE side then asks the kernel to forget that
    directory, which ends the kernel's hold on the layer too (see `daemon.handles`).
    """

    def __init__(self, provider: LayerProvider, *, pool_target: str | None = None, log_file_access: bool = False,
                 ownership: Ownership = ROOTFUL, recorder: AccessRecorder | None = None) -> None:
        self.provider = provider
        self.ownership = ownership
        self.pool_target = pool_target
        self.log_file_access = log_file_access
        self.recorder = recorder if recorder is not None else AccessRecorder()
        self.on_released: Callable[[int, str], None] | None = None
        self._decode = lru_cache(maxsize=4096)(self._decode_ref_name)
        self.scope = Scope(provider, pool_target, self._decode, self._released, ownership, self.recorder)
        self.nodes: NodeTable[Node] = NodeTable(Root(self.scope))
        self._handles: dict[int, Opened] = {}
        # Handles start at a random base: a process taking over the mount must not hand out a
        # number the kernel still holds from its predecessor (those are read through `read`'s
        # fallback to the node).
        self._next_handle = itertools.count(secrets.randbits(31) << 32 | 1)
        self._lock = threading.Lock()
        self.adopted = False  # serving a mount an earlier process served (`adopt_nodes`)

    def _decode_ref_name(self, name: str) -> str:
        return self.provider.canonical_ref(decode_ref_name(name))

    def _released(self, parent: int, name: str) -> None:
        if self.on_released is not None:
            self.on_released(parent, name)

    # -- nodes --------------------------------------------------------------------------------

    def node(self, nodeid: int, caller: Caller) -> Node:
        """The node `nodeid` names, if `caller` may ask about it."""
        node = self.nodes.get(nodeid)
        if node is None:
            if not is_diff_nodeid(nodeid):
                raise StaleNode(f"node {nodeid:#x}")
            number, view, entry_ino = split_diff_nodeid(nodeid)
            served = self.provider.numbered(number)
            node = DiffEntry(self.scope, served, view, served.tree.node_for_ino(entry_ino))
        node.admit(caller)
        return node

    def lookup(self, parent: int, name: str, *, caller: Caller) -> Attr:
        """The child `name` of `parent`: its attributes, and the kernel holds it from now on
        (until `forget`). A refused lookup leaves nothing behind."""
        child = self.node(parent, caller).lookup(name)
        child.admit(caller)
        attr = child.attr()
        if isinstance(child, StoreNode):
            self.nodes.remember(child.nodeid, child)
        return attr

    def forget(self, nodeid: int, count: int) -> None:
        self.nodes.forget(nodeid, count)

    def node_for_key(self, key: tuple[str, ...]) -> StoreNode:
        """The store node named `key`, made as the lookups from the root would make it (no
        registry access: ref and layer directories and their files resolve only when asked)."""
        node: Node = self.nodes.get(ROOT_ID)  # type: ignore[assignment]
        kind, *names = key
        if kind == POOL_LINK:
            names = [POOL_LINK]
        elif kind not in ("ref", "layer"):
            raise StaleNode(f"unknown node key {key!r}")
        for name in names:
            node = node.lookup(name)
        if not isinstance(node, StoreNode) or node.key != tuple(key):
            raise StaleNode(f"node key {key!r} names no store node")
        return node

    def adopt_nodes(self, held: list[tuple[tuple[str, ...], int]]) -> int:
        """Rebuild the table of store nodes the kernel holds from an earlier process's
        `NodeTable.held_keys()` (ids follow from keys); returns how many were adopted. A key that
        cannot be rebuilt is logged and skipped (its node then answers ESTALE)."""
        adopted = 0
        for key, count in held:
            try:
                node = self.node_for_key(tuple(key))
            except Exception as e:  # noqa: BLE001 - one bad key must not stop the hand-over
                log.warning("cannot rebuild node %r handed over: %s", key, e)
                continue
            self.nodes.adopt(node.nodeid, node, count)
            adopted += 1
        self.adopted = True
        return adopted

    def getattr(self, nodeid: int, *, caller: Caller) -> Attr:
        return self.node(nodeid, caller).attr()

    def readdir(self, nodeid: int, *, caller: Caller) -> Listing:
        """Names in a directory with their attributes where cheap (None: the kernel looks them up)."""
        return self.node(nodeid, caller).listing()

    def readlink(self, nodeid: int, *, caller: Caller) -> str:
        node = self.node(nodeid, caller)
        target = node.readlink()
        if self.recorder.active and isinstance(node, DiffEntry):
            self.recorder.first_read(node.served.blob_digest, node.node.entry.ino, node.node.path, kind=KIND_SYMLINK)
        return target

    def listxattr(self, nodeid: int, *, caller: Caller) -> list[str]:
        return list(self.node(nodeid, caller).xattrs())

    def getxattr(self, nodeid: int, name: str, *, caller: Caller) -> bytes:
        value = self.node(nodeid, caller).xattrs().get(name)
        if value is None:
            raise NoSuchAttribute(name)
        return value

    def stats(self) -> dict[str, int]:
        """How much the model holds: store nodes the kernel holds (`inodes.NodeTable`), open handles,
        and first reads recorded (`recorder`)."""
        return {"nodes": len(self.nodes), "open_files": len(self._handles),
                "recorded_reads": self.recorder.stats()["entries"]}

    def statfs(self) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    # -- data ---------------------------------------------------------------------------------

    def open(self, nodeid: int, flags: int = 0, *, caller: Caller, backing: bool = False) -> int:
        """Open for reading; returns a handle for `read`. Any write access is EROFS. `backing`:
        the kernel could read the file from a backing file (passthrough): see `backing_fd`."""
        if flags & WRITE_FLAGS:
            raise ReadOnly(f"node {nodeid:#x}")
        node = self.node(nodeid, caller)
        opened = node.open()
        if backing:
            opened.find_backing()
        if self.recorder.active or self.log_file_access:
            self._first_access(node)
        fh = next(self._next_handle)
        with self._lock:
            self._handles[fh] = opened
        return fh

    def read(self, nodeid: int, fh: int, offset: int, size: int, *, caller: Caller) -> bytes:
        """Bytes `[offset, offset+size)` clipped to the file. `fh` 0: a file the kernel opened
        without asking (no_open): the node answers by itself. Layer errors are `LayerUnavailable`."""
        if fh:
            opened = self._handles.get(fh)
            if opened is not None:
                return opened.read(offset, size)
            if not self.adopted:
                raise BadHandle(str(fh))
            # A handle an earlier process of this mount opened: our content is immutable, so the
            # node answers by itself (as with no_open).
        if is_diff_nodeid(nodeid):
            return self._read_diff(nodeid, offset, size, caller)
        node = self.node(nodeid, caller)
        return node.read(offset, size)

    def _read_diff(self, nodeid: int, offset: int, size: int, caller: Caller) -> bytes:
        """The hot path of a container's reads: the layer is held for the read (never closed
        under it) and the node is found from its id, in one step."""
        number, view, entry_ino = split_diff_nodeid(nodeid)
        served = self.provider.hold(number)
        try:
            node = DiffEntry(self.scope, served, view, served.tree.node_for_ino(entry_ino))
            node.admit(caller)
            if self.recorder.active or (offset == 0 and self.log_file_access):
                self._first_access(node)
            return node.read_held(offset, size)
        finally:
            self.provider.let_go(served)

    def backing_fd(self, fh: int) -> int | None:
        """A checked read-only descriptor of open file `fh`'s backing file, when its every byte is
        cached and verified (`layer.backing`); None: its reads come to the store. Caller closes it."""
        opened = self._handles.get(fh)
        return None if opened is None else opened.backing_fd()

    def release(self, fh: int) -> None:
        with self._lock:
            opened = self._handles.pop(fh, None)
        if opened is not None:
            opened.close()

    def _first_access(self, node: Node) -> None:
        """Which files a workload reads, once each: into the recorder (any first read of a regular
        file, whatever its offset: a loader may pread a header elsewhere first) and, with
        `log_file_access`, into the log. Called only when one of them is on (the read path tests
        two attributes, nothing more, when both are off)."""
        if not isinstance(node, DiffEntry):
            return
        if self.recorder.active and node.node.is_reg:
            entry = node.node.entry
            self.recorder.first_read(node.served.blob_digest, entry.ino, node.node.path, size=entry.size)
        if self.log_file_access and node.served.first_read(node.node.entry.ino):
            attr = node.attr()
            log.debug("first access: %s %s/%s size=%d mode=%o", node.served.ref, node.served.key_of(node.view),
                      node.node.path, attr.size, attr.mode)

    # -- notifications and refused writes -----------------------------------------------------

    def create(self, parent: int, name: str, *, caller: Caller) -> None:
        """`<layer>/use` is the use notification (root only): count it and answer ENOENT.
        Anything else is EROFS."""
        self.node(parent, caller).create(name, caller)

    def rmdir(self, parent: int, name: str, *, caller: Caller) -> None:
        """rmdir of a layer directory is the release notification (root only): count it and
        answer ENOENT. Anything else is EROFS."""
        self.node(parent, caller).rmdir(name, caller)

    def refuse_write(self, nodeid: int, name: str | None = None) -> None:
        """Every other mutating operation: EROFS (a name is still validated first)."""
        node = self.nodes.get(nodeid)
        if node is not None and name is not None:
            node.check_name(name)
        raise ReadOnly(name or f"node {nodeid:#x}")
