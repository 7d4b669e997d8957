"""Building a `Toc` from JSON objects (dicts) in pure Python: the path used without msgspec.

Each field's type is checked as it is read (`_int`, `_str`, ...: the common case inline, these
only for None and errors). Two passes: records and names first, then entries, since chunk extents
and hardlink link counts need the whole TOC. Call it through `toc.build_toc`, which pauses the GC.
"""
from __future__ import annotations

import base64
import bisect
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from .errors import ChunkCoverageError, DuplicateEntryError, InvalidTocError, OutOfBoundsError
from .toc import (
    _CANONICAL_TYPES,
    _DIGEST_RE,
    _NO_XATTRS,
    _PERMISSIONS,
    CHUNK,
    DIR,
    HARDLINK,
    PREFETCH_LANDMARK,
    REG,
    SYMLINK,
    Chunk,
    Toc,
    TocEntry,
    _new_tuple,
    _settle,
    parse_time_ns,
)
from .toc_rules import (
    INT64_MAX,
    INT64_MIN,
    ImpliedDirectories,
    TocLimits,
    check_depth,
    check_link_target,
    check_xattr_names,
    normalize_name,
    resolve_hardlinks,
)


# The checked accessors are the slow path: `build_from_dicts` inlines the common case (the value
# has the right type) and calls these only to turn None into the zero value or to raise.
def _int(raw: Mapping[str, Any], key: str) -> int:
    v = raw.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not INT64_MIN <= v <= INT64_MAX:
        raise InvalidTocError(f"entry {raw.get('name')!r}: {key} must be a 64-bit integer, got {v!r}")
    return v


def _str(raw: Mapping[str, Any], key: str) -> str:
    v = raw.get(key, "")
    if type(v) is str:
        return v
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidTocError(f"entry {raw.get('name')!r}: {key} must be a string, got {v!r}")
    return v


def _xattrs(raw: Mapping[str, Any]) -> Mapping[str, bytes]:
    x = raw.get("xattrs")
    if not x:
        return _NO_XATTRS
    if not isinstance(x, dict):
        raise InvalidTocError(f"entry {raw.get('name')!r}: xattrs must be an object")
    check_xattr_names(str(raw.get("name")), x)
    try:
        return MappingProxyType({k: base64.b64decode(v, validate=True) for k, v in x.items()})
    except (ValueError, TypeError) as e:
        raise InvalidTocError(f"entry {raw.get('name')!r}: xattr value is not base64: {e}") from None


# Every field of an entry, with the type msgspec's record gives it (`toc_records._RawEntry`): the
# builder reads only the fields an entry's type uses, the record checks them all.
_INT_FIELDS = ("size", "offset", "endOffset", "devMajor", "devMinor", "chunkOffset", "chunkSize", "innerOffset",
               "mode", "uid", "gid")
_STR_FIELDS = ("name", "modtime", "linkName", "digest", "chunkDigest", "chunkType")


def _check_field_types(raw: Mapping[str, Any]) -> None:
    """Refuse a field of the wrong type even where this entry's type does not use it, as the
    msgspec path does (both must accept and refuse the same TOCs)."""
    for key in _INT_FIELDS:
        if key in raw:
            _int(raw, key)
    for key in _STR_FIELDS:
        if key in raw:
            _str(raw, key)
    x = raw.get("xattrs")
    if x is not None and not (isinstance(x, dict) and all(type(v) is str for v in x.values())):
        raise InvalidTocError(f"entry {raw.get('name')!r}: xattrs must map names to strings, got {x!r}")


def _digest(raw: Mapping[str, Any], key: str, seen: dict[str, str]) -> str:
    """The validated digest at `key` ("" when absent), shared with earlier equal digests via `seen`."""
    d = raw.get(key, "")
    if type(d) is not str:
        d = _str(raw, key)
    if not d:
        return ""
    shared = seen.get(d)
    if shared is None:
        if not _DIGEST_RE.match(d):
            raise InvalidTocError(f"entry {raw.get('name')!r}: {key} {d!r} is not a sha256 digest")
        seen[d] = shared = d
    return shared


