"""The TOC model shared by eStargz and zstd:chunked: immutable entries and the tree they form.

Both formats describe a layer with the same JSON vocabulary (`estargz.md` §5, `zstd-chunked.md`
§2.6): one entry per tar entry, plus `chunk` entries for further pieces of large files. This module
turns that list into a validated tree; the format modules only locate, authenticate and
decompress the TOC, and decompress chunks.

Invariants once a `Toc` is built:
- names are normalised (`./a/b/` -> `a/b`; the root is `""`), none escapes the root;
- every regular file's chunks cover `[0, size)` exactly, in order, each with a sha256 digest;
- every chunk's compressed extent `[blob_offset, blob_end)` lies inside the blob's data area;
- hardlink names resolve to their target's entry (same object, same inode);
- `nlink` is 2 + subdirectories for directories, 1 + hardlinks for the rest.
"""
from __future__ import annotations

import base64
import bisect
import calendar
import functools
import re
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping

from .errors import (
    ChunkCoverageError,
    DuplicateEntryError,
    EntryEscapesRootError,
    InvalidTocError,
    MissingHardlinkTargetError,
    OutOfBoundsError,
)

DIR, REG, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO, CHUNK = (
    "dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk",
)
ENTRY_TYPES = frozenset({DIR, REG, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO, CHUNK})

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
TOC_TAR_NAME = "stargz.index.json"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently compressed piece of a regular file.

    `blob_offset`/`blob_end` bound the compressed bytes to fetch (a gzip member or zstd frame
    starts at `blob_offset`); after decompressing, skip `inner_offset` bytes and take `size`.
    """

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int
    digest: str
    zeros: bool = False


@dataclass(frozen=True, slots=True)
class TocEntry:
    """A file, directory or special node of the layer, as the TOC describes it.

    `mode` holds only permission bits (0o7777); the file type is `type`. `mtime_ns` is 0 when the
    TOC gives no time. `xattrs` values are decoded bytes. `chunks` is empty for all but
    non-empty regular files.
    """

    name: str
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: _NO_XATTRS)
    digest: str = ""
    chunks: tuple[Chunk, ...] = ()
    ino: int = 0
    nlink: int = 1

    @property
    def basename(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def chunk_index_for_offset(self, offset: int) -> int:
        """Index of the chunk holding file byte `offset` (which must be in `[0, size)`)."""
        return bisect.bisect_right(self.chunks, offset, key=_chunk_file_offset) - 1

    def chunks_for_range(self, offset: int, length: int) -> tuple[Chunk, ...]:
        """The chunks that hold file bytes `[offset, offset+length)`, clipped to the file."""
        if length <= 0 or offset >= self.size or not self.chunks:
            return ()
        end = min(self.size, offset + length)
        first = self.chunk_index_for_offset(offset)
        last = self.chunk_index_for_offset(end - 1)
        return self.chunks[first : last + 1]


def _chunk_file_offset(c: Chunk) -> int:
    return c.file_offset


def normalize_name(raw: str, *, what: str = "entry") -> str:
    """`./a//b/` -> `a/b`; the root is `""`. Absolute names and `..` components are refused.

    The Go reader silently rewrites `../x` to `x`; we refuse it, since a TOC that tries to leave
    the root is either broken or hostile.
    """
    if raw.startswith("/"):
        raw_rel = raw.lstrip("/")
        if raw_rel not in ("", "."):
            raise EntryEscapesRootError(f"{what} {raw!r} is an absolute path")
        return ""
    parts = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise EntryEscapesRootError(f"{what} {raw!r} escapes the layer root with '..'")
        parts.append(part)
    return "/".join(parts)


_TIME_RE = re.compile(
    r"^(-?\d{4,})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$"
)


@functools.lru_cache(maxsize=4096)  # layers repeat a handful of mtimes across thousands of entries
def parse_time_ns(text: str) -> int:
    """RFC 3339 (as Go writes `time.Time`) to nanoseconds since the epoch; "" is 0.

    Go's zero time (year 1) also means "unknown" and maps to 0, never to year 1.
    """
    if not text:
        return 0
    m = _TIME_RE.match(text)
    if not m:
        raise InvalidTocError(f"unparseable modtime {text!r}")
    year, mon, day, hh, mm, ss = (int(m.group(i)) for i in range(1, 7))
    if year <= 1:
        return 0
    frac = m.group(7) or ""
    ns = int(frac.ljust(9, "0")) if frac else 0
    secs = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
    zone = m.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        secs -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return secs * 1_000_000_000 + ns


def format_time(mtime_ns: int) -> str:
    """Seconds-precision RFC 3339 UTC, as the eStargz writer emits (`""` for 0)."""
    if mtime_ns == 0:
        return ""
    t = time.gmtime(mtime_ns // 1_000_000_000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}Z"


def _int(raw: Mapping[str, Any], key: str) -> int:
    v = raw.get(key, 0)
    if type(v) is int:  # the common case first: this runs ~15 times per entry
        return v
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidTocError(f"entry {raw.get('name')!r}: {key} must be an integer, got {v!r}")
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
    try:
        return MappingProxyType({k: base64.b64decode(v, validate=True) for k, v in x.items()})
    except (ValueError, TypeError) as e:
        raise InvalidTocError(f"entry {raw.get('name')!r}: xattr value is not base64: {e}") from None


def _digest(raw: Mapping[str, Any], key: str) -> str:
    d = _str(raw, key)
    if d and not _DIGEST_RE.match(d):
        raise InvalidTocError(f"entry {raw.get('name')!r}: {key} {d!r} is not a sha256 digest")
    return d


@dataclass
class _Pending:
    raw: Mapping[str, Any]
    name: str
    type: str
    pieces: list[Mapping[str, Any]]


class Toc:
    """A validated layer tree. Lookups are by normalised path (`""` is the root)."""

    def __init__(
        self,
        entries: dict[str, TocEntry],
        children: dict[str, dict[str, TocEntry]],
        order: list[TocEntry],
        *,
        landmark_offset: int | None,
        has_no_prefetch_landmark: bool,
    ) -> None:
        self._entries = entries
        self._children = children
        self._order = order
        self.prefetch_landmark_offset = landmark_offset
        self.has_no_prefetch_landmark = has_no_prefetch_landmark

    @property
    def root(self) -> TocEntry:
        return self._entries[""]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, path: str) -> TocEntry | None:
        return self._entries.get(path)

    def children(self, dir_path: str) -> Mapping[str, TocEntry]:
        """Raw children (whiteouts and landmarks included) by base name."""
        return self._children.get(dir_path, _NO_CHILDREN)

    def entries(self) -> Iterator[tuple[str, TocEntry]]:
        """Every (path, entry) pair; hardlink paths yield their target's entry."""
        return iter(self._entries.items())

    def files_in_blob_order(self) -> list[TocEntry]:
        """Regular files with data, in the order their chunks appear in the blob (prefetch order)."""
        return [e for e in self._order if e.type == REG and e.chunks]

    def uids(self) -> list[int]:
        return sorted({e.uid for e in self._order})

    def gids(self) -> list[int]:
        return sorted({e.gid for e in self._order})


