"""The Additional Layer Store tree, free of FUSE: paths in, `Attr`/bytes/typed errors out.

Layout (additional-layer-store.md §2, §9.1), with the modes the kernel enforces (the mount has
`default_permissions`; every store node is owned by root)::

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
is EACCES before any registry request or any bookkeeping (`_parse`). The notifications need
write access to their directory, which only root has.

Ref and layer directories exist as soon as their names are valid, without any registry access, so
that `use` and `rmdir` work for layers that were never resolved (and after a restart). Resolving
happens at the lookup of `diff`, `info`, `blob`, `manifest` and `config`.

The model talks to a `LayerProvider` (the daemon's image pool) for everything that needs the
registry, and to `ServedLayer` objects for data.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Protocol

from ..formats.toc import SYMLINK, TocEntry
from .attrs import Attr, dir_attr, file_attr
from .caller import Caller
from .errors import (
    BadHandle,
    EntryNotFound,
    FsError,
    InvalidName,
    IsADirectory,
    LayerUnavailable,
    NoSuchAttribute,
    NotADirectory,
    NotASymlink,
    PermissionDenied,
    ReadOnly,
)
from .layer_tree import DiffNode, LayerTree

log = logging.getLogger(__name__)

ROOT_INO = 1
POOL_LINK = "pool"
DIFF, INFO, BLOB, USE = "diff", "info", "blob", "use"
MANIFEST, CONFIG = "manifest", "config"
LAYER_FILES = (BLOB, DIFF, INFO)
ROOT_DIR_MODE = 0o711  # anyone may walk through to an image they name; only root lists them
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")


class LayerData(Protocol):
    """What the model needs from a resolved layer (`stargz_store.layer.layer.Layer`)."""

    blob_size: int

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes: ...

    def read_blob(self, offset: int, size: int) -> bytes: ...


class ServedLayer:
    """A resolved layer as the filesystem serves it: data, overlay tree, per-key `info` JSON.

    `open_count` is the number of open file handles on it; the pool does not release a layer's
    memory while it is non-zero. `infos` may be any mapping (the pool passes one that builds the
    JSON on first use: its uid/gid sets take a pass over the whole TOC); a plain dict is copied.
    """

    def __init__(self, layer: LayerData, tree: LayerTree, infos: Mapping[str, bytes]) -> None:
        self.layer = layer
        self.tree = tree
        self.infos: Mapping[str, bytes] = dict(infos) if isinstance(infos, dict) else infos
        self.open_count = 0
        self._lock = threading.Lock()

    def info_for(self, key: str) -> bytes:
        info = self.infos.get(key)
        if info is None:
            raise EntryNotFound(f"no info for key {key}")
        return info

    def opened(self) -> None:
        with self._lock:
            self.open_count += 1

    def closed(self) -> None:
        with self._lock:
            self.open_count = max(0, self.open_count - 1)


@dataclass(frozen=True)
class ImageFiles:
    """The human-readable files of a ref directory and the layer keys it knows."""

    manifest: bytes
    config: bytes
    layer_keys: tuple[str, ...] = ()


class LayerProvider(Protocol):
    """The image pool, seen from the filesystem. Blocking calls are bounded by the pool's timeout."""

    def canonical_ref(self, text: str) -> str:
        """Validate a decoded reference string; returns the cache key. Raises `InvalidName`.
        Records nothing: any caller's name goes through it."""

    def resolved(self, ref: str, key: str = "") -> bool:
        """Whether the image is resolved now (and, with `key`, lists that layer key): answering
        about it needs no new registry metadata. What a non-root caller may look at."""

    def warm(self, ref: str) -> None:
        """Start resolving the image in the background (no wait, no error)."""

    def image_files(self, ref: str) -> ImageFiles:
        """Resolve the image (blocking). Raises `EntryNotFound` / `LayerUnavailable`."""

    def layer(self, ref: str, key: str) -> ServedLayer:
        """Resolve one layer by blob or TOC digest (blocking). Raises `EntryNotFound` / `LayerUnavailable`."""

    def use(self, ref: str, key: str) -> None: ...

    def release(self, ref: str, key: str) -> None: ...

    def known_refs(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class _Path:
    """A parsed store path. `kind` is one of root, ref, ref_file, layer, layer_file, diff."""

    kind: str
    ref: str = ""
    ref_name: str = ""
    key: str = ""
    name: str = ""  # ref_file / layer_file name, or the path inside diff


@dataclass
class _Handle:
    data: bytes | None = None
    served: ServedLayer | None = None
    entry: TocEntry | None = None  # None with `served` set = the blob
    is_blob: bool = False


class StoreModel:
    """Answers filesystem questions for the whole mount. Thread-safe."""

    def __init__(self, provider: LayerProvider, *, pool_target: str | None = None, log_file_access: bool = False) -> None:
        self.provider = provider
        self.pool_target = pool_target
        self.log_file_access = log_file_access
        self._accessed: set[int] = set()
        self._small_inos: dict[tuple[str, ...], int] = {}
        self._next_small_ino = itertools.count(ROOT_INO + 1)
        self._handles: dict[int, _Handle] = {}
        self._next_handle = itertools.count(1)
        self._lock = threading.Lock()
        self._decode = lru_cache(maxsize=4096)(self._decode_ref_name)

    # -- path parsing -----------------------------------------------------------------------

    def _decode_ref_name(self, name: str) -> str:
        try:
            raw = base64.b64decode(name.encode("ascii"), validate=True)
            if base64.b64encode(raw).decode("ascii") != name:
                raise ValueError("non-canonical base64")
            text = raw.decode("utf-8")
        except (UnicodeError, ValueError, binascii.Error):
            raise InvalidName(f"{name!r} is not a base64-encoded image reference") from None
        return self.provider.canonical_ref(text)

    def _parse(self, path: str, caller: Caller) -> _Path:
        """Parse `path` and admit `caller` to it (see the module docstring: root may resolve
        anything, others only look at what is resolved already)."""
        p = self._parse_name(path)
        if p.ref and not caller.privileged and not self.provider.resolved(p.ref, p.key):
            raise PermissionDenied(f"uid {caller.uid} may not resolve {p.ref}{' ' + p.key if p.key else ''}")
        return p

    def _parse_name(self, path: str) -> _Path:
        parts = path.strip("/").split("/", 3) if path not in ("", "/") else []
        if not parts:
            return _Path("root")
        if parts[0] == POOL_LINK and self.pool_target is not None:
            if len(parts) > 1:
                raise NotADirectory(path)
            return _Path("pool")
        ref = self._decode(parts[0])
        if len(parts) == 1:
            return _Path("ref", ref, parts[0])
        second = parts[1]
        if _DIGEST_RE.match(second) is None:
            if second in (MANIFEST, CONFIG) and len(parts) == 2:
                return _Path("ref_file", ref, parts[0], name=second)
            if second in (MANIFEST, CONFIG):
                raise NotADirectory(path)
            raise InvalidName(f"{second!r} is not a layer digest")
        if len(parts) == 2:
            return _Path("layer", ref, parts[0], second)
        third = parts[2]
        if third == DIFF:
            return _Path("diff", ref, parts[0], second, parts[3] if len(parts) == 4 else "")
        if third in (INFO, BLOB, USE):
            if len(parts) == 4:
                raise NotADirectory(path)
            return _Path("layer_file", ref, parts[0], second, third)
        raise EntryNotFound(path)

    def _small_ino(self, *key: str) -> int:
        ino = self._small_inos.get(key)
        if ino is None:
            with self._lock:
                ino = self._small_inos.get(key)
                if ino is None:
                    ino = next(self._next_small_ino)
                    self._small_inos[key] = ino
        return ino

    # -- metadata ---------------------------------------------------------------------------

    def getattr(self, path: str, *, caller: Caller) -> Attr:
        p = self._parse(path, caller)
        if p.kind == "root":
            return dir_attr(ROOT_INO, mode=ROOT_DIR_MODE)
        if p.kind == "pool":
            target = (self.pool_target or "").encode()
            return Attr(ino=self._small_ino(POOL_LINK), mode=stat.S_IFLNK | 0o400, size=len(target))
        if p.kind == "ref":
            self.provider.warm(p.ref)
            return dir_attr(self._small_ino(p.ref))
        if p.kind == "ref_file":
            files = self.provider.image_files(p.ref)
            data = files.manifest if p.name == MANIFEST else files.config
            return file_attr(self._small_ino(p.ref, p.name), len(data))
        if p.kind == "layer":
            return dir_attr(self._small_ino(p.ref, p.key), nlink=3)
        if p.kind == "layer_file":
            if p.name == USE:
                raise EntryNotFound(path)
            served = self.provider.layer(p.ref, p.key)
            size = len(served.info_for(p.key)) if p.name == INFO else served.layer.blob_size
            return file_attr(self._small_ino(p.ref, p.key, p.name), size)
        served = self.provider.layer(p.ref, p.key)
        return served.tree.attr(served.tree.lookup(p.name))

    def readdir(self, path: str, *, caller: Caller) -> list[tuple[str, Attr | None]]:
        """Names in a directory with their attributes where cheap (None: ask getattr)."""
        p = self._parse(path, caller)
        if p.kind == "root":
            names = [base64.b64encode(r.encode()).decode("ascii") for r in self.provider.known_refs()]
            if self.pool_target is not None:
                names.append(POOL_LINK)
            return [(n, None) for n in sorted(set(names))]
        if p.kind == "ref":
            try:
                files = self.provider.image_files(p.ref)
            except FsError as e:
                log.debug("listing %s: %s", p.ref, e)
                return []
            return [(n, None) for n in (CONFIG, MANIFEST, *sorted(files.layer_keys))]
        if p.kind == "layer":
            return [(n, None) for n in LAYER_FILES]
        if p.kind == "diff":
            served = self.provider.layer(p.ref, p.key)
            tree = served.tree
            return [(name, tree.attr(node)) for name, node in tree.listdir(p.name)]
        raise NotADirectory(path)

    def readlink(self, path: str, *, caller: Caller) -> str:
        p = self._parse(path, caller)
        if p.kind == "pool":
            return self.pool_target or ""
        if p.kind != "diff":
            raise NotASymlink(path)
        node = self._diff_node(p)
        if node.whiteout or node.entry.type != SYMLINK:
            raise NotASymlink(path)
        return node.entry.link_name

    def listxattr(self, path: str, *, caller: Caller) -> list[str]:
        p = self._parse(path, caller)
        if p.kind != "diff":
            return []
        served = self.provider.layer(p.ref, p.key)
        return list(served.tree.xattrs(served.tree.lookup(p.name)))

    def getxattr(self, path: str, name: str, *, caller: Caller) -> bytes:
        p = self._parse(path, caller)
        if p.kind != "diff":
            raise NoSuchAttribute(name)
        served = self.provider.layer(p.ref, p.key)
        return served.tree.getxattr(served.tree.lookup(p.name), name)

    def statfs(self) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def _diff_node(self, p: _Path) -> DiffNode:
        served = self.provider.layer(p.ref, p.key)
        return served.tree.lookup(p.name)

    # -- data -------------------------------------------------------------------------------

    def open(self, path: str, flags: int = 0, *, caller: Caller) -> int:
        """Open for reading; returns a handle for `read`. Any write access is EROFS."""
        handle = self._handle_for(path, flags, caller)
        if handle.served is not None:
            handle.served.opened()
        fh = next(self._next_handle)
        with self._lock:
            self._handles[fh] = handle
        return fh

    def check_open(self, path: str, flags: int = 0, *, caller: Caller) -> None:
        """What `open` would refuse (EROFS, EISDIR, ENOENT...), without opening."""
        self._handle_for(path, flags, caller)

    def _handle_for(self, path: str, flags: int, caller: Caller) -> _Handle:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise ReadOnly(path)
        p = self._parse(path, caller)
        if p.kind == "ref_file":
            files = self.provider.image_files(p.ref)
            return _Handle(data=files.manifest if p.name == MANIFEST else files.config)
        if p.kind == "layer_file":
            if p.name == USE:
                raise EntryNotFound(path)
            served = self.provider.layer(p.ref, p.key)
            if p.name == INFO:
                return _Handle(data=served.info_for(p.key))
            return _Handle(served=served, is_blob=True)
        if p.kind == "diff":
            served = self.provider.layer(p.ref, p.key)
            node = served.tree.lookup(p.name)
            if node.is_dir:
                raise IsADirectory(path)
            if self.log_file_access:
                self._log_first_access(served, node, p)
            return _Handle(served=served, entry=node.entry if node.is_reg else None)
        raise IsADirectory(path)

    def _log_first_access(self, served: ServedLayer, node: DiffNode, p: _Path) -> None:
        """`log_file_access`: which files a workload opens, once each (to build prefetch lists)."""
        attr = served.tree.attr(node)
        if attr.ino in self._accessed:
            return
        with self._lock:
            self._accessed.add(attr.ino)
        log.debug("first access: %s %s/%s size=%d mode=%o", p.ref, p.key, p.name, attr.size, attr.mode)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """Bytes `[offset, offset+size)` clipped to the file. Layer errors surface as `LayerUnavailable`."""
        handle = self._handles.get(fh)
        if handle is None:
            raise BadHandle(str(fh))
        return self._read_handle(handle, offset, size)

    def read_path(self, path: str, offset: int, size: int, *, caller: Caller) -> bytes:
        """`read` of a file that was never opened here: the kernel skips OPEN once the store has
        said it needs none (no_open, see `fuse_adapter`), and reads name the file by path. A layer
        released meanwhile is reopened by the lookup, so nothing needs pinning."""
        return self._read_handle(self._handle_for(path, 0, caller), offset, size)

    def _read_handle(self, handle: _Handle, offset: int, size: int) -> bytes:
        if handle.data is not None:
            return handle.data[offset : offset + size]
        served = handle.served
        assert served is not None
        if handle.is_blob:
            end = min(served.layer.blob_size, offset + size)
            if offset >= end:
                return b""
            return _layer_read(served.layer.read_blob, offset, end - offset)
        entry = handle.entry
        if entry is None:
            return b""  # devices, FIFOs, whiteouts: no data through this path
        end = min(entry.size, offset + size)
        if offset >= end:
            return b""
        return _layer_read(lambda o, n: served.layer.read(entry, o, n), offset, end - offset)

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None and handle.served is not None:
            handle.served.closed()

    # -- notifications and refused writes ---------------------------------------------------

    def create(self, path: str, *, caller: Caller) -> None:
        """`<layer>/use` is the use notification (root only): count it and answer ENOENT.
        Anything else is EROFS."""
        p = self._parse(path, caller)
        if p.kind == "layer_file" and p.name == USE:
            _require_privileged(caller, path)
            self.provider.use(p.ref, p.key)
            raise EntryNotFound(path)
        raise ReadOnly(path)

    def rmdir(self, path: str, *, caller: Caller) -> None:
        """rmdir of a layer directory is the release notification (root only): count it and
        answer ENOENT."""
        p = self._parse(path, caller)
        if p.kind == "layer":
            _require_privileged(caller, path)
            self.provider.release(p.ref, p.key)
            raise EntryNotFound(path)
        raise ReadOnly(path)

    def refuse_write(self, path: str) -> None:
        """Every other mutating operation: EROFS (names are still validated first)."""
        self._parse_name(path)
        raise ReadOnly(path)


def _require_privileged(caller: Caller, path: str) -> None:
    """Notifications pin layers in memory: only root sends them (the kernel already refuses
    others, who have no write access to store directories; this holds without it too)."""
    if not caller.privileged:
        raise PermissionDenied(f"uid {caller.uid} may not send notifications ({path})")


def _layer_read(read, offset: int, size: int) -> bytes:
    """Call a layer read, turning its failures into `LayerUnavailable` (EIO) with the cause logged."""
    try:
        data = read(offset, size)
    except FsError:
        raise
    except Exception as e:  # LayerReadError and anything unexpected must become EIO, never a crash
        log.warning("read failed at offset %d (+%d): %s", offset, size, e)
        raise LayerUnavailable(str(e)) from e
    return data