def build_from_dicts(raw_entries: Iterable[Mapping[str, Any]], data_end: int, limits: TocLimits) -> Toc:
    """The pure-Python build over JSON objects (dicts), checking each field's type as it reads it.
    The caller has checked the entry count against `limits`."""
    # Pass 1: one record (name, type, raw, pieces) per non-chunk entry.
    records: list[tuple[str, str, Mapping[str, Any], list[Mapping[str, Any]] | None]] = []
    by_name: dict[str, tuple[str, str, Mapping[str, Any], list[Mapping[str, Any]] | None]] = {}
    hardlinks: list[tuple[str, str, Mapping[str, Any], Any]] = []
    offsets: list[int] = []
    last_pieces: list[Mapping[str, Any]] | None = None
    types = _CANONICAL_TYPES
    long_name = limits.long_name
    listed = 0
    for raw in raw_entries:
        listed += 1
        if not isinstance(raw, dict):
            raise InvalidTocError(f"TOC entry is not an object: {raw!r}")
        _check_field_types(raw)
        get = raw.get
        raw_type = get("type")
        etype = types.get(raw_type) if type(raw_type) is str else None
        if etype is None:
            raise InvalidTocError(f"entry {get('name')!r}: unknown type {raw_type!r}")
        if etype is CHUNK:
            if last_pieces is None:
                raise InvalidTocError(f"chunk entry {get('name')!r} does not follow a regular file")
            last_pieces.append(raw)
            off = get("offset", 0)
            if type(off) is not int:
                off = _int(raw, "offset")
            if off >= 0:
                offsets.append(off)
            continue
        name = get("name", "")
        if (type(name) is str and name and name[0] not in "./" and "//" not in name and "/." not in name
                and "\0" not in name):
            if name[-1] == "/":
                name = name.rstrip("/")
        else:
            name = normalize_name(name if type(name) is str else _str(raw, "name"))
        if len(name) > long_name:
            check_depth(name, limits)
        if name in by_name:
            if name == "" and etype is DIR and by_name[""][1] is DIR:
                continue  # `./` and `/` both name the root; a repeat of the root is harmless
            raise DuplicateEntryError(f"duplicate entry {name!r} in TOC")
        if name == "" and etype is not DIR:
            raise InvalidTocError(f"the layer root must be a directory, TOC says {etype!r}")
        if etype is REG:
            last_pieces = [raw]
            off = get("offset", 0)
            if type(off) is not int:
                off = _int(raw, "offset")
            if off >= 0:
                offsets.append(off)
        else:
            last_pieces = None
        rec = (name, etype, raw, last_pieces)
        by_name[name] = rec
        records.append(rec)
        if etype is HARDLINK:
            hardlinks.append(rec)

    # Every offset that starts a piece of data, to bound each piece's compressed extent.
    starts = sorted(set(offsets))
    del offsets
    if starts and starts[-1] >= data_end:
        raise OutOfBoundsError(f"data offset {starts[-1]} is at or beyond the TOC at {data_end}")

    # Hardlinks: resolve chains to the final non-hardlink target.
    link_count: dict[str, int] = {}
    hardlink_target = resolve_hardlinks(
        {rec[0]: _str(rec[2], "linkName") for rec in hardlinks},
        lambda target: None if (rec := by_name.get(target)) is None or rec[1] is HARDLINK else rec[1],
    )
    for target in hardlink_target.values():
        link_count[target] = link_count.get(target, 1) + 1

    # Pass 2: entries, parent checks, subdirectory counts, child lists.
    entries: dict[str, TocEntry] = {}
    built: list[TocEntry] = []
    dirs: list[int] = []  # positions in `built` of explicit directories
    subdirs: dict[str, int] = {}
    child_names: dict[str, list[str]] = {}
    implicit: list[str] = []
    implicit_set: set[str] = set()
    implied = ImpliedDirectories(limits, listed)
    if "" not in by_name:
        implicit.append("")
        implicit_set.add("")
        entries[""] = _new_tuple(TocEntry, ("", DIR, 0o755, 0, 0, 0, 0, "", 0, 0, _NO_XATTRS, "", (), 1, 2))
    ino = 2  # the root is inode 1, explicit or implicit
    digests: dict[str, str] = {}
    perms = _PERMISSIONS
    link_count_get = link_count.get
    times: dict[str, int] = {}
    # A key of `child_names` is a directory whose ancestry has been checked.
    for rec in records:
        name, etype, raw, pieces = rec
        if name:
            parent = name.rpartition("/")[0]
            siblings = child_names.get(parent)
            if siblings is None:
                _check_parent(name, parent, by_name, implicit, implicit_set, subdirs, child_names, implied)
                siblings = child_names.setdefault(parent, [])
            siblings.append(name)
            if etype is DIR:
                subdirs[parent] = subdirs.get(parent, 0) + 1
        if etype is HARDLINK:
            continue
        get = raw.get
        mode = get("mode", 0)
        if type(mode) is not int:
            mode = _int(raw, "mode")
        uid = get("uid", 0)
        if type(uid) is not int:
            uid = _int(raw, "uid")
        gid = get("gid", 0)
        if type(gid) is not int:
            gid = _int(raw, "gid")
        modtime = get("modtime", "")
        mtime_ns = times.get(modtime) if type(modtime) is str else None
        if mtime_ns is None:
            modtime = _str(raw, "modtime")
            mtime_ns = times[modtime] = parse_time_ns(modtime)
        dev_major = get("devMajor", 0)
        if type(dev_major) is not int:
            dev_major = _int(raw, "devMajor")
        dev_minor = get("devMinor", 0)
        if type(dev_minor) is not int:
            dev_minor = _int(raw, "devMinor")
        xattrs = _xattrs(raw) if get("xattrs") else _NO_XATTRS
        digest = get("digest", "")
        if digest:
            shared = digests.get(digest) if type(digest) is str else None
            digest = shared if shared is not None else _digest(raw, "digest", digests)
        elif type(digest) is not str:
            digest = _digest(raw, "digest", digests)
        size = 0
        chunks: tuple[Chunk, ...] = ()
        link_name = ""
        if etype is REG:
            size = get("size", 0)
            if type(size) is not int:
                size = _int(raw, "size")
            if size < 0:
                raise OutOfBoundsError(f"file {name!r} has negative size {size}")
            if size:
                chunks = _build_chunks(name, raw, pieces, size, digest, starts, data_end, digests)
        elif etype is SYMLINK:
            link_name = get("linkName", "")
            if type(link_name) is not str:
                link_name = _str(raw, "linkName")
            if "\0" in link_name:
                check_link_target(name, link_name)
        elif etype is DIR:
            dirs.append(len(built))
        e = _new_tuple(
            TocEntry,
            (
                name, etype, perms[mode & 0o7777], uid, gid, size, mtime_ns, link_name,
                dev_major, dev_minor, xattrs, digest, chunks, ino if name else 1,
                2 if etype is DIR else link_count_get(name, 1),
            ),
        )
        if name:
            ino += 1
        entries[name] = e
        built.append(e)

    landmark = by_name.get(PREFETCH_LANDMARK)
    landmark_offset = _int(landmark[2], "offset") if landmark is not None and landmark[1] is REG else None
    return _settle(entries, built, dirs, subdirs, implicit, ino, hardlink_target, child_names, landmark_offset)


