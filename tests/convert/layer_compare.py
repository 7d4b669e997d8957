"""Checks shared by the converter tests: read a converted layer with our readers and compare it with its source tar."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

from stargz_store.formats.detect import read_layer_toc
from stargz_store.formats.file_reader import read_file
from stargz_store.formats.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME

from tests.fixtures.images import decompress_layer, tar_tree

REPO_ROOT = Path(__file__).resolve().parents[2]
# Present in a converted blob's tar stream but not in its source (estargz.md §1.2).
SYNTHETIC_NAMES = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})

_TAR_TO_TOC_TYPE = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def run_convert(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`stargz-store convert ARGS` as a user runs it: a separate process, real exit code and stderr."""
    base = dict(os.environ if env is None else env)
    base.setdefault("PYTHONPATH", str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "stargz_store.cli", "convert", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=base)


def _normal(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."


def read_converted_layer(blob: bytes, descriptor: dict) -> dict[str, dict]:
    """name -> metadata and content sha256 of every entry, through our lazy readers (TOC + verified chunks)."""
    read_at = lambda offset, length: blob[offset:offset + length]  # noqa: E731
    parsed = read_layer_toc(read_at, len(blob), descriptor)
    out: dict[str, dict] = {}
    for path, entry in parsed.toc.entries():
        item = {"type": entry.type, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid,
                "mtime": entry.mtime_ns // 1_000_000_000, "size": entry.size, "link": entry.link_name,
                "ino": entry.ino, "dev": (entry.dev_major, entry.dev_minor),
                "xattrs": dict(entry.xattrs)}
        if entry.type == "reg":
            item["sha256"] = hashlib.sha256(read_file(parsed, read_at, entry)).hexdigest()
        out[path or "."] = item
    return out


def assert_layer_matches_source(converted: dict[str, dict], source_tar: bytes) -> None:
    """Every source entry is in the converted layer with the same metadata and content, and nothing else is."""
    source = tar_tree(source_tar)
    hardlinks = {name: _normal(e["linkname"]) for name, e in source.items() if e["type"] == tarfile.LNKTYPE}
    for name, src in source.items():
        assert name in converted, f"{name!r} missing from the converted layer"
        got = converted[name]
        if src["type"] == tarfile.LNKTYPE:
            target = converted[hardlinks[name]]
            assert got["ino"] == target["ino"], f"{name}: hardlink does not share its target's inode"
            continue
        assert got["type"] == _TAR_TO_TOC_TYPE[src["type"]], name
        if name == ".":
            continue
        assert got["mode"] == src["mode"] & 0o7777, name
        assert (got["uid"], got["gid"]) == (src["uid"], src["gid"]), name
        assert got["mtime"] == src["mtime"], name
        if src["type"] in (tarfile.REGTYPE, tarfile.AREGTYPE):
            assert got["size"] == src["size"], name
            assert got["sha256"] == src["sha256"], f"{name}: content differs"
        if src["type"] == tarfile.SYMTYPE:
            assert got["link"] == src["linkname"], name
        assert got["xattrs"] == src["xattrs"], name
        if src["type"] in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            assert got["dev"] == (src["devmajor"], src["devminor"]), name
    extra = set(converted) - set(source) - SYNTHETIC_NAMES - {"."}
    assert not extra, f"entries not in the source: {sorted(extra)}"


def extracted_tree(root: Path) -> dict[str, tuple]:
    """What `tar -x` left on disk: type, mode, uid, gid, mtime, size, content, link target, hardlink group, device, xattrs.

    The hardlink group is the smallest name sharing the inode, so it does not depend on walk order.
    """
    tree: dict[str, tuple] = {}
    stats: dict[str, os.stat_result] = {}
    names_by_inode: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = stats[rel] = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                names_by_inode.setdefault(st.st_ino, []).append(rel)
    for rel, st in stats.items():
        path = root / rel
        content = link = group = None
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                group = min(names_by_inode[st.st_ino])
        elif stat.S_ISLNK(st.st_mode):
            link = os.readlink(path)
        mtime = None if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)  # tar touches dirs it fills
        xattrs = {} if stat.S_ISLNK(st.st_mode) else {k: os.getxattr(path, k) for k in os.listxattr(path)}
        tree[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime,
                     st.st_size if stat.S_ISREG(st.st_mode) else 0, content, link, group,
                     st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0, xattrs)
    return tree


def tar_extract(blob_path: Path, dest: Path, gzip: bool) -> None:
    dest.mkdir(parents=True)
    flags = "-xzf" if gzip else "-xf"
    subprocess.run(["tar", "--numeric-owner", "--same-permissions", "--xattrs", flags, str(blob_path), "-C", str(dest)],
                   check=True, capture_output=True)


def uncompressed(blob: bytes) -> bytes:
    return decompress_layer(blob)
