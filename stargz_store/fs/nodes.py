"""The nodes of the mount: one class per kind of node, each answering for itself.

    Root                 /                                  lists resolved references (root only: 0711)
    PoolLink             /pool                              symlink to `<root>/pool`
    RefDir               /<base64(ref)>/                    exists for any valid reference
    RefFile              /<base64(ref)>/manifest, config    the image's manifest and config (0400)
    LayerDir             /<base64(ref)>/<digest>/           exists for any digest; `use`, `rmdir` notify
    LayerFile            /<base64(ref)>/<digest>/info, blob the `info` JSON for this key, the raw blob (0400)
    DiffEntry            /<base64(ref)>/<digest>/diff/...   a node of the layer's tree (`LayerTree`)

A node is made once, at the LOOKUP that finds it, and then answers every request naming its id
(store nodes are kept in `inodes.NodeTable`; a `DiffEntry` is found again from its id alone).
Names are checked when a node is made (`InvalidName`), so a node is always valid; who may ask
(`admit`) is checked at every request, because a node made for root may later be asked about by
another user (see `model`). Every answer that is not the node's own business is refused here,
once, by the base class.
"""
from __future__ import annotations

import base64
import binascii
import logging
import re
import stat
from typing import Callable, Mapping

from ..formats.toc import SYMLINK, TocEntry
from ..logs import Throttled
from .attrs import Attr, dir_attr, file_attr
from .caller import Caller
from .errors import (
    EntryNotFound,
    FsError,
    InvalidName,
    IsADirectory,
    LayerUnavailable,
    NotADirectory,
    NotASymlink,
    PermissionDenied,
    ReadOnly,
)
from .idmap import ROOTFUL, Ownership
from .inodes import ROOT_ID, store_nodeid
from .layer_tree import DiffNode
from .provider import ImageFiles, LayerProvider, ServedLayer
from .recorder import AccessRecorder

log = logging.getLogger(__name__)
_repeated = Throttled(log)  # per-request warnings: once per cause and minute

POOL_LINK = "pool"
DIFF, INFO, BLOB, USE = "diff", "info", "blob", "use"
MANIFEST, CONFIG = "manifest", "config"
LAYER_FILES = (BLOB, DIFF, INFO)
ROOT_DIR_MODE = 0o711  # anyone may walk through to an image they name; only root lists them
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")
_NO_XATTRS: Mapping[str, bytes] = {}

Listing = list[tuple[str, Attr | None]]


class Scope:
    """What every node may need of the model: the provider, the `pool` link's target, how a ref
    directory name decodes, who to tell when a layer is released, how owners are shown and the
    first-read recorder (`StoreModel` makes one)."""

    def __init__(
        self,
        provider: LayerProvider,
        pool_target: str | None,
        decode_ref: Callable[[str], str],
        on_released: Callable[[int, str], None],
        ownership: Ownership = ROOTFUL,
        recorder: AccessRecorder | None = None,
    ) -> None:
        self.provider = provider
        self.pool_target = pool_target
        self.decode_ref = decode_ref
        self.on_released = on_released
        self.ownership = ownership
        self._refused: dict[tuple[str, str], str] = {}
        self.recorder = recorder if recorder is not None else AccessRecorder()

    def servable_layer(self, ref: str, key: str) -> ServedLayer:
        """`provider.layer`, refused (`LayerUnavailable`, logged once per layer) when its owners
        cannot be shown through the id maps: never with the wrong owners."""
        served = self.provider.layer(ref, key)
        if not self.ownership.maps_ids:
            return served
        problem = self.ownership.problem(served.tree.toc.uids(), served.tree.toc.gids())
        if problem is not None:
            if len(self._refused) > 4096:  # bounded: only the once-only log line depends on it
                self._refused.clear()
            if self._refused.setdefault((ref, key), problem) is problem:
                log.warning("not serving layer %s of %s: %s", key, ref, problem)
            raise LayerUnavailable(f"layer {key} of {ref}: {problem}")
        return served


