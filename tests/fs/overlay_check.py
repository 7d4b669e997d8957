"""Compare a layer's `diff` (through the model or through a real mount) with `overlay_diff`.

Both sides are reduced to one snapshot shape, path -> {type, perm, uid, gid, mtime_ns, size,
sha256, target, rdev, xattrs, nlink, ino}, so the same checks run on `StoreModel` answers and on
`os.lstat` of the mounted tree. The expected side is tests/data/expected-*.json `overlay_diff`
(generated from the source trees, never from our output).
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Mapping

from stargz_store.fs.caller import ROOT

from .paths import PathModel

MTIME_TOLERANCE_NS = 500_000_000  # a TOC keeps whole seconds
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_TYPES = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
}


def _item(mode: int, ino: int, nlink: int, uid: int, gid: int, size: int, mtime_ns: int, rdev: int) -> dict[str, Any]:
    return {
        "type": _TYPES.get(stat.S_IFMT(mode), "?"), "perm": stat.S_IMODE(mode), "ino": ino, "nlink": nlink,
        "uid": uid, "gid": gid, "size": size, "mtime_ns": mtime_ns, "rdev": (os.major(rdev), os.minor(rdev)),
    }


def snapshot_mount(root: Path) -> dict[str, dict[str, Any]]:
    """lstat, readlink, xattrs and sha256 of every node under a mounted `diff`; the root is "."."""
    snap: dict[str, dict[str, Any]] = {}

    def add(path: Path, rel: str) -> None:
        st = os.lstat(path)
        item = _item(st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev)
        names = os.listxattr(path, follow_symlinks=False)
        item["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        if item["type"] == "reg":
            item["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif item["type"] == "symlink":
            item["target"] = os.readlink(path)
        snap[rel] = item

    add(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            add(full, full.relative_to(root).as_posix())
    return snap


def snapshot_model(model: PathModel, diff_path: str) -> dict[str, dict[str, Any]]:
    """The same snapshot, asked from the model (`diff_path` = "/<b64ref>/<key>/diff")."""
    snap: dict[str, dict[str, Any]] = {}

    def add(path: str, rel: str) -> None:
        a = model.getattr(path, caller=ROOT)
        item = _item(a.mode, a.ino, a.nlink, a.uid, a.gid, a.size, a.mtime_ns, a.rdev)
        item["xattrs"] = {n: model.getxattr(path, n, caller=ROOT) for n in model.listxattr(path, caller=ROOT)}
        if item["type"] == "reg":
            fh = model.open(path, caller=ROOT)
            try:
                data = bytearray()
                while len(data) < a.size:
                    piece = model.read(fh, len(data), 1 << 20)
                    if not piece:
                        break
                    data += piece
            finally:
                model.release(fh)
            item["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        elif item["type"] == "symlink":
            item["target"] = model.readlink(path, caller=ROOT)
        snap[rel] = item
        if item["type"] == "dir":
            for name, _ in model.readdir(path, caller=ROOT):
                add(f"{path}/{name}", name if rel == "." else f"{rel}/{name}")

    add(diff_path, ".")
    return snap


def compare_overlay(snap: Mapping[str, dict[str, Any]], expected_layer: Mapping[str, Any]) -> list[str]:
    """Differences between a snapshot and `overlay_diff` (+ `hardlink_groups`), one line each."""
    expected: Mapping[str, Any] = expected_layer["overlay_diff"]
    problems: list[str] = []
    for path, want in expected.items():
        got = snap.get(path)
        if got is None:
            problems.append(f"{path}: missing")
            continue
        if got["type"] != want["type"]:
            problems.append(f"{path}: type {got['type']} != {want['type']}")
            continue
        if want.get("whiteout"):
            if got["rdev"] != (0, 0) or got["perm"] != 0 or got["uid"] != 0 or got["gid"] != 0 or got["size"] != 0:
                problems.append(f"{path}: whiteout is not a 0/0 char device with no permissions: {got}")
            continue
        for key, mine in (("mode", "perm"), ("uid", "uid"), ("gid", "gid")):
            if got[mine] != want[key]:
                problems.append(f"{path}: {key} {got[mine]:o} != {want[key]:o}" if key == "mode" else f"{path}: {key} {got[mine]} != {want[key]}")
        if "mtime_ns" in want and abs(got["mtime_ns"] - want["mtime_ns"]) > MTIME_TOLERANCE_NS:
            problems.append(f"{path}: mtime_ns {got['mtime_ns']} != {want['mtime_ns']}")
        if want["type"] == "reg":
            if got["size"] != want["size"]:
                problems.append(f"{path}: size {got['size']} != {want['size']}")
            if got.get("sha256") != want["sha256"]:
                problems.append(f"{path}: content sha256 differs")
            if "nlink" in want and got["nlink"] != want["nlink"]:
                problems.append(f"{path}: nlink {got['nlink']} != {want['nlink']}")
        if want["type"] == "symlink" and got.get("target") != want["target"]:
            problems.append(f"{path}: target {got.get('target')!r} != {want['target']!r}")
        if want["type"] in ("char", "block") and got["rdev"] != (want.get("devmajor", 0), want.get("devminor", 0)):
            problems.append(f"{path}: rdev {got['rdev']} != {(want.get('devmajor'), want.get('devminor'))}")
        xattrs = {k: v for k, v in got["xattrs"].items() if k not in OPAQUE_XATTRS}
        want_xattrs = {k: base64.b64decode(v) for k, v in (want.get("xattrs_b64") or {}).items()}
        if xattrs != want_xattrs:
            problems.append(f"{path}: xattrs {xattrs} != {want_xattrs}")
        opaque = all(got["xattrs"].get(k) == b"y" for k in OPAQUE_XATTRS)
        if bool(want.get("opaque")) != opaque:
            problems.append(f"{path}: opaque {opaque} != {bool(want.get('opaque'))} (xattrs {got['xattrs']})")
    for path in snap:
        if path not in expected and path != ".":
            problems.append(f"{path}: not expected in the overlay view")
    for group in expected_layer.get("hardlink_groups") or []:
        inos = {snap[p]["ino"] for p in group if p in snap}
        if len(inos) != 1:
            problems.append(f"hardlink group {group}: inodes {sorted(inos)}")
    return problems
