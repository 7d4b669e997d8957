"""One layer's `diff` directory: the TOC tree as an overlayfs lower directory (estargz.md §10).

The raw TOC holds OCI whiteouts as empty files; overlayfs wants them in its own form:
- `.wh.NAME` is listed as a 0/0 character device `NAME` (unless a real `NAME` is in the same
  directory); every `.wh.*` name itself is hidden;
- `.wh..wh..opq` is hidden and makes its directory report `trusted.overlay.opaque=y` and
  `user.overlay.opaque=y` (both, so rootful and `userxattr` overlay mounts agree);
- landmark files at the root are hidden.
Inode numbers are `ino_base + TocEntry.ino`, so they are stable for the life of the layer number,
and hardlinks (one shared `TocEntry`) share one inode. A node is found again from its inode
number alone (`node_for_ino`: the kernel names nodes by number, `fs.inodes`), through an index
built at the first such request.
"""
from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

from ..formats.toc import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    REG,
    SYMLINK,
    TOC_TAR_NAME,
    Toc,
    TocEntry,
)
from .attrs import Attr
from .errors import EntryNotFound, NoSuchAttribute, NotADirectory

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
OPAQUE_VALUE = b"y"
HIDDEN_AT_ROOT = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME})

_TYPE_BITS = {
    DIR: stat.S_IFDIR,
    REG: stat.S_IFREG,
    SYMLINK: stat.S_IFLNK,
    CHAR: stat.S_IFCHR,
    BLOCK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class DiffNode:
    """A node of the overlay view: a TOC entry, or the 0/0 char device standing for a whiteout.

    For a whiteout, `entry` is the `.wh.NAME` entry (its inode number and mtime are reused).
    `path` is the node's normalised path inside the layer (`""` for the root).
    """

    path: str
    entry: TocEntry
    whiteout: bool = False

    @property
    def is_dir(self) -> bool:
        return not self.whiteout and self.entry.type == DIR

    @property
    def is_reg(self) -> bool:
        return not self.whiteout and self.entry.type == REG


class LayerTree:
    """Read-only overlay view of a `Toc`. Thread-safe.

    Directory listings are kept in an LRU bounded by their total number of entries
    (`listing_cache_entries`): re-listing is cheap, but keeping every listing of a 100k-entry
    layer would cost more memory than the TOC's own share allows.
    """

    def __init__(self, toc: Toc, ino_base: int, *, listing_cache_entries: int = 32768) -> None:
        self.toc = toc
        self.ino_base = ino_base
        self.listing_cache_entries = listing_cache_entries
        self._listings: OrderedDict[str, list[tuple[str, DiffNode]]] = OrderedDict()
        self._cached_entries = 0
        self._lock = threading.Lock()
        self._by_ino: list[TocEntry | None] | None = None

    # -- lookup -----------------------------------------------------------------------------

    def lookup(self, path: str) -> DiffNode:
        """The node at normalised `path` (`"a/b"`, root `""`), honouring hidden names and whiteouts."""
        if not path:
            return DiffNode("", self.toc.root)
        parent, _, base = path.rpartition("/")
        if _is_hidden_component(path, parent, base):
            raise EntryNotFound(path)
        entry = self.toc.lookup(path)
        if entry is not None:
            if parent:
                self._check_parent(parent)
            return DiffNode(path, entry)
        parent_entry = self._check_parent(parent) if parent else self.toc.root
        whiteout = self.toc.children(parent).get(WHITEOUT_PREFIX + base)
        if whiteout is None or parent_entry is None:
            raise EntryNotFound(path)
        return DiffNode(path, whiteout, whiteout=True)

    def child(self, parent: DiffNode, name: str) -> DiffNode:
        """The node `name` in directory `parent` (a LOOKUP: the parent is known to be visible)."""
        if not parent.is_dir:
            raise NotADirectory(parent.path)
        if name.startswith(WHITEOUT_PREFIX) or (not parent.path and name in HIDDEN_AT_ROOT):
            raise EntryNotFound(name)
        path = f"{parent.path}/{name}" if parent.path else name
        entry = self.toc.lookup(path)
        if entry is not None:
            return DiffNode(path, entry)
        prefix = f"{parent.path}/" if parent.path else ""
        whiteout = self.toc.lookup(prefix + WHITEOUT_PREFIX + name)
        if whiteout is None:
            raise EntryNotFound(path)
        return DiffNode(path, whiteout, whiteout=True)

    def node_for_ino(self, entry_ino: int) -> DiffNode:
        """The node whose inode number is `ino_base + entry_ino` (`EntryNotFound` if none is visible:
        the kernel only holds numbers we gave it, so that means another layer had the number)."""
        if entry_ino == self.toc.root.ino:
            return DiffNode("", self.toc.root)
        index = self._by_ino
        if index is None:
            index = self._build_index()
        entry = index[entry_ino] if 0 <= entry_ino < len(index) else None
        if entry is None:
            raise EntryNotFound(f"no entry with inode {entry_ino}")
        parent, _, base = entry.name.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):  # only ever handed out as the whiteout it stands for
            path = f"{parent}/{base[len(WHITEOUT_PREFIX):]}" if parent else base[len(WHITEOUT_PREFIX):]
            return DiffNode(path, entry, whiteout=True)
        return DiffNode(entry.name, entry)

    def _build_index(self) -> list[TocEntry | None]:
        """Entries by inode number: one pass over the TOC (about 10 ms per 100,000 entries), and
        one list slot per entry (8 bytes) for the life of the layer."""
        with self._lock:
            if self._by_ino is None:
                index: list[TocEntry | None] = [None] * (len(self.toc) + 2)
                for _, entry in self.toc.entries():
                    if entry.ino >= len(index):
                        index.extend([None] * (entry.ino + 1 - len(index)))
                    index[entry.ino] = entry
                self._by_ino = index
            return self._by_ino

    def _check_parent(self, parent: str) -> TocEntry:
        """Every ancestor must be a visible directory; a path through a file is ENOTDIR."""
        components = parent.split("/")
        if components[0] in HIDDEN_AT_ROOT or any(c.startswith(WHITEOUT_PREFIX) for c in components):
            raise EntryNotFound(parent)
        entry = self.toc.lookup(parent)
        if entry is None:
            raise EntryNotFound(parent)
        if entry.type != DIR:
            raise NotADirectory(parent)
        return entry

    # -- listing ----------------------------------------------------------------------------

    def listdir(self, path: str) -> list[tuple[str, DiffNode]]:
        """Visible children of directory `path`, sorted by name (cached: the tree is immutable)."""
        with self._lock:
            listing = self._listings.get(path)
            if listing is not None:
                self._listings.move_to_end(path)
                return listing
        node = self.lookup(path)
        if not node.is_dir:
            raise NotADirectory(path)
        children = self.toc.children(path)
        prefix = f"{path}/" if path else ""
        out: dict[str, DiffNode] = {}
        for name, entry in children.items():
            if not path and name in HIDDEN_AT_ROOT:
                continue
            if name.startswith(WHITEOUT_PREFIX):
                target = name[len(WHITEOUT_PREFIX):]
                if name == OPAQUE_MARKER or not target or target in children:
                    continue
                if target.startswith(WHITEOUT_PREFIX) or (not path and target in HIDDEN_AT_ROOT):
                    continue
                out[target] = DiffNode(prefix + target, entry, whiteout=True)
            else:
                out[name] = DiffNode(prefix + name, entry)
        listing = sorted(out.items())
        if len(listing) <= self.listing_cache_entries:
            with self._lock:
                if path not in self._listings:
                    self._listings[path] = listing
                    self._cached_entries += len(listing)
                while self._cached_entries > self.listing_cache_entries:
                    _, dropped = self._listings.popitem(last=False)
                    self._cached_entries -= len(dropped)
        return listing

    # -- attributes -------------------------------------------------------------------------

    def attr(self, node: DiffNode, view: int = 0) -> Attr:
        """The node's attributes; `view` is or'ed into its node id (`fs.inodes.VIEW_BIT`)."""
        e = node.entry
        ino = self.ino_base + e.ino
        if node.whiteout:
            return Attr(ino=ino, mode=stat.S_IFCHR, nlink=1, mtime_ns=e.mtime_ns, rdev=0, nodeid=ino | view)
        size = e.size if e.type == REG else len(e.link_name.encode("utf-8", "surrogateescape")) if e.type == SYMLINK else 0
        rdev = os.makedev(e.dev_major, e.dev_minor) if e.type in (CHAR, BLOCK) else 0
        return Attr(
            ino=ino,
            mode=_TYPE_BITS[e.type] | (e.mode & 0o7777),
            nlink=max(e.nlink, 1),
            uid=e.uid,
            gid=e.gid,
            size=size,
            mtime_ns=e.mtime_ns,
            rdev=rdev,
            nodeid=ino | view,
        )

    def xattrs(self, node: DiffNode) -> Mapping[str, bytes]:
        """Decoded TOC xattrs, plus the opaque markers when the directory holds `.wh..wh..opq`."""
        if node.whiteout:
            return {}
        if node.is_dir and OPAQUE_MARKER in self.toc.children(node.path):
            merged = dict(node.entry.xattrs)
            for name in OPAQUE_XATTRS:
                merged[name] = OPAQUE_VALUE
            return merged
        return node.entry.xattrs

    def getxattr(self, node: DiffNode, name: str) -> bytes:
        value = self.xattrs(node).get(name)
        if value is None:
            raise NoSuchAttribute(name)
        return value


def _is_hidden_component(path: str, parent: str, base: str) -> bool:
    if base.startswith(WHITEOUT_PREFIX):
        return True
    if not parent and base in HIDDEN_AT_ROOT:
        return True
    return False