class Opened:
    """What a file handle reads from (a snapshot of small files, or the open layer)."""

    def read(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def find_backing(self) -> None:
        """The kernel may read this file from a backing file (passthrough): find it, if it has one."""

    def backing_fd(self) -> int | None:
        """A checked read-only descriptor of the backing file found (the caller closes it), if any."""
        return None

    def close(self) -> None:
        """The handle is released."""


class BytesOpened(Opened):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


class Node:
    """A node; the defaults refuse what does not apply. `key` names a store node (its id
    follows from it); `nodeid` is what the kernel calls it."""

    __slots__ = ("nodeid",)
    key: tuple[str, ...] = ()

    def admit(self, caller: Caller) -> None:
        """Raise `PermissionDenied` if `caller` may not ask about this node."""

    def attr(self) -> Attr:
        raise NotImplementedError

    def lookup(self, name: str) -> Node:
        raise NotADirectory(name)

    def listing(self) -> Listing:
        raise NotADirectory(self.describe())

    def readlink(self) -> str:
        raise NotASymlink(self.describe())

    def xattrs(self) -> Mapping[str, bytes]:
        return _NO_XATTRS

    def open(self) -> Opened:
        raise IsADirectory(self.describe())

    def read(self, offset: int, size: int) -> bytes:
        """A read without a handle (the kernel sends none once OPEN was declined: `no_open`)."""
        opened = self.open()
        try:
            return opened.read(offset, size)
        finally:
            opened.close()

    def create(self, name: str, caller: Caller) -> None:
        self.check_name(name)
        raise ReadOnly(name)

    def rmdir(self, name: str, caller: Caller) -> None:
        self.check_name(name)
        raise ReadOnly(name)

    def check_name(self, name: str) -> None:
        """Refuse a name that can never exist here (`InvalidName`), as a lookup would."""

    def held(self) -> None:
        """The kernel holds this node now (its first lookup)."""

    def let_go(self) -> None:
        """The kernel forgot this node."""

    def describe(self) -> str:
        return "/".join(self.key) or "/"


class StoreNode(Node):
    """A node of the store's own tree: its id is a hash of its key (`inodes.store_nodeid`)."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[str, ...]) -> None:
        self.key = key
        self.nodeid = store_nodeid(key)


class Root(Node):
    __slots__ = ("scope",)
    key = ()

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.nodeid = ROOT_ID

    def attr(self) -> Attr:
        return dir_attr(ROOT_ID, mode=ROOT_DIR_MODE)

    def lookup(self, name: str) -> Node:
        if name == POOL_LINK and self.scope.pool_target is not None:
            return PoolLink(self.scope.pool_target)
        return RefDir(self.scope, name, self.scope.decode_ref(name))

    def listing(self) -> Listing:
        names = [base64.b64encode(r.encode()).decode("ascii") for r in self.scope.provider.known_refs()]
        if self.scope.pool_target is not None:
            names.append(POOL_LINK)
        return [(n, None) for n in sorted(set(names))]

    def check_name(self, name: str) -> None:
        self.lookup(name)


class PoolLink(StoreNode):
    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        super().__init__((POOL_LINK,))
        self.target = target

    def attr(self) -> Attr:
        return Attr(ino=self.nodeid, mode=stat.S_IFLNK | 0o400, size=len(self.target.encode()))

    def readlink(self) -> str:
        return self.target


class _InImage(StoreNode):
    """A node below a reference directory: non-root callers may only ask about images root has
    resolved already (and, below a layer directory, about layer keys the image lists)."""

    __slots__ = ("scope", "provider", "ref", "layer_key")

    def __init__(self, key: tuple[str, ...], scope: Scope, ref: str, layer_key: str = "") -> None:
        super().__init__(key)
        self.scope = scope
        self.provider = scope.provider
        self.ref = ref
        self.layer_key = layer_key

    def admit(self, caller: Caller) -> None:
        if not caller.privileged and not self.provider.resolved(self.ref, self.layer_key):
            key = f" {self.layer_key}" if self.layer_key else ""
            raise PermissionDenied(f"uid {caller.uid} may not resolve {self.ref}{key}")


class RefDir(_InImage):
    __slots__ = ("name",)

    def __init__(self, scope: Scope, name: str, ref: str) -> None:
        super().__init__(("ref", name), scope, ref)
        self.name = name

    def attr(self) -> Attr:
        return dir_attr(self.nodeid)  # resolves nothing: podman's next lookup (a layer's) does

    def lookup(self, name: str) -> Node:
        if name in (MANIFEST, CONFIG):
            return RefFile(self, name)
        if _DIGEST_RE.match(name) is None:
            raise InvalidName(f"{name!r} is not a layer digest")
        return LayerDir(self, name)

    def listing(self) -> Listing:
        try:
            files = self.provider.image_files(self.ref)
        except FsError as e:
            log.debug("listing %s: %s", self.ref, e)
            return []
        return [(n, None) for n in (CONFIG, MANIFEST, *sorted(files.layer_keys))]

    def check_name(self, name: str) -> None:
        self.lookup(name)

    def rmdir(self, name: str, caller: Caller) -> None:
        """rmdir of a layer directory is the release notification (root only): count it and
        answer ENOENT. Once nothing holds the layer by notification any more, the kernel is
        asked to forget the directory (`StoreModel.on_released`), so its hold ends too."""
        node = self.lookup(name)
        if not isinstance(node, LayerDir):
            raise ReadOnly(name)
        node.admit(caller)
        _require_privileged(caller, name)
        if self.provider.release(self.ref, name):
            self.scope.on_released(self.nodeid, name)
        raise EntryNotFound(name)


class RefFile(_InImage):
    __slots__ = ("which",)

    def __init__(self, parent: RefDir, which: str) -> None:
        super().__init__(("ref", parent.name, which), parent.scope, parent.ref)
        self.which = which

    def _data(self) -> bytes:
        files: ImageFiles = self.provider.image_files(self.ref)
        return files.manifest if self.which == MANIFEST else files.config

    def attr(self) -> Attr:
        return file_attr(self.nodeid, len(self._data()))

    def open(self) -> Opened:
        return BytesOpened(self._data())  # the bytes of this open, even if the tag moves meanwhile


class LayerDir(_InImage):
    """`<ref>/<digest>`: exists for any digest, without resolving anything, so that `use` and
    `rmdir` work for layers never resolved (and after a restart). While the kernel holds it,
    its layer stays open (`held`)."""

    __slots__ = ("ref_name",)

    def __init__(self, parent: RefDir, digest: str) -> None:
        super().__init__(("layer", parent.name, digest), parent.scope, parent.ref, digest)
        self.ref_name = parent.name

    def attr(self) -> Attr:
        return dir_attr(self.nodeid, nlink=3)

    def lookup(self, name: str) -> Node:
        if name == DIFF:
            served = self.scope.servable_layer(self.ref, self.layer_key)
            self.scope.recorder.layer_opened(self.ref, served.blob_digest)
            view = served.view_of(self.layer_key)
            return DiffEntry(self.scope, served, view, served.tree.node_for_ino(served.tree.toc.root.ino))
        if name in (INFO, BLOB):
            return LayerFile(self, name)
        raise EntryNotFound(name)

    def listing(self) -> Listing:
        return [(n, None) for n in LAYER_FILES]

    def create(self, name: str, caller: Caller) -> None:
        """`use` is the use notification (root only): count it and answer ENOENT."""
        if name != USE:
            raise ReadOnly(name)
        _require_privileged(caller, self.describe())
        self.provider.use(self.ref, self.layer_key)
        raise EntryNotFound(name)

    def held(self) -> None:
        self.provider.pin(self.ref, self.layer_key)

    def let_go(self) -> None:
        self.provider.unpin(self.ref, self.layer_key)


class LayerFile(_InImage):
    __slots__ = ("which",)

    def __init__(self, parent: LayerDir, which: str) -> None:
        super().__init__(("layer", parent.ref_name, parent.layer_key, which), parent.scope, parent.ref,
                         parent.layer_key)
        self.which = which

    def _served(self) -> ServedLayer:
        return self.scope.servable_layer(self.ref, self.layer_key)

    def attr(self) -> Attr:
        served = self._served()
        size = len(served.info_for(self.layer_key)) if self.which == INFO else served.layer.blob_size
        return file_attr(self.nodeid, size)

    def open(self) -> Opened:
        served = self._served()
        if self.which == INFO:
            return BytesOpened(served.info_for(self.layer_key))
        return LayerOpened(self.provider, served.number, None, blob=True)


class DiffEntry(Node):
    """A node of a layer's tree, shown under one of the layer's keys (`view`)."""

    __slots__ = ("scope", "served", "view", "node")

    def __init__(self, scope: Scope, served: ServedLayer, view: int, node: DiffNode) -> None:
        self.scope = scope
        self.served = served
        self.view = view
        self.node = node

    @property
    def nodeid(self) -> int:  # type: ignore[override]
        return (self.served.tree.ino_base + self.node.entry.ino) | self.view

    @property
    def key(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("diff", self.served.ref, self.served.key_of(self.view), self.node.path)

    def admit(self, caller: Caller) -> None:
        served = self.served
        if not caller.privileged and not self.scope.provider.resolved(served.ref, served.key_of(self.view)):
            raise PermissionDenied(f"uid {caller.uid} may not resolve {served.ref}")

    def attr(self) -> Attr:
        return self.served.tree.attr(self.node, self.view)

    def lookup(self, name: str) -> Node:
        return DiffEntry(self.scope, self.served, self.view, self.served.tree.child(self.node, name))

    def listing(self) -> Listing:
        tree, view = self.served.tree, self.view
        return [(name, tree.attr(node, view)) for name, node in tree.listdir(self.node.path)]

    def readlink(self) -> str:
        node = self.node
        if node.whiteout or node.entry.type != SYMLINK:
            raise NotASymlink(node.path)
        return node.entry.link_name

    def xattrs(self) -> Mapping[str, bytes]:
        return self.served.tree.xattrs(self.node)

    def open(self) -> Opened:
        node = self.node
        if node.is_dir:
            raise IsADirectory(node.path)
        return LayerOpened(self.scope.provider, self.served.number, node.entry if node.is_reg else None)

    def read_held(self, offset: int, size: int) -> bytes:
        """A read while the caller holds the layer (`LayerProvider.hold`)."""
        node = self.node
        if node.is_dir:
            raise IsADirectory(node.path)
        if not node.is_reg:
            return b""  # devices, FIFOs, symlinks, whiteouts: no data through read
        return read_layer(self.served, node.entry, offset, size)

    def describe(self) -> str:
        return f"{self.served.ref} {self.served.key_of(self.view)} diff/{self.node.path}"


class LayerOpened(Opened):
    """Reads of a layer's regular file `entry`, or of its `blob`, or of a node without data
    (neither: devices, FIFOs, symlinks, whiteouts read as empty). The layer is held open while
    the handle is (`LayerProvider.hold`)."""

    def __init__(self, provider: LayerProvider, number: int, entry: TocEntry | None, *, blob: bool = False) -> None:
        self.provider = provider
        self.served = provider.hold(number)
        self.entry = entry
        self.blob = blob
        self.backing: object | None = None
        self.wants_backing = False

    def read(self, offset: int, size: int) -> bytes:
        if self.entry is None and not self.blob:
            return b""
        return read_layer(self.served, self.entry, offset, size)

    def find_backing(self) -> None:
        """A regular file whose every byte is cached has a backing file (`layer.backing`); one
        without gets offered for one (now, and again at its release)."""
        layer, entry = self.served.layer, self.entry
        if entry is None or not hasattr(layer, "backing_file"):
            return
        self.wants_backing = True
        self.backing = layer.backing_file(entry)
        if self.backing is None:
            layer.offer_backing(entry)

    def backing_fd(self) -> int | None:
        if self.backing is None or self.entry is None:
            return None
        fd = self.served.layer.open_backing(self.backing, self.entry)
        if fd is None:
            self.backing = None  # damaged or gone: served by chunks, and made again
        return fd

    def close(self) -> None:
        if self.wants_backing and self.backing is None and self.entry is not None:
            self.served.layer.offer_backing(self.entry)  # its reads may have completed it
        self.provider.let_go(self.served)


def read_layer(served: ServedLayer, entry: TocEntry | None, offset: int, size: int) -> bytes:
    """Bytes `[offset, offset+size)` of `entry` (None: of the blob), clipped to its size. Layer
    failures become `LayerUnavailable` (EIO) with the cause logged, never a crash."""
    layer = served.layer
    if entry is None:
        end = min(layer.blob_size, offset + size)
        if offset >= end:
            return b""
        read: Callable[[int, int], bytes] = layer.read_blob
    else:
        end = min(entry.size, offset + size)
        if offset >= end:
            return b""
        read = lambda o, n: layer.read(entry, o, n)  # noqa: E731
    try:
        return read(offset, end - offset)
    except FsError:
        raise
    except Exception as e:  # LayerReadError and anything unexpected must become EIO
        _repeated.warning((layer.blob_digest, type(e).__name__), "read failed at offset %d (+%d): %s", offset,
                          end - offset, e)
        raise LayerUnavailable(str(e)) from e


def _require_privileged(caller: Caller, what: str) -> None:
    """Notifications pin layers in memory: only root sends them (the kernel already refuses
    others, who have no write access to store directories; this holds without it too)."""
    if not caller.privileged:
        raise PermissionDenied(f"uid {caller.uid} may not send notifications ({what})")


def decode_ref_name(name: str) -> str:
    """The reference text of a ref directory name: strict, canonical standard base64 of UTF-8."""
    try:
        raw = base64.b64decode(name.encode("ascii"), validate=True)
        if base64.b64encode(raw).decode("ascii") != name:
            raise ValueError("non-canonical base64")
        return raw.decode("utf-8")
    except (UnicodeError, ValueError, binascii.Error):
        raise InvalidName(f"{name!r} is not a base64-encoded image reference") from None


__all__ = ["BLOB", "CONFIG", "DIFF", "INFO", "MANIFEST", "POOL_LINK", "USE", "DiffEntry", "LayerDir", "LayerFile",
           "Node", "Opened", "PoolLink", "RefDir", "RefFile", "Root", "Scope", "decode_ref_name"]