_NO_CHILDREN: Mapping[str, TocEntry] = MappingProxyType({})


def build_toc(raw_entries: Iterable[Mapping[str, Any]], *, data_end: int) -> Toc:
    """Validate the TOC's `entries` list and build the tree.

    `data_end` is where file data must end: the TOC's offset in the blob (nothing after it holds
    file payload). Chunk extents are derived as the Go reader does (`estargz.md` §6.4): a piece
    extends to the next larger data offset in the blob, or `data_end`; a zstd:chunked `endOffset`
    bounds a file's last piece more tightly.
    """
    pending: dict[str, _Pending] = {}
    order: list[_Pending] = []
    last: _Pending | None = None
    for raw in raw_entries:
        if not isinstance(raw, dict):
            raise InvalidTocError(f"TOC entry is not an object: {raw!r}")
        etype = raw.get("type")
        if etype not in ENTRY_TYPES:
            raise InvalidTocError(f"entry {raw.get('name')!r}: unknown type {etype!r}")
        if etype == CHUNK:
            if last is None or last.type != REG:
                raise InvalidTocError(f"chunk entry {raw.get('name')!r} does not follow a regular file")
            last.pieces.append(raw)
            continue
        name = normalize_name(_str(raw, "name"))
        if name in pending:
            if name == "" and etype == DIR and pending[""].type == DIR:
                continue  # `./` and `/` both name the root; a repeat of the root is harmless
            raise DuplicateEntryError(f"duplicate entry {name!r} in TOC")
        if name == "" and etype != DIR:
            raise InvalidTocError(f"the layer root must be a directory, TOC says {etype!r}")
        p = _Pending(raw, name, etype, [raw] if etype == REG else [])
        pending[name] = p
        order.append(p)
        last = p

    # Every offset that starts a piece of data, to bound each piece's compressed extent.
    starts = sorted({_int(piece, "offset") for p in order for piece in p.pieces if _int(piece, "offset") >= 0})
    for off in starts[-1:]:
        if off >= data_end:
            raise OutOfBoundsError(f"data offset {off} is at or beyond the TOC at {data_end}")

    def extent_end(offset: int, inner: int) -> int:
        i = bisect.bisect_right(starts, offset)
        return starts[i] if i < len(starts) else data_end

    # Hardlinks: resolve chains to the final non-hardlink target.
    def resolve(p: _Pending, seen: set[str]) -> _Pending:
        while p.type == HARDLINK:
            target = normalize_name(_str(p.raw, "linkName"), what=f"hardlink {p.name!r} target")
            if target in seen:
                raise InvalidTocError(f"hardlink loop at {p.name!r}")
            seen.add(target)
            t = pending.get(target)
            if t is None:
                raise MissingHardlinkTargetError(f"hardlink {p.name!r} points to missing {target!r}")
            p = t
        return p

    link_count: dict[str, int] = {}
    hardlink_target: dict[str, str] = {}
    for p in order:
        if p.type == HARDLINK:
            t = resolve(p, {p.name})
            if t.type == DIR:
                raise InvalidTocError(f"hardlink {p.name!r} points to a directory")
            hardlink_target[p.name] = t.name
            link_count[t.name] = link_count.get(t.name, 1) + 1

    # Implicit parent directories, and subdirectory counts for nlink.
    dir_names = {p.name for p in order if p.type == DIR}
    implicit: list[str] = []
    if "" not in pending:
        implicit.append("")
    for p in order:
        parent = p.name.rpartition("/")[0] if p.name else None
        while parent is not None and parent not in pending and parent not in dir_names:
            dir_names.add(parent)
            implicit.append(parent)
            parent = parent.rpartition("/")[0] if parent else None
        if parent is not None and parent in pending and pending[parent].type != DIR:
            raise InvalidTocError(f"entry {p.name!r} has a non-directory parent {parent!r}")
    subdirs: dict[str, int] = {}
    for d in dir_names:
        if d:
            par = d.rpartition("/")[0]
            subdirs[par] = subdirs.get(par, 0) + 1

    entries: dict[str, TocEntry] = {}
    built: list[TocEntry] = []
    ino = 1
    for name in implicit:
        entries[name] = TocEntry(name=name, type=DIR, mode=0o755, nlink=2 + subdirs.get(name, 0), ino=0)
    if "" in entries:
        entries[""] = _with_ino(entries[""], ino)
        ino += 1
    landmark_offset: int | None = None
    for p in order:
        if p.type == HARDLINK:
            continue
        raw = p.raw
        chunks = _build_chunks(p, extent_end, data_end) if p.type == REG else ()
        nlink = 2 + subdirs.get(p.name, 0) if p.type == DIR else link_count.get(p.name, 1)
        e = TocEntry(
            name=p.name,
            type=p.type,
            mode=_int(raw, "mode") & 0o7777,
            uid=_int(raw, "uid"),
            gid=_int(raw, "gid"),
            size=_int(raw, "size") if p.type == REG else 0,
            mtime_ns=parse_time_ns(_str(raw, "modtime")),
            link_name=_str(raw, "linkName") if p.type == SYMLINK else "",
            dev_major=_int(raw, "devMajor"),
            dev_minor=_int(raw, "devMinor"),
            xattrs=_xattrs(raw),
            digest=_digest(raw, "digest"),
            chunks=chunks,
            ino=ino,
            nlink=nlink,
        )
        ino += 1
        entries[p.name] = e
        built.append(e)
        if p.name == PREFETCH_LANDMARK and p.type == REG:
            landmark_offset = _int(raw, "offset")
    for name in implicit:
        if name:
            entries[name] = _with_ino(entries[name], ino)
            ino += 1
    for name, target in hardlink_target.items():
        entries[name] = entries[target]

    children: dict[str, dict[str, TocEntry]] = {}
    for name, e in entries.items():
        if name == "":
            continue
        parent, _, base = name.rpartition("/")
        children.setdefault(parent, {})[base] = e
    return Toc(
        entries,
        children,
        built,
        landmark_offset=landmark_offset,
        has_no_prefetch_landmark=NO_PREFETCH_LANDMARK in entries,
    )


