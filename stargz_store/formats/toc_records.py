"""The one TOC builder: a `Toc` from typed records that msgspec decodes straight from the JSON.

msgspec checks every field's type in C while decoding (a string where an int belongs, a bool, a
float: all refused) and makes no dict per entry, so the build is one Python pass over compact
records: about twice as fast as `json.loads` over dicts, with half the transient memory. Entries
already decoded as dicts (`toc.build_toc`) are converted to the same records first, so both entry
points give the same tree and the same typed errors (tests/formats/test_toc_paths.py).
Call it through `toc.build_toc` / `toc.parse_toc_document`.

Memory: a JSON document is decoded a batch of entries at a time (`RecordBatches`), and what the
second pass needs of a file's pieces waits in one small tuple per piece, not in its records. So
the records of a whole layer never live at once, and the few arenas a batch fills are reused by
the next batch instead of being left behind, part empty, between the tree's objects (44,000
entries: Python's allocator held 71 arenas of 1 MiB after the build, 19 MB of them in empty pools;
now 53, 3.5 MB; the process's RSS 98 -> 86 MB). The price is one more pass over the JSON, the
index of entries: 8-12 % more instructions for a whole build (benchmarks/startup/README.md,
round 6).
"""
from __future__ import annotations

import base64
import bisect
import itertools
import re
from array import array
from collections import defaultdict
from types import MappingProxyType
from typing import Annotated, Any, Iterable, Iterator, Literal, Mapping, Sequence

import msgspec

