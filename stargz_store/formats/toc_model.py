"""The TOC model shared by eStargz and zstd:chunked: immutable entries and the tree they form.

Both formats describe a layer with the same JSON vocabulary (`estargz.md` §5, `zstd-chunked.md`
§2.6): one entry per tar entry, plus `chunk` entries for further pieces of large files. This module
holds what a built tree is made of; `toc_records` builds it from the JSON (validating every entry)
and `toc` is the front door (`build_toc`, `parse_toc_document`).

Invariants once a `Toc` is built:
- names are normalised (`./a/b/` -> `a/b`; the root is `""`), none escapes the root, and each
  is a name the kernel can have: no NUL, no empty, `.` or `..` component;
- no more entries (implied directories included) and no deeper names than `TocLimits` allow;
- every regular file's chunks cover `[0, size)` exactly, in order, each with a sha256 digest, and
  no chunk is larger than `TocLimits.max_chunk_size` (inflated or compressed);
- every chunk's compressed extent `[blob_offset, blob_end)` lies inside the blob's data area;
- hardlink names resolve to their target's entry (same object, same inode);
- `nlink` is 2 + subdirectories for directories, 1 + hardlinks for the rest.

Size and speed matter here: a resolve parses every layer's TOC before the layer is reported, and
the model stays in memory while the layer is used (120,000 entries is a realistic image). So
entries and chunks are named tuples (fast to create, no per-instance dict, immutable), repeated
values (types, permission bits, times, digests) are shared objects, and per-directory child maps
are built on first use.
"""
from __future__ import annotations

import bisect
import calendar
import functools
import operator
import re
import time
from types import MappingProxyType
from typing import Iterator, Mapping, NamedTuple

from .errors import InvalidTocError

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
    if not (1 <= mon <= 12 and 1 <= day <= 31 and hh <= 23 and mm <= 59 and ss <= 60):
        raise InvalidTocError(f"modtime {text!r} is not a date")
    try:
        secs = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
    except (ValueError, OverflowError):  # February 30th, year 10000
        raise InvalidTocError(f"modtime {text!r} is not a date") from None
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
        self._files: tuple[TocEntry, ...] | None = None
        self._uids: tuple[int, ...] | None = None
        self._gids: tuple[int, ...] | None = None
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
        if self._files is None:
            self._files = tuple(e for e in self._order if e.chunks)  # only regular files have chunks
        return list(self._files)

    def uids(self) -> list[int]:
        """Distinct owners of the explicit entries (the ALS `info` file's `uidset`), sorted."""
        if self._uids is None:
            self._uids = tuple(sorted(set(map(_UID_OF, self._order))))
        return list(self._uids)

    def gids(self) -> list[int]:
        if self._gids is None:
            self._gids = tuple(sorted(set(map(_GID_OF, self._order))))
        return list(self._gids)


_NO_CHILDREN: Mapping[str, TocEntry] = MappingProxyType({})
_UID_OF = operator.itemgetter(TocEntry._fields.index("uid"))
_GID_OF = operator.itemgetter(TocEntry._fields.index("gid"))


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


def _copy_str(text: str) -> str:
    """A new string equal to `text`.

    What the model keeps must not be an object the JSON decoder made: each such survivor pins
    the allocator arena it sits in, and the decoder's records fill ~60 MB of arenas for a
    120,000-entry TOC, all of which would stay resident after the records are freed.
    """
    return text.join(("", ""))  # "" + text + "": always a new object, any code points