def _check_parent(
    name: str,
    parent: str,
    by_name: Mapping[str, tuple],
    implicit: list[str],
    implicit_set: set[str],
    subdirs: dict[str, int],
    child_names: dict[str, list[str]],
    implied: ImpliedDirectories,
) -> None:
    """Refuse a non-directory parent; create missing ancestors as implicit directories."""
    while True:
        found = by_name.get(parent)
        if found is not None:
            if found[1] is not DIR:
                raise InvalidTocError(f"entry {name!r} has a non-directory parent {parent!r}")
            return
        if parent in implicit_set:
            return
        implied.add(parent)
        implicit.append(parent)
        implicit_set.add(parent)
        grandparent = parent.rpartition("/")[0]
        subdirs[grandparent] = subdirs.get(grandparent, 0) + 1
        child_names.setdefault(grandparent, []).append(parent)
        parent = grandparent


def _build_chunks(
    name: str,
    raw: Mapping[str, Any],
    pieces: list[Mapping[str, Any]],
    size: int,
    digest: str,
    starts: list[int],
    data_end: int,
    digests: dict[str, str],
) -> tuple[Chunk, ...]:
    end_offset = raw.get("endOffset", 0)
    if type(end_offset) is not int:
        end_offset = _int(raw, "endOffset")
    last = len(pieces) - 1
    n_starts = len(starts)
    chunks: list[Chunk] = []
    expected_start = 0
    for i, piece in enumerate(pieces):
        get = piece.get
        file_offset = get("chunkOffset", 0)
        if type(file_offset) is not int:
            file_offset = _int(piece, "chunkOffset")
        csize = get("chunkSize", 0)
        if type(csize) is not int:
            csize = _int(piece, "chunkSize")
        if csize == 0:
            csize = size - file_offset  # the last piece runs to the end of the file
        offset = get("offset", 0)
        if type(offset) is not int:
            offset = _int(piece, "offset")
        inner = get("innerOffset", 0)
        if type(inner) is not int:
            inner = _int(piece, "innerOffset")
        # Offset 0 is legal: with innerOffset packing the first payload can share the first member.
        if offset < 0 or offset >= data_end:
            raise OutOfBoundsError(
                f"file {name!r} piece at {file_offset}: blob offset {offset} outside data area [0, {data_end})"
            )
        if inner < 0 or inner + csize > INT64_MAX:
            raise OutOfBoundsError(f"file {name!r}: innerOffset {inner} is negative or too large")
        if file_offset != expected_start or csize <= 0:
            raise ChunkCoverageError(
                f"file {name!r}: piece at file offset {file_offset} (size {csize}), expected one at {expected_start}"
            )
        chunk_digest = _digest(piece, "chunkDigest", digests) or (digest if last == 0 else "")
        if not chunk_digest:
            raise InvalidTocError(f"file {name!r}: piece at {file_offset} has no chunkDigest")
        j = bisect.bisect_right(starts, offset)
        blob_end = starts[j] if j < n_starts else data_end
        if i == last and offset < end_offset <= data_end:
            blob_end = min(blob_end, end_offset)
        chunk_type = get("chunkType", "")
        if type(chunk_type) is not str:
            chunk_type = _str(piece, "chunkType")
        chunks.append(
            _new_tuple(Chunk, (file_offset, csize, offset, blob_end, inner, chunk_digest, chunk_type == "zeros"))
        )
        expected_start = file_offset + csize
    if expected_start != size:
        raise ChunkCoverageError(f"file {name!r}: chunks cover {expected_start} of {size} bytes")
    return tuple(chunks)
