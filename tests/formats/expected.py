"""Ground-truth comparison shared by the format, layer and store tests.

Format-neutral: everything takes a `ParsedToc` and a `ReadAt`, so the same check runs over
eStargz and zstd:chunked. The expected side is the `expected-*.json` vocabulary of
tests/data/README.md (per layer: `entries` keyed by relative path, `hardlink_groups`), either
loaded from the reference files or derived from a source tar with `expected_layer_from_tar`.

Typical use::

    image = load_oci_image(testdata / "tricky-esgz")
    layer = image.layers[0]
    with layer.open() as read_at:
        parsed = read_toc(read_at, layer.size, expected_toc_digest=layer.toc_digest)
        assert_layer_matches(parsed, read_at, load_expected(testdata, "tricky")["source_layers"][0])
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from stargz_store.formats.file_reader import read_file
from stargz_store.formats.layer_toc import ANNOTATION_TOC_DIGEST, ParsedToc, ReadAt
from stargz_store.formats.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    normalize_name,
)

# A TOC keeps whole seconds (eStargz rounds to the nearest one); the source may have a fraction.
MTIME_TOLERANCE_NS = 500_000_000
# Names a converted layer carries that the source tree never had.
SYNTHETIC_NAMES = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME})


class BlobFile:
    """A local blob as a `ReadAt` (also a context manager that closes the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self.reads: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "BlobFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OciLayer:
    index: int
    descriptor: Mapping[str, Any]
    path: Path

    @property
    def digest(self) -> str:
        return self.descriptor["digest"]

    @property
    def size(self) -> int:
        return self.descriptor["size"]

    @property
    def media_type(self) -> str:
        return self.descriptor["mediaType"]

    @property
    def annotations(self) -> Mapping[str, str]:
        return self.descriptor.get("annotations") or {}

    @property
    def toc_digest(self) -> str | None:
        return self.annotations.get(ANNOTATION_TOC_DIGEST)

    def open(self) -> BlobFile:
        return BlobFile(self.path)


@dataclass(frozen=True)
class OciImage:
    root: Path
    manifest: Mapping[str, Any]
    config: Mapping[str, Any]
    layers: list[OciLayer]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config["rootfs"]["diff_ids"])


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algo / hexdigest


def load_oci_image(layout: Path, ref_name: str | None = None) -> OciImage:
    """The (first, or `ref_name`-tagged) single-platform image of an OCI image layout."""
    index = json.loads((layout / "index.json").read_text())
    manifests = index["manifests"]
    if ref_name is not None:
        manifests = [
            m for m in manifests if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref_name
        ]
    if not manifests:
        raise LookupError(f"no manifest {ref_name!r} in {layout}")
    manifest = json.loads(blob_path(layout, manifests[0]["digest"]).read_text())
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_text())
    layers = [OciLayer(i, d, blob_path(layout, d["digest"])) for i, d in enumerate(manifest["layers"])]
    return OciImage(layout, manifest, config, layers)


