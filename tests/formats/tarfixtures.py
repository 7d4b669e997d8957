"""Generated layer tars holding every entry type and corner the formats must carry.

Built with `tarfile` from `TarInfo` objects (not from a directory on disk), so devices, foreign
owners, odd mtimes and binary xattrs need no privileges. Content is pseudo-random but seeded, so
a failure reproduces.
"""
from __future__ import annotations

import io
import random
import tarfile

BASE_MTIME = 1_700_000_000


def _info(name: str, type_: bytes, *, mode: int = 0o644, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.mtime = BASE_MTIME
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


class TarBuilder:
    """Appends entries to an in-memory PAX tar."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")

    def dir(self, name: str, **attrs: object) -> None:
        attrs.setdefault("mode", 0o755)
        self._tar.addfile(_info(name, tarfile.DIRTYPE, **attrs))

    def file(self, name: str, data: bytes, **attrs: object) -> None:
        info = _info(name, tarfile.REGTYPE, **attrs)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str, **attrs: object) -> None:
        attrs.setdefault("mode", 0o777)
        self._tar.addfile(_info(name, tarfile.SYMTYPE, linkname=target, **attrs))

    def hardlink(self, name: str, target: str, **attrs: object) -> None:
        self._tar.addfile(_info(name, tarfile.LNKTYPE, linkname=target, **attrs))

    def device(self, name: str, kind: bytes, major: int, minor: int, **attrs: object) -> None:
        self._tar.addfile(_info(name, kind, devmajor=major, devminor=minor, **attrs))

    def fifo(self, name: str, **attrs: object) -> None:
        self._tar.addfile(_info(name, tarfile.FIFOTYPE, **attrs))

    def getvalue(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def all_types_tar(chunk_size: int = 64 << 10) -> bytes:
    """One layer with every tar entry type, sized around `chunk_size` for chunking corners."""
    t = TarBuilder()
    t.dir("./")
    t.dir("./dir/", mode=0o750, uid=1000, gid=1000, uname="user", gname="group")
    t.file("./dir/empty", b"")
    t.file("./dir/small.txt", b"hello, world\n", uid=1000, gid=1000, uname="user", gname="group")
    t.file("./dir/big.bin", random_bytes(3 * chunk_size + 12345, 1), mode=0o755)
    t.file("./dir/exact-two-chunks.bin", random_bytes(2 * chunk_size, 2))
    t.file("./dir/one-chunk.bin", random_bytes(chunk_size, 3))
    t.file("./dir/one-chunk-plus-one.bin", random_bytes(chunk_size + 1, 4))
    for size in (1, 511, 512, 513, 4095, 4096, 4097):
        t.file(f"./sizes/f{size}", random_bytes(size, size))
    t.file("./dir/compressible.txt", b"all work and no play " * 20000)
    t.symlink("./dir/link", "small.txt")
    t.symlink("./dir/abs-link", "/etc/passwd")
    t.symlink("./dir/dangling", "../does/not/exist")
    t.symlink("./dir/long-target", "/".join(["t" * 60] * 6))
    t.hardlink("./dir/hard", "./dir/small.txt", uid=1000, gid=1000)
    t.hardlink("./other/hard2", "./dir/small.txt", uid=1000, gid=1000)
    t.hardlink("./dir/empty-hard", "./dir/empty")
    t.dir("./dev/")
    t.device("./dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
    t.device("./dev/loop0", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6)
    t.fifo("./dev/fifo", mode=0o640)
    t.dir("./wh/")
    t.file("./wh/.wh.gone", b"")
    t.dir("./wh/opq/")
    t.file("./wh/opq/.wh..wh..opq", b"")
    t.file("./wh/opq/kept", b"kept\n")
    t.dir("./xattr/")
    xattr_file = _info("./xattr/file", tarfile.REGTYPE)
    xattr_file.pax_headers = {
        "SCHILY.xattr.user.foo": "bar",
        "SCHILY.xattr.user.utf8": "日本語",
        "SCHILY.xattr.user.binary": b"\x00\x01\xfe\xff\x00".decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.security.capability": bytes.fromhex("0100000200040000000000000000000000000000").decode(
            "utf-8", "surrogateescape"
        ),
    }
    data = b"file with xattrs\n"
    xattr_file.size = len(data)
    t._tar.addfile(xattr_file, io.BytesIO(data))
    xattr_dir = _info("./xattr/dir/", tarfile.DIRTYPE, mode=0o755)
    xattr_dir.pax_headers = {"SCHILY.xattr.user.dirattr": "on a directory"}
    t._tar.addfile(xattr_dir)
    long_dir = "./long/" + "d" * 120
    t.dir("./long/")
    t.dir(long_dir + "/")
    t.file(long_dir + "/" + "n" * 200, b"long name\n")
    t.dir("./utf8/")
    t.file("./utf8/日本語.txt", "こんにちは\n".encode())
    t.file("./utf8/cafe\u0301-nfd", b"nfd\n")
    t.file("./utf8/caf\u00e9-nfc", b"nfc\n")
    t.file("./utf8/new\nline", b"newline in name\n")
    t.dir("./owners/")
    t.file("./owners/big-ids", b"ids\n", uid=3_000_000, gid=3_000_001)
    t.dir("./times/")
    t.file("./times/epoch0", b"epoch\n", mtime=0)
    t.file("./times/pre1970", b"pre\n", mtime=-86400)
    t.file("./times/frac", b"frac\n", mtime=1_600_000_000.5)
    t.file("./times/y2100", b"future\n", mtime=4_102_444_800)
    t.dir("./modes/")
    t.file("./modes/setuid", b"suid\n", mode=0o4755)
    t.file("./modes/none", b"none\n", mode=0o000)
    t.dir("./modes/sticky/", mode=0o1777)
    t.file("./dup.txt", b"first version\n")
    t.file("./dup.txt", b"second version wins\n")
    return t.getvalue()


def small_tar() -> bytes:
    """A minimal layer for error-path tests."""
    t = TarBuilder()
    t.dir("./")
    t.dir("./a/")
    t.file("./a/one.txt", b"one\n" * 100)
    t.file("./a/two.bin", random_bytes(10_000, 7))
    t.hardlink("./a/one-link", "./a/one.txt")
    return t.getvalue()