def _with_ino(e: TocEntry, ino: int) -> TocEntry:
    return TocEntry(name=e.name, type=e.type, mode=e.mode, nlink=e.nlink, ino=ino)


def _build_chunks(p: _Pending, extent_end, data_end: int) -> tuple[Chunk, ...]:
    raw = p.raw
    size = _int(raw, "size")
    if size < 0:
        raise OutOfBoundsError(f"file {p.name!r} has negative size {size}")
    if size == 0:
        return ()
    end_offset = _int(raw, "endOffset")
    chunks: list[Chunk] = []
    expected_start = 0
    for i, piece in enumerate(p.pieces):
        file_offset = _int(piece, "chunkOffset")
        csize = _int(piece, "chunkSize")
        if csize == 0:
            csize = size - file_offset  # the last piece runs to the end of the file
        offset = _int(piece, "offset")
        inner = _int(piece, "innerOffset")
        # Offset 0 is legal: with innerOffset packing the first payload can share the first member.
        if offset < 0 or offset >= data_end:
            raise OutOfBoundsError(
                f"file {p.name!r} piece at {file_offset}: blob offset {offset} outside data area [0, {data_end})"
            )
        if inner < 0:
            raise OutOfBoundsError(f"file {p.name!r}: negative innerOffset {inner}")
        if file_offset != expected_start or csize <= 0:
            raise ChunkCoverageError(
                f"file {p.name!r}: piece at file offset {file_offset} (size {csize}), expected one at {expected_start}"
            )
        digest = _digest(piece, "chunkDigest") or (
            _digest(raw, "digest") if len(p.pieces) == 1 else ""
        )
        if not digest:
            raise InvalidTocError(f"file {p.name!r}: piece at {file_offset} has no chunkDigest")
        blob_end = extent_end(offset, inner)
        if i == len(p.pieces) - 1 and end_offset > offset:
            blob_end = min(blob_end, end_offset) if end_offset <= data_end else blob_end
        chunks.append(
            Chunk(
                file_offset=file_offset,
                size=csize,
                blob_offset=offset,
                blob_end=blob_end,
                inner_offset=inner,
                digest=digest,
                zeros=_str(piece, "chunkType") == "zeros",
            )
        )
        expected_start = file_offset + csize
    if expected_start != size:
        raise ChunkCoverageError(f"file {p.name!r}: chunks cover {expected_start} of {size} bytes")
    return tuple(chunks)
