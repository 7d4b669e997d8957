"""The attributes the model reports for every node, independent of FUSE's stat layout."""
from __future__ import annotations

import stat
from dataclasses import dataclass, field

BLOCK_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Attr:
    """stat(2) fields of one node. `mode` includes the file type bits; times are nanoseconds.

    `nodeid` is the number the kernel names the node by (`fs.inodes`); 0 means "the same as
    `ino`". It is not part of equality: the same file seen through a layer's two keys has one
    `ino` (what stat shows) and two node ids (the kernel must not see one directory twice)."""

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nodeid: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if not self.nodeid:
            object.__setattr__(self, "nodeid", self.ino)

    @property
    def blocks(self) -> int:
        """512-byte units, rounded up to whole 4 KiB blocks (what stargz-store reports)."""
        return -(-self.size // BLOCK_SIZE) * (BLOCK_SIZE // 512)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


def dir_attr(ino: int, *, mode: int = 0o555, nlink: int = 2) -> Attr:
    """A synthetic store directory (`dr-xr-xr-x`, root): anyone may walk through to the layers'
    own trees, whose modes then decide; nobody may write in it (root, who sends the `use` and
    `rmdir` notifications, passes any mode). The Go store shows `dr-x------` but enforces nothing."""
    return Attr(ino=ino, mode=stat.S_IFDIR | mode, nlink=nlink)


def file_attr(ino: int, size: int, *, mode: int = 0o400) -> Attr:
    """A synthetic store file (`-r--------`, root): info, blob, manifest, config. Root's alone: a
    blob holds every file of the layer, a config may hold secrets in its `Env`."""
    return Attr(ino=ino, mode=stat.S_IFREG | mode, size=size)