def load_expected(testdata: Path, name: str) -> dict[str, Any]:
    """`expected-<name>.json` (e.g. "tricky", "multilayer")."""
    return json.loads((testdata / f"expected-{name}.json").read_text())


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_layer_from_tar(tar_bytes: bytes) -> dict[str, Any]:
    """The `source_layers[i]` shape (`entries`, `hardlink_groups`) for a plain tar, as an
    extraction of it would look: later duplicates win, hardlinks share their target's metadata.

    Lets round-trip tests compare a converted layer against its own source with the same
    checker as the reference images.
    """
    entries: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        for info in tar:
            name = normalize_name(info.name) or "."
            if name in SYNTHETIC_NAMES:
                continue
            if info.islnk():
                target = normalize_name(info.linkname) or "."
                groups.setdefault(target, [target]).append(name)
                entries[name] = {"hardlink_to": target}
                continue
            mtime_ns = round(info.mtime * 1_000_000_000)
            e: dict[str, Any] = {
                "mode": info.mode & 0o7777,
                "uid": info.uid,
                "gid": info.gid,
                "mtime": math.floor(info.mtime),
                "mtime_ns": mtime_ns,
            }
            if info.isreg():
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                e.update(type="reg", size=len(data), sha256=_sha256_hex(data), nlink=1)
            elif info.isdir():
                e["type"] = "dir"
            elif info.issym():
                e.update(type="symlink", target=info.linkname)
            elif info.ischr() or info.isblk():
                e.update(type="char" if info.ischr() else "block", devmajor=info.devmajor, devminor=info.devminor)
            elif info.isfifo():
                e["type"] = "fifo"
            else:
                raise ValueError(f"unexpected tar type {info.type!r} for {name!r}")
            xattrs = {
                k[len("SCHILY.xattr."):]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
                for k, v in info.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            if xattrs:
                e["xattrs_b64"] = xattrs
            entries[name] = e
    for name in list(entries):
        parent = name.rpartition("/")[0]
        while parent and parent not in entries:
            entries[parent] = {"type": "dir", "implicit": True}  # no tar entry: a reader invents it
            parent = parent.rpartition("/")[0]
    hardlink_groups = []
    for target, names in groups.items():
        if target not in entries or "hardlink_to" in entries[target]:
            raise ValueError(f"hardlink target {target!r} is not a file in the tar")
        index = len(hardlink_groups)
        hardlink_groups.append(sorted(names))
        entries[target]["nlink"] = len(names)
        entries[target]["hardlink_group"] = index
        for n in names:
            if n != target:
                entries[n] = dict(entries[target])
    return {"entries": entries, "hardlink_groups": hardlink_groups}


def _toc_paths(parsed: ParsedToc) -> dict[str, Any]:
    return {path: e for path, e in parsed.toc.entries()}


def compare_layer(
    parsed: ParsedToc,
    read_at: ReadAt,
    expected_layer: Mapping[str, Any],
    *,
    check_content: bool = True,
    check_dir_nlink: bool = True,
) -> list[str]:
    """Every difference between the layer's TOC (plus its verified content) and the expectation.

    An empty list means the layer matches: same set of names (root and synthetic landmark files
    aside), same type, permission bits, owner, mtime (within the TOC's one-second precision),
    size, content hash, symlink target, device numbers, xattrs, hardlink identity and nlink.
    """
    problems: list[str] = []
    expected: Mapping[str, Mapping[str, Any]] = expected_layer["entries"]
    toc_entries = _toc_paths(parsed)
    have = {p for p in toc_entries if p and p not in SYNTHETIC_NAMES}
    want = {p for p in expected if p != "."}
    for p in sorted(want - have):
        problems.append(f"{p!r}: missing from the TOC")
    for p in sorted(have - want):
        problems.append(f"{p!r}: in the TOC but not expected")
    for path in sorted(want & have | ({"."} if "." in expected else set())):
        exp = expected[path]
        got = toc_entries["" if path == "." else path]
        problems.extend(_compare_entry(parsed, read_at, path, exp, got, check_content, check_dir_nlink))
    for group in expected_layer.get("hardlink_groups", []):
        present = [n for n in group if n in toc_entries]
        inos = {toc_entries[n].ino for n in present}
        if len(present) != len(group) or len(inos) != 1:
            problems.append(f"hardlink group {group}: names map to inodes {sorted(inos)} (present {present})")
    return problems


def _compare_entry(
    parsed: ParsedToc,
    read_at: ReadAt,
    path: str,
    exp: Mapping[str, Any],
    got: Any,
    check_content: bool,
    check_dir_nlink: bool,
) -> Iterator[str]:
    def diff(what: str, want: Any, have: Any) -> Iterator[str]:
        if want != have:
            yield f"{path!r}: {what} expected {want!r}, got {have!r}"

    yield from diff("type", exp["type"], got.type)
    if exp["type"] != got.type or exp.get("implicit"):
        return
    yield from diff("mode", exp.get("mode", 0), got.mode)
    yield from diff("uid", exp.get("uid", 0), got.uid)
    yield from diff("gid", exp.get("gid", 0), got.gid)
    want_ns = exp.get("mtime_ns", exp.get("mtime", 0) * 1_000_000_000)
    if abs(want_ns - got.mtime_ns) > MTIME_TOLERANCE_NS:
        yield f"{path!r}: mtime expected {want_ns} ns, got {got.mtime_ns} ns"
    want_x = exp.get("xattrs_b64") or {}
    have_x = {k: base64.b64encode(v).decode() for k, v in got.xattrs.items()}
    yield from diff("xattrs", want_x, have_x)
    if exp["type"] == "symlink":
        yield from diff("symlink target", exp["target"], got.link_name)
    elif exp["type"] in ("char", "block"):
        yield from diff("device", (exp.get("devmajor", 0), exp.get("devminor", 0)), (got.dev_major, got.dev_minor))
    elif exp["type"] == "reg":
        yield from diff("size", exp["size"], got.size)
        if "nlink" in exp:
            yield from diff("nlink", exp["nlink"], got.nlink)
        if check_content and exp["size"] == got.size:
            data = read_file(parsed, read_at, got) if got.size else b""
            yield from diff("sha256", exp["sha256"], _sha256_hex(data))
    elif exp["type"] == "dir" and check_dir_nlink and "nlink" in exp:
        yield from diff("nlink", exp["nlink"], got.nlink)


def assert_layer_matches(parsed: ParsedToc, read_at: ReadAt, expected_layer: Mapping[str, Any], **kw: Any) -> None:
    problems = compare_layer(parsed, read_at, expected_layer, **kw)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:40])


def tree_snapshot(
    root: Path, *, skip_root_names: frozenset[str] = frozenset(), extracted_after_ns: int | None = None
) -> dict[str, Any]:
    """lstat-level view of an extracted directory tree (type, perms, owner, mtime, content,
    symlink target, rdev, xattrs, hardlink grouping), to compare two extractions.

    Mtimes at or after `extracted_after_ns` are recorded as "extraction time": tar cannot keep
    the mtime of a directory it writes into after restoring it, nor of an implicit parent.
    """
    snap: dict[str, Any] = {}
    inode_names: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if "/" not in rel and rel in skip_root_names:
                continue
            st = os.lstat(full)
            item: dict[str, Any] = {
                "fmt": stat.S_IFMT(st.st_mode),
                "perm": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": {k: os.getxattr(full, k, follow_symlinks=False) for k in sorted(os.listxattr(full, follow_symlinks=False))},
            }
            if not stat.S_ISLNK(st.st_mode):
                recent = extracted_after_ns is not None and st.st_mtime_ns >= extracted_after_ns
                item["mtime_ns"] = "extraction time" if recent else st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                item["sha256"] = _sha256_hex(full.read_bytes())
                inode_names.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            snap[rel] = item
    snap["<hardlink groups>"] = sorted(sorted(v) for v in inode_names.values() if len(v) > 1)
    return snap
