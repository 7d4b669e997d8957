"""A small in-memory filesystem over `stargz_store.fuse`, for the session's own tests.

Also a server process for the hand-over tests: `python -m tests.fuse.memfs FD MODE [STATE_JSON]`
serves the connection FD (inherited). MODE `crash-on-read` dies without answering the first READ
of `/slow`; `resume` serves a connection initialised by another process (STATE_JSON) and asks
the kernel to resend what its predecessor had read; `serve` initialises and serves.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import sys
import threading
from dataclasses import dataclass, field

from stargz_store.fuse import ConnectionState, Context, DirEntry, FuseError, OpenReply, Session, SessionOptions
from stargz_store.fuse import abi


@dataclass(frozen=True)
class Node:
    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 1_700_000_000_123_456_789
    rdev: int = 0
    data: bytes = b""
    target: bytes = b""
    children: dict = field(default_factory=dict)
    xattrs: dict = field(default_factory=dict)
    backing: str | None = None

    @property
    def blocks(self) -> int:
        return -(-self.size // 512)

    @property
    def nodeid(self) -> int:
        return self.ino


def sample_tree(backing_file: str | None = None) -> dict[int, Node]:
    """/ (0755) with: hello (0644, "hello world\\n"), secret (0600), private/ (0700) with inner
    (0644), link -> hello, opaque/ (xattr), slow (0644), big (backing file, if given), d0..d2 with
    20 files each."""
    nodes: dict[int, Node] = {}
    root: dict[bytes, int] = {}

    def add(parent: dict, name: bytes, node: Node) -> Node:
        nodes[node.ino] = node
        parent[name] = node.ino
        return node

    inos = iter(range(2, 10_000))
    add(root, b"hello", Node(next(inos), stat.S_IFREG | 0o644, size=12, data=b"hello world\n"))
    add(root, b"secret", Node(next(inos), stat.S_IFREG | 0o600, size=7, data=b"s3cr3t\n"))
    private: dict[bytes, int] = {}
    add(root, b"private", Node(next(inos), stat.S_IFDIR | 0o700, nlink=2, children=private))
    add(private, b"inner", Node(next(inos), stat.S_IFREG | 0o644, size=6, data=b"inner\n"))
    add(root, b"link", Node(next(inos), stat.S_IFLNK | 0o777, size=5, target=b"hello"))
    add(root, b"opaque", Node(next(inos), stat.S_IFDIR | 0o755, nlink=2, children={}, xattrs={b"user.overlay.opaque": b"y"}))
    add(root, b"slow", Node(next(inos), stat.S_IFREG | 0o644, size=4, data=b"slow"))
    if backing_file is not None:
        add(root, b"big", Node(next(inos), stat.S_IFREG | 0o644, size=os.path.getsize(backing_file), backing=backing_file))
    for d in range(3):
        children: dict[bytes, int] = {}
        add(root, f"d{d}".encode(), Node(next(inos), stat.S_IFDIR | 0o755, nlink=2, children=children))
        for f in range(20):
            body = f"file {d}/{f}\n".encode()
            add(children, f"f{f:02d}".encode(), Node(next(inos), stat.S_IFREG | 0o644, size=len(body), data=body))
    nodes[abi.ROOT_ID] = Node(abi.ROOT_ID, stat.S_IFDIR | 0o755, nlink=2, children=root)
    return nodes


class MemFS:
    """`Operations` over `sample_tree`; counts requests per operation for the tests."""

    def __init__(self, nodes: dict[int, Node], *, passthrough: bool = False) -> None:
        self.nodes = nodes
        self.passthrough = passthrough
        self.calls: dict[str, int] = {}
        self.forgotten: dict[int, int] = {}
        self.created: list[bytes] = []
        self.removed: list[bytes] = []
        self._lock = threading.Lock()
        self.read_gate: threading.Event | None = None  # reads of /slow wait for it, when set
        self.open_gate: threading.Event | None = None  # opens of files with a backing file wait for it, when set
        self.open_entered = threading.Event()  # set when such an open waits at the gate
        self.cache_listings = True  # opendir lets the kernel keep listings (the tree never changes)

    def _count(self, op: str) -> None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FuseError(errno.ESTALE)
        return node

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Node:
        self._count("lookup")
        ino = self._node(parent).children.get(name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        return self.nodes[ino]

    def forget(self, ino: int, nlookup: int) -> None:
        with self._lock:
            self.forgotten[ino] = self.forgotten.get(ino, 0) + nlookup

    def getattr(self, ctx: Context, ino: int) -> Node:
        self._count("getattr")
        return self._node(ino)

    def readlink(self, ctx: Context, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FuseError(errno.EINVAL)
        return node.target

    def open(self, ctx: Context, ino: int, flags: int, *, backing: bool = True) -> OpenReply:
        self._count("open")
        node = self._node(ino)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseError(errno.EROFS)
        if node.backing and self.open_gate is not None:
            self.open_entered.set()
            self.open_gate.wait(30)
        if node.backing and self.passthrough and backing:
            self._count("backing_opened")
            return OpenReply(backing_fd=os.open(node.backing, os.O_RDONLY))
        return OpenReply()

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        self._count("read")
        node = self._node(ino)
        if node.data == b"slow" and self.read_gate is not None:
            self.read_gate.wait(30)
        if node.backing:
            with open(node.backing, "rb") as f:
                f.seek(offset)
                return f.read(size)
        return node.data[offset : offset + size]

    def release(self, ino: int, fh: int) -> None:
        self._count("release")

    def opendir(self, ctx: Context, ino: int) -> OpenReply:
        if not stat.S_ISDIR(self._node(ino).mode):
            raise FuseError(errno.ENOTDIR)
        return OpenReply(keep_cache=self.cache_listings)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> list[DirEntry]:
        self._count("readdir")
        node = self._node(ino)
        entries = [DirEntry(b".", 1, ino=ino, kind=4), DirEntry(b"..", 2, ino=abi.ROOT_ID, kind=4)]
        for i, (name, child) in enumerate(sorted(node.children.items())):
            entries.append(DirEntry(name, i + 3, attr=self.nodes[child]))
        return entries[offset:]

    def releasedir(self, ino: int, fh: int) -> None:
        pass

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        value = self._node(ino).xattrs.get(name)
        if value is None:
            raise FuseError(errno.ENODATA)
        return value

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    def statfs(self, ctx: Context, ino: int) -> tuple[int, int, int]:
        return 4096, 255, 4096

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int) -> None:
        self.created.append(name)
        raise FuseError(errno.ENOENT)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self.removed.append(name)
        raise FuseError(errno.ENOENT)

    def refuse_write(self, ctx: Context, ino: int, name: bytes | None) -> None:
        raise FuseError(errno.EROFS)


def main(argv: list[str]) -> int:
    fd, mode = int(argv[0]), argv[1]
    state = ConnectionState.from_json(argv[2]) if len(argv) > 2 else None
    fs = MemFS(sample_tree())
    report = sys.stdout

    class Crashing(MemFS):
        def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
            if self._node(ino).data == b"slow":
                print(json.dumps({"event": "dying"}), file=report, flush=True)
                os._exit(9)
            return super().read(ctx, ino, fh, offset, size)

    if mode == "crash-on-read":
        fs = Crashing(sample_tree())
    session = Session(fd, fs, SessionOptions(), state=state)
    session.on_init = lambda s: print(json.dumps({"event": "init", "state": s.to_json()}), file=report, flush=True)
    if mode == "resume":
        resent = session.notify_resend()
        print(json.dumps({"event": "resumed", "resend": resent}), file=report, flush=True)
    session.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
