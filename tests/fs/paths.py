"""The inode-based `StoreModel` asked by path, the way the kernel asks it.

`PathModel` walks a path with one LOOKUP per component it has not looked up before (the kernel's
dentry cache: it remembers what it looked up, and a later walk of the same names sends nothing),
then sends the request for the node it reached. `forget_all()` is the kernel dropping its caches
(`echo 3 > drop_caches`): a FORGET for every node, with its lookup count. An open file keeps its
node as the kernel does. So model tests read like path-based ones and still drive exactly what a
mount drives.
"""
from __future__ import annotations

from stargz_store.fs.attrs import Attr
from stargz_store.fs.caller import Caller
from stargz_store.fs.inodes import ROOT_ID
from stargz_store.fs.model import StoreModel


class PathModel:
    def __init__(self, model: StoreModel) -> None:
        self.model = model
        self._ids: dict[str, int] = {"": ROOT_ID}  # path -> node id looked up
        self._lookups: dict[int, int] = {}  # node id -> lookups not yet forgotten
        self._open: dict[int, int] = {}  # handle -> node id

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def nodeid(self, path: str, caller: Caller) -> int:
        """The node id of `path`, looking up each component not looked up yet."""
        parts = [p for p in path.strip("/").split("/") if p]
        walked = ""
        node = ROOT_ID
        for part in parts:
            walked = f"{walked}/{part}"
            known = self._ids.get(walked)
            if known is None:
                known = self.model.lookup(node, part, caller=caller).nodeid
                self._ids[walked] = known
                self._lookups[known] = self._lookups.get(known, 0) + 1
            node = known
        return node

    def forget_all(self) -> None:
        """The kernel drops its caches: every node looked up is forgotten (open files keep theirs)."""
        held = set(self._open.values())
        for path, nodeid in list(self._ids.items()):
            if nodeid in held or not path:
                continue
            del self._ids[path]
            count = self._lookups.pop(nodeid, 0)
            if count:
                self.model.forget(nodeid, count)

    def getattr(self, path: str, *, caller: Caller) -> Attr:
        return self.model.getattr(self.nodeid(path, caller), caller=caller)

    def readdir(self, path: str, *, caller: Caller) -> list[tuple[str, Attr | None]]:
        return self.model.readdir(self.nodeid(path, caller), caller=caller)

    def readlink(self, path: str, *, caller: Caller) -> str:
        return self.model.readlink(self.nodeid(path, caller), caller=caller)

    def listxattr(self, path: str, *, caller: Caller) -> list[str]:
        return self.model.listxattr(self.nodeid(path, caller), caller=caller)

    def getxattr(self, path: str, name: str, *, caller: Caller) -> bytes:
        return self.model.getxattr(self.nodeid(path, caller), name, caller=caller)

    def open(self, path: str, flags: int = 0, *, caller: Caller) -> int:
        nodeid = self.nodeid(path, caller)
        fh = self.model.open(nodeid, flags, caller=caller)
        self._open[fh] = nodeid
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self.model.read(self._open.get(fh, 0), fh, offset, size, caller=Caller(0))

    def release(self, fh: int) -> None:
        self._open.pop(fh, None)
        self.model.release(fh)

    def check_open(self, path: str, flags: int = 0, *, caller: Caller) -> None:
        """What an open would refuse (EROFS, EISDIR, ENOENT...), without keeping it open."""
        self.release(self.open(path, flags, caller=caller))

    def read_path(self, path: str, offset: int, size: int, *, caller: Caller) -> bytes:
        """A read of a file the kernel opened without an OPEN (no_open): by node id, no handle."""
        return self.model.read(self.nodeid(path, caller), 0, offset, size, caller=caller)

    def create(self, path: str, *, caller: Caller) -> None:
        parent, _, name = path.rstrip("/").rpartition("/")
        self.model.create(self.nodeid(parent, caller), name, caller=caller)

    def rmdir(self, path: str, *, caller: Caller) -> None:
        parent, _, name = path.rstrip("/").rpartition("/")
        self.nodeid(path, caller)  # the kernel looks the victim up first: it must exist
        self.model.rmdir(self.nodeid(parent, caller), name, caller=caller)
