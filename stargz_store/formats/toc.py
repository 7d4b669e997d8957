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

Size and speed matter here: a resolve parses every layer's TOC before the layer is reported, and
the model stays in memory while the layer is used (120,000 entries is a realistic image). So
entries and chunks are named tuples (fast to create, no per-instance dict, immutable), small
repeated values (types, permission bits, times, digests) are shared objects, `build_toc` makes
two tight passes over the raw entries, and per-directory child maps are built on first use.
"""
from __future__ import annotations

import base64
import bisect
import calendar
import contextlib
import functools
import gc
import json
import re
import time
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

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
# The module's own type strings, so every entry shares one object per type.
_CANONICAL_TYPES = {t: t for t in ENTRY_TYPES}
# One shared int object per permission value (ints above 256 are otherwise one object per entry).
_PERMISSIONS = tuple(range(0o10000))
_new_tuple = tuple.__new__

try:  # optional: decodes and type-checks TOC JSON in C (see `parse_toc_document`)
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - exercised by forcing the fallback in tests
    _msgspec = None


class Chunk(NamedTuple):
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


class TocEntry(NamedTuple):
    """A file, directory or special node of the layer, as the TOC describes it.

    `mode` holds only permission bits (0o7777); the file type is `type`. `mtime_ns` is 0 when the
    TOC gives no time. `xattrs` values are decoded bytes. `chunks` is empty for all but
    non-empty regular files. Hardlinks are the same object as their target, so identity (`is`)
    means "same inode"; compare `ino` rather than `==` to tell nodes apart.
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
    xattrs: Mapping[str, bytes] = _NO_XATTRS
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


# The checked accessors below are the slow path: `build_toc` inlines the common case (the value
# has the right type) and calls these only to turn None into the zero value or to raise.
def _int(raw: Mapping[str, Any], key: str) -> int:
    v = raw.get(key, 0)
    if type(v) is int:
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