from .errors import ChunkCoverageError, DuplicateEntryError, InvalidTocError, OutOfBoundsError
from .toc_model import (
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
    _copy_str,
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


# msgspec hands back these very objects for a Literal field (no string per entry, and `is`
# compares against the module's constants); any other type string is a ValidationError.
_EntryType = Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"]
# Go's TOCEntry fields are int64: a larger number is refused, not carried into offsets and sizes.
_Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class _RawEntry(msgspec.Struct, rename="camel", gc=False):
    """One TOC entry as decoded. Field names follow the JSON (`linkName` -> link_name); None is a
    JSON null (read as the zero value). `gc=False`: records hold only strings and numbers, never
    a cycle, so the GC need not track 100,000 of them."""

    name: str | None = ""
    type: _EntryType | None = None
    size: _Int64 | None = 0
    modtime: str | None = ""
    link_name: str | None = ""
    mode: _Int64 | None = 0
    uid: _Int64 | None = 0
    gid: _Int64 | None = 0
    offset: _Int64 | None = 0
    end_offset: _Int64 | None = 0
    dev_major: _Int64 | None = 0
    dev_minor: _Int64 | None = 0
    xattrs: dict[str, str] | None = None
    digest: str | None = ""
    chunk_offset: _Int64 | None = 0
    chunk_size: _Int64 | None = 0
    chunk_digest: str | None = ""
    inner_offset: _Int64 | None = 0
    chunk_type: str | None = ""


class _RawIndex(msgspec.Struct, rename="camel"):
    """The document with each entry left undecoded: a `Raw` view of its bytes (no copy, ~50
    bytes each), so the entries can be decoded a batch at a time (`RecordBatches`)."""

    entries: list[msgspec.Raw] | None = None
    tar_split_digest: str | None = ""


class _Counted(msgspec.Struct, gc=False):
    """An entry decoded only to be counted: 16 bytes, every field skipped."""


class _CountedDocument(msgspec.Struct):
    entries: list[_Counted] | None = None


_INDEX_DECODER = msgspec.json.Decoder(_RawIndex)
_BATCH_DECODER = msgspec.json.Decoder(list[_RawEntry])
_COUNT_DECODER = msgspec.json.Decoder(_CountedDocument)
_RAW_ENTRIES = list[_RawEntry]
# Entries decoded at once: ~600 bytes of records each, so a batch fills well under a megabyte.
RECORD_BATCH = 1024
_BATCH_INDEX_RE = re.compile(r"`\$\[(\d+)\]")


def _decode(decoder: msgspec.json.Decoder, toc_json: bytes | bytearray) -> Any:
    try:
        return decoder.decode(toc_json)
    except msgspec.ValidationError as e:
        raise InvalidTocError(f"TOC has a wrong type: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidTocError(f"TOC is not valid JSON: {e}") from None


class RecordBatches:
    """The `entries` of a TOC document as `_RawEntry` records, decoded a batch at a time.

    Iterating twice decodes twice (the duplicate-name error's slow path does). A wrong type in
    an entry is found when its batch is decoded, and named by its place in the document."""

    def __init__(self, raws: list[msgspec.Raw]) -> None:
        self._raws = raws

    def __len__(self) -> int:
        return len(self._raws)

    def batches(self) -> Iterator[list[Any]]:
        raws = self._raws
        for start in range(0, len(raws), RECORD_BATCH):
            yield _decode_batch(b"".join((b"[", b",".join(raws[start : start + RECORD_BATCH]), b"]")), start)


def _decode_batch(data: bytes, start: int) -> list[Any]:
    try:
        return _BATCH_DECODER.decode(data)
    except msgspec.ValidationError as e:
        where = _BATCH_INDEX_RE.sub(lambda m: f"`$.entries[{start + int(m.group(1))}]", str(e))
        raise InvalidTocError(f"TOC has a wrong type: {where}") from None
    except msgspec.DecodeError as e:  # each entry was checked as JSON when the index was decoded
        raise InvalidTocError(f"TOC is not valid JSON: {e}") from None


Records = Sequence[Any] | RecordBatches


def records_from_json(toc_json: bytes | bytearray) -> tuple[RecordBatches, str]:
    """The `entries` of a TOC document (decoded lazily, `RecordBatches`), and its `tarSplitDigest`."""
    doc = _decode(_INDEX_DECODER, toc_json)
    return RecordBatches(doc.entries or []), doc.tar_split_digest or ""


def count_entries(toc_json: bytes | bytearray) -> int:
    """How many entries the document lists, at 24 bytes of memory each (see `toc.count_objects`)."""
    return len(_decode(_COUNT_DECODER, toc_json).entries or ())


def _batches(records: Records) -> Iterable[list[Any]] | tuple[Sequence[Any]]:
    return records.batches() if isinstance(records, RecordBatches) else (records,)


def records_from_dicts(raw_entries: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Already-decoded JSON objects as `_RawEntry` records (the same type checks, in C)."""
    try:
        return msgspec.convert(raw_entries if isinstance(raw_entries, list) else list(raw_entries), _RAW_ENTRIES)
    except msgspec.ValidationError as e:
        raise InvalidTocError(f"TOC entry has a wrong type: {e}") from None


def _checked_digest(value: str, owner: str, key: str, seen: dict[str, str]) -> str:
    shared = seen.get(value)
    if shared is None:
        if not _DIGEST_RE.match(value):
            raise InvalidTocError(f"entry {owner!r}: {key} {value!r} is not a sha256 digest")
        seen[value] = shared = _copy_str(value)
    return shared


def _struct_xattrs(name: str, x: Mapping[str, str]) -> Mapping[str, bytes]:
    check_xattr_names(name, x)
    try:
        return MappingProxyType({k: base64.b64decode(v, validate=True) for k, v in x.items()})
    except (ValueError, TypeError) as e:
        raise InvalidTocError(f"entry {name!r}: xattr value is not base64: {e}") from None


def build_from_records(raw_entries: Records, data_end: int, limits: TocLimits) -> Toc:
    """The tree from `_RawEntry` records (field types already checked by msgspec), in one pass.

    Entries are made as they come; what needs the whole TOC (chunk extents, hardlink link counts,
    parent checks, implicit directories) is settled afterwards from short lists and one small
    tuple per piece of a file with data: no record outlives its batch (see the module's docstring). Everything the tree keeps is a fresh
    object, not one of the decoder's (see `toc._copy_str`).

    This loop is most of a resolve's CPU time (~2 us per entry), hence the local bindings, the
    one-slot caches and the inline one-piece chunk path; `_build_chunks` stays the
    general rule (and the one that words a bad piece's error). The caller has checked the entry
    count against `limits`; names are checked for depth here, implied directories counted.
    """
    # Data files hold their plain field tuple until their chunks are built. The root's slot is
    # reserved first, as the documented order wants an implicit root first (copying a 120,000-key
    # dict to put it there afterwards costs more than the whole hardlink pass).
    entries: dict[str, Any] = {"": None}
    built: list[Any] = []
    # Files with data: their positions in `built`. Until the second pass, such a file's field
    # tuple holds, where its chunks go, its one piece (a `_piece` tuple) or a list of them.
    data_pos = array("q")
    add_data_pos = data_pos.append
    hardlinks: dict[str, str] = {}  # name -> linkName
    dirs: list[int] = []
    child_names: defaultdict[str, list[str]] = defaultdict(list)  # a plain dict for the Toc
    offsets: list[int] = []
    digests: dict[str, str] = {}
    times: dict[str, int] = {}
    ids: dict[int, int] = {}
    perms = _PERMISSIONS
    new_tuple = _new_tuple
    entry_cls = TocEntry
    no_xattrs = _NO_XATTRS
    add_offset = offsets.append
    add_built = built.append
    root_pos: int | None = None
    landmark_offset: int | None = None
    # What a `chunk` entry continues: None (nothing: an error), the name of a file with data
    # (its pieces are kept), or "" (an empty file: the pieces' offsets count, nothing else).
    piece_owner: str | None = None
    owner_pieces: list[tuple] | None = None
    # TOCs repeat a few mtimes and digests (empty files) in runs: one-slot caches save a hash and
    # a dict lookup per entry (the hot loop runs ~120,000 times per resolve).
    last_modtime: str | None = None
    last_digest: str | None = None
    last_shared_digest = ""
    mtime_ns = 0
    hardlink_count = 0
    ino = 2  # the root is inode 1, explicit or implicit
    long_name = limits.long_name
    for raw in itertools.chain.from_iterable(_batches(raw_entries)):
        etype = raw.type  # one of the module's constants (see _EntryType), or None
        if etype is None:
            raise InvalidTocError(f"entry {raw.name!r} has no type")
        if etype is CHUNK:
            if piece_owner is None:
                raise InvalidTocError(f"chunk entry {raw.name!r} does not follow a regular file")
            off = raw.offset or 0
            if off >= 0:
                add_offset(off)
            if piece_owner:
                chunk_digest = raw.chunk_digest
                if chunk_digest:
                    chunk_digest = _checked_digest(chunk_digest, piece_owner, "chunkDigest", digests)
                piece = _piece(raw, off, chunk_digest or None, 0)
                if owner_pieces is None:  # the file's second piece: its field tuple takes a list
                    f = entries[piece_owner]
                    owner_pieces = [f[12], piece]
                    built[data_pos[-1]] = entries[piece_owner] = (*f[:12], owner_pieces, *f[13:])
                else:
                    owner_pieces.append(piece)
            continue
        name = raw.name or ""
        if name and name[0] not in "./" and "//" not in name and "/." not in name and "\0" not in name:
            name = name.rstrip("/") if name[-1] == "/" else name.join(("", ""))  # a copy: see _copy_str
        else:
            name = normalize_name(name)
        if len(name) > long_name:
            check_depth(name, limits)
        # Duplicate names are found after the loop, by counting (a lookup per entry costs more).
        piece_owner = None
        if name:
            # Entries come grouped by directory: the previous entry's sibling list is usually
            # this one's, and telling so is cheaper than cutting and hashing the parent's name.
            child_names[name.rpartition("/")[0]].append(name)
            if etype is HARDLINK:
                hardlinks[name] = raw.link_name or ""  # its target's inode; settled below
                hardlink_count += 1
                continue
            this_ino = ino
            ino += 1
        elif root_pos is not None:
            if etype is DIR:
                continue  # `./` and `/` both name the root; a repeat of the root is harmless
            raise DuplicateEntryError("duplicate entry '' in TOC")
        elif etype is not DIR:
            raise InvalidTocError(f"the layer root must be a directory, TOC says {etype!r}")
        else:
            this_ino = 1
            root_pos = len(built)
        modtime = raw.modtime or ""
        if modtime != last_modtime:
            mtime_ns = times.get(modtime)
            if mtime_ns is None:
                mtime_ns = times[modtime] = parse_time_ns(modtime)
            last_modtime = modtime
        digest = raw.digest
        if not digest:
            digest = ""
        elif digest == last_digest:
            digest = last_shared_digest
        else:
            last_digest = digest
            digest = last_shared_digest = digests.get(digest) or _checked_digest(digest, name, "digest", digests)
        uid = raw.uid or 0
        if uid > 256:
            uid = ids.setdefault(uid, uid + 0)
        gid = raw.gid or 0
        if gid > 256:
            gid = ids.setdefault(gid, gid + 0)
        xattrs = raw.xattrs
        if etype is REG:
            off = raw.offset or 0
            if off >= 0:
                add_offset(off)
            size = raw.size or 0
            if size < 0:
                raise OutOfBoundsError(f"file {name!r} has negative size {size}")
            if name == PREFETCH_LANDMARK:
                landmark_offset = off
            if size:  # made a TocEntry once its chunks are known (below)
                chunk_digest = raw.chunk_digest
                if not chunk_digest:
                    chunk_digest = None
                elif chunk_digest == raw.digest:  # the file's, already checked and shared
                    chunk_digest = digest
                else:
                    chunk_digest = digests.get(chunk_digest) or _checked_digest(chunk_digest, name, "chunkDigest", digests)
                fields = (
                    name, etype, perms[(raw.mode or 0) & 0o7777], uid, gid, size + 0, mtime_ns, "",
                    raw.dev_major or 0, raw.dev_minor or 0, _struct_xattrs(name, xattrs) if xattrs else no_xattrs,
                    digest,
                    (  # a `_piece`, inline
                        raw.chunk_offset or 0, raw.chunk_size or 0, off, raw.inner_offset or 0,
                        raw.chunk_type == "zeros", chunk_digest, raw.end_offset or 0,
                    ),
                    this_ino, 1,
                )
                add_data_pos(len(built))
                piece_owner = name
                owner_pieces = None
                entries[name] = fields
                add_built(fields)
                continue
            piece_owner = ""  # chunks of an empty file are checked for order, then dropped
            e = new_tuple(
                entry_cls,
                (
                    name, etype, perms[(raw.mode or 0) & 0o7777], uid, gid, 0, mtime_ns, "",
                    raw.dev_major or 0, raw.dev_minor or 0, _struct_xattrs(name, xattrs) if xattrs else no_xattrs,
                    digest, (), this_ino, 1,
                ),
            )
        else:
            link_name = ""
            if etype is SYMLINK:
                link_name = raw.link_name
                link_name = link_name.join(("", "")) if link_name else ""
                if "\0" in link_name:
                    check_link_target(name, link_name)
            elif etype is DIR:
                dirs.append(len(built))
            e = new_tuple(
                entry_cls,
                (
                    name, etype, perms[(raw.mode or 0) & 0o7777], uid, gid, 0, mtime_ns, link_name,
                    raw.dev_major or 0, raw.dev_minor or 0, _struct_xattrs(name, xattrs) if xattrs else no_xattrs,
                    digest, (), this_ino, 2 if etype is DIR else 1,
                ),
            )
        entries[name] = e
        add_built(e)

    raw = None  # the last record: none outlives its batch
    # Every named entry took one key (`entries` also holds the root's); fewer keys mean a repeat.
    if len(entries) != ino - 1 or len(hardlinks) != hardlink_count or (
        hardlinks and any(name in entries for name in hardlinks)
    ):
        raise DuplicateEntryError(f"duplicate entry {_first_repeated_name(raw_entries)!r} in TOC")
    n_raw = len(raw_entries)

    # Chunks: each piece's compressed extent ends at the next larger data offset.
    offsets.sort()  # nearly sorted already (TOC order is blob order); duplicates do not disturb bisect
    starts = offsets
    del offsets
    if starts and starts[-1] >= data_end:
        raise OutOfBoundsError(f"data offset {starts[-1]} is at or beyond the TOC at {data_end}")
    n_starts = len(starts)
    chunk_cls = Chunk
    bisect_right = bisect.bisect_right
    max_chunk, max_extent = limits.max_chunk_size, 2 * limits.max_chunk_size
    for pos in data_pos:
        f = built[pos]
        name = f[0]
        size = f[5]
        piece = f[12]
        if type(piece) is tuple:  # the common case, inline: a whole file in one piece
            file_offset, csize, offset, inner, zeros, chunk_digest, end_offset = piece
            csize = csize or size - file_offset  # 0 means "to the end of the file"
            if offset < 0 or offset >= data_end or inner < 0 or file_offset != 0 or csize != size or inner + size > INT64_MAX:
                chunks = _build_chunks(name, [piece], size, f[11], starts, data_end, limits)  # its error
            else:
                chunk_digest = chunk_digest or f[11]
                if not chunk_digest:
                    raise InvalidTocError(f"file {name!r}: piece at 0 has no chunkDigest")
                j = bisect_right(starts, offset)
                blob_end = starts[j] if j < n_starts else data_end
                if offset < end_offset < blob_end:
                    blob_end = end_offset
                if inner + size > max_chunk or blob_end - offset > max_extent:
                    limits.check_chunk(name, 0, inner + size, blob_end - offset)
                chunks = (  # `+ 0`: new ints, not the decoder's (see `_copy_str`)
                    new_tuple(chunk_cls, (0, size, offset + 0, blob_end + 0, inner + 0, chunk_digest, zeros)),
                )
        else:
            chunks = _build_chunks(name, piece, size, f[11], starts, data_end, limits)
        built[pos] = entries[name] = new_tuple(entry_cls, (*f[:12], chunks, f[13], 1))
    del data_pos

    # Hardlinks: resolve chains to the final non-hardlink target; count its links.
    link_count: dict[str, int] = {}
    hardlink_target = resolve_hardlinks(
        hardlinks,
        lambda target: None if (e := entries.get(target)) is None else e[1],
    )
    for target in hardlink_target.values():
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
    implied = ImpliedDirectories(limits, n_raw)
    if root_pos is None:
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
            implied.add(parent)
            implicit.append(parent)
            implicit_set.add(parent)
            grandparent = parent.rpartition("/")[0]
            subdirs[grandparent] = subdirs.get(grandparent, 0) + 1
            child_names.setdefault(grandparent, []).append(parent)
            child, parent = parent, grandparent

    if root_pos:  # an explicit root after other entries keeps its TOC position
        root = entries.pop("")
        entries = _with_root_at(entries, root_pos, root)
    return _settle(entries, built, dirs, subdirs, implicit, ino, hardlink_target, dict(child_names), landmark_offset)


def _piece(raw: Any, offset: int, digest: str | None, end_offset: int) -> tuple:
    """What the second pass needs of one piece of a file (the file's own entry or a `chunk`
    entry): file offset, size (0: to the end of the file), blob offset, inner offset, whether it
    is zeros, its checked and shared chunk digest (None when not given), and the file's
    `endOffset` (zstd:chunked; 0 when absent or not the first piece)."""
    return (raw.chunk_offset or 0, raw.chunk_size or 0, offset, raw.inner_offset or 0,
            raw.chunk_type == "zeros", digest, end_offset)


def _first_repeated_name(raw_entries: Records) -> str:
    """The first name given twice (the root aside), for the duplicate error (a slow path)."""
    seen: set[str] = set()
    for raw in itertools.chain.from_iterable(_batches(raw_entries)):
        if raw.type is CHUNK:
            continue
        name = normalize_name(raw.name or "")
        if name and name in seen:
            return name
        seen.add(name)
    return "?"


def _with_root_at(entries: dict[str, Any], pos: int, root: Any) -> dict[str, Any]:
    items = list(entries.items())
    items.insert(pos, ("", root))
    return dict(items)


def _build_chunks(
    name: str,
    pieces: list[tuple],
    size: int,
    digest: str,
    starts: list[int],
    data_end: int,
    limits: TocLimits,
) -> tuple[Chunk, ...]:
    """A file's chunks from its pieces (`_piece`), every rule checked (and an error worded)."""
    end_offset = pieces[0][6]
    last = len(pieces) - 1
    n_starts = len(starts)
    chunks: list[Chunk] = []
    expected_start = 0
    for i, (file_offset, csize, offset, inner, zeros, chunk_digest, _) in enumerate(pieces):
        if csize == 0:
            csize = size - file_offset  # the last piece runs to the end of the file
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
        if not chunk_digest and last == 0:
            chunk_digest = digest
        if not chunk_digest:
            raise InvalidTocError(f"file {name!r}: piece at {file_offset} has no chunkDigest")
        j = bisect.bisect_right(starts, offset)
        blob_end = starts[j] if j < n_starts else data_end
        if i == last and offset < end_offset <= data_end:
            blob_end = min(blob_end, end_offset)
        limits.check_chunk(name, file_offset, inner + csize, blob_end - offset)
        chunks.append(  # `+ 0`: new ints, not the decoder's (see `_copy_str`)
            _new_tuple(Chunk, (file_offset + 0, csize + 0, offset + 0, blob_end + 0, inner + 0, chunk_digest, zeros))
        )
        expected_start = file_offset + csize
    if expected_start != size:
        raise ChunkCoverageError(f"file {name!r}: chunks cover {expected_start} of {size} bytes")
    return tuple(chunks)