class Toc:
    """A validated layer tree. Lookups are by normalised path (`""` is the root)."""

    def __init__(
        self,
        entries: dict[str, TocEntry],
        children: dict[str, dict[str, TocEntry]] | None,
        order: list[TocEntry],
        *,
        landmark_offset: int | None,
        has_no_prefetch_landmark: bool,
        child_names: dict[str, list[str]] | None = None,
    ) -> None:
        """`children` may be given whole, or left None with `child_names` (directory -> full
        paths of its children, hardlink names included) so each map is built on first use."""
        self._entries = entries
        self._children = children if children is not None else {}
        self._child_names = child_names if children is None else None
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
        found = self._children.get(dir_path)
        if found is not None:
            return found
        names = self._child_names.get(dir_path) if self._child_names is not None else None
        if not names:
            return _NO_CHILDREN
        # Racing threads may both build the map; they build equal ones and either may win.
        cut = len(dir_path) + 1 if dir_path else 0
        entries = self._entries
        built = {name[cut:]: entries[name] for name in names}
        self._children[dir_path] = built
        return built

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

    Pass 1 checks types and names and groups `chunk` entries with their file; pass 2 builds the
    entries, checks parents and counts subdirectories; directory link counts, implicit
    directories and hardlink aliases are settled at the end. `entries()` yields explicit entries
    in TOC order (an implicit root first), then implicit directories, then hardlink names.
    """
    with _gc_paused():
        if _msgspec is None:
            return _build_toc_dicts(raw_entries, data_end)
        try:
            raw = _msgspec.convert(raw_entries if isinstance(raw_entries, list) else list(raw_entries), _RAW_ENTRIES)
        except _msgspec.ValidationError as e:
            raise InvalidTocError(f"TOC entry has a wrong type: {e}") from None
        return _build_toc_structs(raw, data_end)


def parse_toc_document(toc_json: bytes, *, data_end: int) -> Toc:
    """Decode a TOC JSON document (`{"version": 1, "entries": [...]}`) and build the tree.

    Same result and errors as `json.loads` + `build_toc`, but with msgspec installed the JSON is
    decoded straight into typed records (types checked in C, no dict per entry): about twice as
    fast and half the transient memory on a 100,000-entry TOC.
    """
    if _msgspec is None:
        try:
            doc = json.loads(toc_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidTocError(f"TOC is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidTocError("TOC JSON is not an object")
        entries = doc.get("entries")
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise InvalidTocError("TOC 'entries' is not a list")
        return build_toc(entries, data_end=data_end)
    with _gc_paused():
        try:
            doc = _DOC_DECODER.decode(toc_json)
        except _msgspec.ValidationError as e:
            raise InvalidTocError(f"TOC has a wrong type: {e}") from None
        except _msgspec.DecodeError as e:
            raise InvalidTocError(f"TOC is not valid JSON: {e}") from None
        return _build_toc_structs(doc.entries or [], data_end)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC would rescan the raw entries (alive, and tracked when they are dicts) again
    and again while a build allocates ~2 objects per entry, doubling its time; a build makes no
    cycles. Another thread's collections are only deferred for the build's duration."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build_toc_dicts(raw_entries: Iterable[Mapping[str, Any]], data_end: int) -> Toc:
    """The pure-Python build over JSON objects (dicts), checking each field's type as it reads it."""
    # Pass 1: one record (name, type, raw, pieces) per non-chunk entry.
    records: list[tuple[str, str, Mapping[str, Any], list[Mapping[str, Any]] | None]] = []
    by_name: dict[str, tuple[str, str, Mapping[str, Any], list[Mapping[str, Any]] | None]] = {}
    hardlinks: list[tuple[str, str, Mapping[str, Any], Any]] = []
    offsets: list[int] = []
    last_pieces: list[Mapping[str, Any]] | None = None
    types = _CANONICAL_TYPES
    for raw in raw_entries:
        if not isinstance(raw, dict):
            raise InvalidTocError(f"TOC entry is not an object: {raw!r}")
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
        if type(name) is str and name and name[0] not in "./" and "//" not in name and "/." not in name:
            if name[-1] == "/":
                name = name.rstrip("/")
        else:
            name = normalize_name(name if type(name) is str else _str(raw, "name"))
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
    hardlink_target: dict[str, str] = {}
    for rec in hardlinks:
        target = _resolve_hardlink(rec, by_name, _dict_link_name)
        hardlink_target[rec[0]] = target
        link_count[target] = link_count.get(target, 1) + 1

    # Pass 2: entries, parent checks, subdirectory counts, child lists.
    entries: dict[str, TocEntry] = {}
    built: list[TocEntry] = []
    dirs: list[int] = []  # positions in `built` of explicit directories
    subdirs: dict[str, int] = {}
    child_names: dict[str, list[str]] = {}
    implicit: list[str] = []
    implicit_set: set[str] = set()
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
                _check_parent(name, parent, by_name, implicit, implicit_set, subdirs, child_names)
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


def _settle(
    entries: dict[str, TocEntry],
    built: list[TocEntry],
    dirs: list[int],
    subdirs: dict[str, int],
    implicit: list[str],
    ino: int,
    hardlink_target: dict[str, str],
    child_names: dict[str, list[str]],
    landmark_offset: int | None,
) -> Toc:
    """The end of a build: directory link counts (they need every subdirectory, implicit ones
    included), implicit directories (inodes after the explicit entries) and hardlink aliases."""
    for pos in dirs:
        e = built[pos]
        n = subdirs.get(e.name)
        if n:
            e = _new_tuple(TocEntry, (*e[:-1], 2 + n))
            built[pos] = entries[e.name] = e
    for name in implicit:
        nlink = 2 + subdirs.get(name, 0)
        if name:
            entries[name] = _new_tuple(TocEntry, (name, DIR, 0o755, 0, 0, 0, 0, "", 0, 0, _NO_XATTRS, "", (), ino, nlink))
            ino += 1
        else:
            entries[""] = _new_tuple(TocEntry, ("", DIR, 0o755, 0, 0, 0, 0, "", 0, 0, _NO_XATTRS, "", (), 1, nlink))
    for name, target in hardlink_target.items():
        entries[name] = entries[target]
    return Toc(
        entries,
        None,
        built,
        landmark_offset=landmark_offset,
        has_no_prefetch_landmark=NO_PREFETCH_LANDMARK in entries,
        child_names=child_names,
    )


def _resolve_hardlink(rec: tuple, by_name: Mapping[str, tuple], link_of: Callable[[Any], str]) -> str:
    """The name of the non-hardlink entry a hardlink (chain) ends at; `link_of(raw)` is its linkName."""
    hardlink = rec[0]
    seen = {hardlink}
    while rec[1] is HARDLINK:
        target = normalize_name(link_of(rec[2]), what=f"hardlink {rec[0]!r} target")
        if target in seen:
            raise InvalidTocError(f"hardlink loop at {rec[0]!r}")
        seen.add(target)
        found = by_name.get(target)
        if found is None:
            raise MissingHardlinkTargetError(f"hardlink {rec[0]!r} points to missing {target!r}")
        rec = found
    if rec[1] is DIR:
        raise InvalidTocError(f"hardlink {hardlink!r} points to a directory")
    return rec[0]


def _dict_link_name(raw: Mapping[str, Any]) -> str:
    return _str(raw, "linkName")


def _check_parent(
    name: str,
    parent: str,
    by_name: Mapping[str, tuple],
    implicit: list[str],
    implicit_set: set[str],
    subdirs: dict[str, int],
    child_names: dict[str, list[str]],
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
        if inner < 0:
            raise OutOfBoundsError(f"file {name!r}: negative innerOffset {inner}")
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


# --- The msgspec path: the same build over typed records -----------------------------------------
# Field names follow the JSON (`linkName` -> link_name); None stands for JSON null (zero value).

if _msgspec is not None:

    class _RawEntry(_msgspec.Struct, rename="camel", gc=False):
        name: str | None = ""
        type: str | None = ""
        size: int | None = 0
        modtime: str | None = ""
        link_name: str | None = ""
        mode: int | None = 0
        uid: int | None = 0
        gid: int | None = 0
        offset: int | None = 0
        end_offset: int | None = 0
        dev_major: int | None = 0
        dev_minor: int | None = 0
        xattrs: dict[str, str] | None = None
        digest: str | None = ""
        chunk_offset: int | None = 0
        chunk_size: int | None = 0
        chunk_digest: str | None = ""
        inner_offset: int | None = 0
        chunk_type: str | None = ""

    class _RawDocument(_msgspec.Struct):
        entries: list[_RawEntry] | None = None

    _DOC_DECODER = _msgspec.json.Decoder(_RawDocument)
    _RAW_ENTRIES = list[_RawEntry]


def _struct_link_name(raw: Any) -> str:
    return raw.link_name or ""


def _checked_digest(value: str, owner: str, key: str, seen: dict[str, str]) -> str:
    shared = seen.get(value)
    if shared is None:
        if not _DIGEST_RE.match(value):
            raise InvalidTocError(f"entry {owner!r}: {key} {value!r} is not a sha256 digest")
        seen[value] = shared = _copy_str(value)
    return shared


def _copy_str(text: str) -> str:
    """A new string equal to `text`.

    What the model keeps must not be an object the JSON decoder made: each such survivor pins
    the allocator arena it sits in, and the decoder's records fill ~60 MB of arenas for a
    120,000-entry TOC, all of which would stay resident after the records are freed.
    """
    return text.join(("", ""))  # "" + text + "": always a new object, any code points


def _struct_xattrs(name: str, x: Mapping[str, str]) -> Mapping[str, bytes]:
    try:
        return MappingProxyType({k: base64.b64decode(v, validate=True) for k, v in x.items()})
    except (ValueError, TypeError) as e:
        raise InvalidTocError(f"entry {name!r}: xattr value is not base64: {e}") from None


def _build_toc_structs(raw_entries: list[Any], data_end: int) -> Toc:
    """`_build_toc_dicts` over `_RawEntry` records (field types already checked by msgspec), in
    one pass: entries are made as they come; what needs the whole TOC (chunk extents, hardlink
    link counts, parent checks, implicit directories) is settled afterwards from small lists."""
    entries: dict[str, TocEntry] = {}
    built: list[TocEntry] = []
    with_data: list[tuple[int, Any, list[Any]]] = []  # (position, raw, pieces) of files with data
    hardlinks: dict[str, Any] = {}
    dirs: list[int] = []
    child_names: dict[str, list[str]] = {}
    offsets: list[int] = []
    digests: dict[str, str] = {}
    times: dict[str, int] = {}
    ids: dict[int, int] = {}
    perms = _PERMISSIONS
    types = _CANONICAL_TYPES
    root_pos: int | None = None
    landmark_raw: Any = None
    last_pieces: list[Any] | None = None
    ino = 2  # the root is inode 1, explicit or implicit
    for raw in raw_entries:
        etype = types.get(raw.type)
        if etype is None:
            raise InvalidTocError(f"entry {raw.name!r}: unknown type {raw.type!r}")
        if etype is CHUNK:
            if last_pieces is None:
                raise InvalidTocError(f"chunk entry {raw.name!r} does not follow a regular file")
            last_pieces.append(raw)
            off = raw.offset or 0
            if off >= 0:
                offsets.append(off)
            continue
        name = raw.name or ""
        if name and name[0] not in "./" and "//" not in name and "/." not in name:
            name = name.rstrip("/") if name[-1] == "/" else _copy_str(name)
        else:
            name = normalize_name(name)
        if name in entries or name in hardlinks:
            if name == "" and etype is DIR:
                continue  # `./` and `/` both name the root; a repeat of the root is harmless
            raise DuplicateEntryError(f"duplicate entry {name!r} in TOC")
        last_pieces = None
        if name:
            parent = name.rpartition("/")[0]
            siblings = child_names.get(parent)
            if siblings is None:
                siblings = child_names[parent] = []
            siblings.append(name)
            if etype is HARDLINK:
                hardlinks[name] = raw  # its target's inode; settled below
                continue
            this_ino = ino
            ino += 1
        elif etype is not DIR:
            raise InvalidTocError(f"the layer root must be a directory, TOC says {etype!r}")
        else:
            this_ino = 1
            root_pos = len(built)
        modtime = raw.modtime or ""
        mtime_ns = times.get(modtime)
        if mtime_ns is None:
            mtime_ns = times[modtime] = parse_time_ns(modtime)
        digest = raw.digest
        digest = _checked_digest(digest, name, "digest", digests) if digest else ""
        size = 0
        link_name = ""
        if etype is REG:
            last_pieces = [raw]
            off = raw.offset or 0
            if off >= 0:
                offsets.append(off)
            size = raw.size or 0
            if size < 0:
                raise OutOfBoundsError(f"file {name!r} has negative size {size}")
            if size:
                with_data.append((len(built), raw, last_pieces))
            if name == PREFETCH_LANDMARK:
                landmark_raw = raw
        elif etype is SYMLINK:
            link_name = _copy_str(raw.link_name) if raw.link_name else ""
        elif etype is DIR:
            dirs.append(len(built))
        uid = raw.uid or 0
        if uid > 256:
            uid = ids.setdefault(uid, uid + 0)
        gid = raw.gid or 0
        if gid > 256:
            gid = ids.setdefault(gid, gid + 0)
        e = _new_tuple(
            TocEntry,
            (
                name, etype, perms[(raw.mode or 0) & 0o7777], uid, gid, size + 0, mtime_ns, link_name,
                raw.dev_major or 0, raw.dev_minor or 0, _struct_xattrs(name, raw.xattrs) if raw.xattrs else _NO_XATTRS,
                digest, (), this_ino, 1,
            ),
        )
        entries[name] = e
        built.append(e)

    # Chunks: each piece's compressed extent ends at the next larger data offset.
    starts = sorted(set(offsets))
    del offsets
    if starts and starts[-1] >= data_end:
        raise OutOfBoundsError(f"data offset {starts[-1]} is at or beyond the TOC at {data_end}")
    for pos, raw, pieces in with_data:
        e = built[pos]
        chunks = _build_chunks_structs(e.name, raw, pieces, e.size, e.digest, starts, data_end, digests)
        built[pos] = entries[e.name] = _new_tuple(TocEntry, (*e[:12], chunks, e.ino, 1))

    # Hardlinks: resolve chains to the final non-hardlink target; count its links.
    link_count: dict[str, int] = {}
    hardlink_target: dict[str, str] = {}
    for name, raw in hardlinks.items():
        seen = {name}
        link = raw
        while True:
            target = normalize_name(link.link_name or "", what=f"hardlink {name!r} target")
            if target in seen:
                raise InvalidTocError(f"hardlink loop at {name!r}")
            seen.add(target)
            found = entries.get(target)
            if found is not None:
                break
            link = hardlinks.get(target)
            if link is None:
                raise MissingHardlinkTargetError(f"hardlink {name!r} points to missing {target!r}")
        if found.type is DIR:
            raise InvalidTocError(f"hardlink {name!r} points to a directory")
        hardlink_target[name] = target
        link_count[target] = link_count.get(target, 1) + 1
    for target, count in link_count.items():
        e = entries[target]
        pos = e.ino - 2  # explicit entries sit in `built` in inode order, the root wherever it came
        if root_pos is not None and root_pos <= pos:
            pos += 1
        built[pos] = entries[target] = _new_tuple(TocEntry, (*e[:14], count))

    # Parents must be directories; missing ones become implicit directories.
    subdirs: dict[str, int] = {}
    for pos in dirs:
        name = built[pos].name
        if name:
            parent = name.rpartition("/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1
    implicit: list[str] = []
    implicit_set: set[str] = set()
    if "" not in entries:
        implicit.append("")
        implicit_set.add("")
    for parent in list(child_names):
        child = child_names[parent][0]
        while True:
            found = entries.get(parent)
            if found is not None:
                if found.type is not DIR:
                    raise InvalidTocError(f"entry {child!r} has a non-directory parent {parent!r}")
                break
            if parent in hardlinks:
                raise InvalidTocError(f"entry {child!r} has a non-directory parent {parent!r}")
            if parent in implicit_set:
                break
            implicit.append(parent)
            implicit_set.add(parent)
            grandparent = parent.rpartition("/")[0]
            subdirs[grandparent] = subdirs.get(grandparent, 0) + 1
            child_names.setdefault(grandparent, []).append(parent)
            child, parent = parent, grandparent

    landmark_offset = (landmark_raw.offset or 0) if landmark_raw is not None else None
    if "" in implicit_set:  # the documented order: an implicit root first
        entries = {"": None, **entries}  # type: ignore[dict-item]  # replaced by _settle
    return _settle(entries, built, dirs, subdirs, implicit, ino, hardlink_target, child_names, landmark_offset)


def _build_chunks_structs(
    name: str,
    raw: Any,
    pieces: list[Any],
    size: int,
    digest: str,
    starts: list[int],
    data_end: int,
    digests: dict[str, str],
) -> tuple[Chunk, ...]:
    end_offset = raw.end_offset or 0
    last = len(pieces) - 1
    n_starts = len(starts)
    chunks: list[Chunk] = []
    expected_start = 0
    for i, piece in enumerate(pieces):
        file_offset = piece.chunk_offset or 0
        csize = piece.chunk_size or 0
        if csize == 0:
            csize = size - file_offset  # the last piece runs to the end of the file
        offset = piece.offset or 0
        inner = piece.inner_offset or 0
        if offset < 0 or offset >= data_end:
            raise OutOfBoundsError(
                f"file {name!r} piece at {file_offset}: blob offset {offset} outside data area [0, {data_end})"
            )
        if inner < 0:
            raise OutOfBoundsError(f"file {name!r}: negative innerOffset {inner}")
        if file_offset != expected_start or csize <= 0:
            raise ChunkCoverageError(
                f"file {name!r}: piece at file offset {file_offset} (size {csize}), expected one at {expected_start}"
            )
        chunk_digest = piece.chunk_digest
        if chunk_digest:
            chunk_digest = _checked_digest(chunk_digest, name, "chunkDigest", digests)
        elif last == 0:
            chunk_digest = digest
        if not chunk_digest:
            raise InvalidTocError(f"file {name!r}: piece at {file_offset} has no chunkDigest")
        j = bisect.bisect_right(starts, offset)
        blob_end = starts[j] if j < n_starts else data_end
        if i == last and offset < end_offset <= data_end:
            blob_end = min(blob_end, end_offset)
        chunks.append(  # `+ 0`: new ints, not the decoder's (see `_copy_str`)
            _new_tuple(
                Chunk,
                (file_offset + 0, csize + 0, offset + 0, blob_end + 0, inner + 0, chunk_digest, piece.chunk_type == "zeros"),
            )
        )
        expected_start = file_offset + csize
    if expected_start != size:
        raise ChunkCoverageError(f"file {name!r}: chunks cover {expected_start} of {size} bytes")
    return tuple(chunks)
