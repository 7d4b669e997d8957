"""Writing eStargz: a layer tar in, a lazily pullable tar.gz out (`estargz.md` §1, §6, §8).

The output is an ordinary multi-member tar.gz (any runtime can pull it normally) in which every
regular file's payload, and every further chunk of a large file, starts a new gzip member; the
TOC member and the 51-byte footer close it.

How it works, and why:
1. The input (plain, gzip or zstd) is read once; payloads are spooled to an unnamed temp file,
   so layers of any size take bounded memory. Duplicate names keep the later entry at the later
   position, old landmarks and TOCs are dropped, as the Go converter does.
2. Entries are ordered: prioritized paths (parents and hardlink targets first), a landmark, the
   rest.
3. The entry stream is cut into parts at member boundaries and the parts are deflated on a
   thread pool (zlib and hashlib release the GIL), then concatenated with their offsets shifted
   — the Go converter's trick to use every core.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import math
import os
import posixpath
import tarfile
import tempfile
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Sequence

from .errors import EntryEscapesRootError, FormatError, MissingHardlinkTargetError
from .estargz_footer import build_footer
from .layer_toc import ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE, BuildResult
from .tar_input import INPUT_ERRORS, InputTarError, iter_tar_members, open_tar_stream
from .toc import (
    BLOCK,
    CHAR,
    CHUNK,
    DIR,
    FIFO,
    HARDLINK,
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    REG,
    SYMLINK,
    TOC_TAR_NAME,
    normalize_name,
)

log = logging.getLogger(__name__)

MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_CHUNK_SIZE = 4 << 20

_BLOCK = 512
_COPY_SIZE = 1 << 20
_MIN_PART = 1 << 20
_MAX_PART = 16 << 20
_XATTR_PREFIX = "SCHILY.xattr."

_TAR_TYPES = {
    tarfile.REGTYPE: REG,
    tarfile.AREGTYPE: REG,
    tarfile.CONTTYPE: REG,
    tarfile.GNUTYPE_SPARSE: REG,
    tarfile.LNKTYPE: HARDLINK,
    tarfile.SYMTYPE: SYMLINK,
    tarfile.DIRTYPE: DIR,
    tarfile.CHRTYPE: CHAR,
    tarfile.BLKTYPE: BLOCK,
    tarfile.FIFOTYPE: FIFO,
}


class UnsupportedTarEntryError(FormatError):
    """The input tar holds an entry eStargz cannot describe (e.g. a socket or unknown type)."""


@dataclass
class _Item:
    """One input entry: its header, and where its payload sits in the spool."""

    info: tarfile.TarInfo
    type: str
    key: str
    spool_offset: int = 0
    digest: str = ""


@dataclass
class _DataOp:
    """Start a new gzip member and put `length` spooled bytes in it; record where it began."""

    spool_offset: int
    length: int
    entry: dict[str, Any]
    needs_digest: bool


_Op = bytes | _DataOp


@dataclass
class _PartResult:
    output: BinaryIO
    size: int
    placements: list[tuple[dict[str, Any], int, str]] = field(default_factory=list)


def _sha256_hex(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _go_string(text: str) -> str:
    """Strings that are not valid UTF-8 (surrogate-escaped bytes) get U+FFFD, as Go's JSON does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_MIN_RFC3339 = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_RFC3339 = 253_402_300_799  # 9999-12-31T23:59:59Z


def _format_modtime(mtime: float | int) -> str:
    """Go's `formatModtime`: empty for the epoch second, else UTC rounded to the nearest second.

    Times RFC 3339 cannot spell (outside years 1..9999) are left out rather than written in a
    form Go's `time.Parse` would reject, which would make the whole TOC unreadable.
    """
    if isinstance(mtime, float) and not math.isfinite(mtime):
        return ""
    if math.floor(mtime) == 0:
        return ""
    secs = math.floor(mtime + 0.5) if isinstance(mtime, float) else int(mtime)
    if not _MIN_RFC3339 <= secs <= _MAX_RFC3339:
        return ""
    t = time.gmtime(secs)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}Z"


class _NameTracker:
    """Go's `nameIfChanged`: a user/group name is written only when it changes for its id."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, ident: int, name: str) -> str:
        if not name or self._names.get(ident) == name:
            return ""
        self._names[ident] = name
        return name


class _Spool:
    """Payload bytes of the input, in an unnamed temp file read back with `pread` (thread-safe)."""

    def __init__(self, tmpdir: str | None) -> None:
        self._file = tempfile.TemporaryFile(dir=tmpdir)
        self.fd = self._file.fileno()
        self.size = 0

    def append_from(self, src: BinaryIO, length: int, what: str) -> tuple[int, str]:
        offset = self.size
        h = hashlib.sha256()
        remaining = length
        while remaining > 0:
            block = src.read(min(_COPY_SIZE, remaining))
            if not block:
                raise InputTarError(f"input tar is truncated inside {what!r}")
            h.update(block)
            self._file.write(block)
            remaining -= len(block)
        self.size += length
        return offset, "sha256:" + h.hexdigest()

    def append(self, data: bytes) -> int:
        offset = self.size
        self._file.write(data)
        self.size += len(data)
        return offset

    def seal(self) -> None:
        self._file.flush()

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                raise FormatError(f"spool file is short at {offset + got}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()


def _read_input(src: BinaryIO, spool: _Spool) -> dict[str, _Item]:
    """Every entry to keep, keyed by normalised name, in tar order (a repeat moves to the end)."""
    try:
        return _read_members(src, spool)
    except INPUT_ERRORS as e:
        raise InputTarError(f"input layer is not a valid tar stream: {e}") from e


def _read_members(src: BinaryIO, spool: _Spool) -> dict[str, _Item]:
    items: dict[str, _Item] = {}
    for info, tar in iter_tar_members(open_tar_stream(src)):
        try:
            etype = _TAR_TYPES[info.type]
        except KeyError:
            raise UnsupportedTarEntryError(
                f"input entry {info.name!r} has tar type {info.type!r}, which eStargz cannot hold"
            ) from None
        key = normalize_name(info.name, what="input tar entry")
        if key in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME):
            log.debug("dropping %r from the input layer", info.name)
            continue
        if key == "" and etype != DIR:
            raise UnsupportedTarEntryError(f"input entry {info.name!r} names the root but is not a directory")
        item = _Item(info=info, type=etype, key=key)
        if etype == REG:
            if info.size > 0:
                f = tar.extractfile(info)  # expands sparse files, so before `_make_plain_regular`
                assert f is not None
                item.spool_offset, item.digest = spool.append_from(f, info.size, info.name)
            else:
                item.digest = _sha256_hex(b"")
            if info.type != tarfile.REGTYPE or info.sparse is not None:
                _make_plain_regular(info)
        else:
            info.size = 0
        items.pop(key, None)
        items[key] = item
    _check_tree(items)
    return items


def _check_tree(items: dict[str, _Item]) -> None:
    """Refuse now what every reader would refuse later: an entry under a non-directory, a
    hardlink to nothing or to a directory (`estargz.md` §7)."""
    for key, item in items.items():
        parent = key.rpartition("/")[0] if key else None
        if parent is not None and parent in items and items[parent].type != DIR:
            raise UnsupportedTarEntryError(
                f"input entry {item.info.name!r} is under {items[parent].info.name!r}, which is a {items[parent].type}"
            )
        if item.type != HARDLINK:
            continue
        target = normalize_name(item.info.linkname, what=f"hardlink {item.info.name!r} target")
        found = items.get(target)
        if found is None:
            raise MissingHardlinkTargetError(f"input hardlink {item.info.name!r} points to missing {item.info.linkname!r}")
        if found.type == DIR:
            raise UnsupportedTarEntryError(f"input hardlink {item.info.name!r} points to directory {item.info.linkname!r}")


def _make_plain_regular(info: tarfile.TarInfo) -> None:
    """Old-style, contiguous and GNU sparse files are written back as plain regular files."""
    info.type = tarfile.REGTYPE
    info.sparse = None  # type: ignore[attr-defined]
    for k in [k for k in info.pax_headers if k.startswith("GNU.sparse.") or k == "size"]:
        del info.pax_headers[k]  # the archived (sparse) size is not the expanded size we write


def _order_items(items: dict[str, _Item], prioritized: Sequence[str]) -> tuple[list[_Item], list[_Item], list[str]]:
    """`(prioritized_items, rest, prioritized paths found)` as `estargz.md` §8.3 orders them.

    Unlike the Go converter, a prioritized path whose parent directory has no entry of its own
    is still moved (the missing parent is simply implicit); paths absent from the layer are
    skipped, as the CLI's record-in always allows.
    """
    moved: dict[str, _Item] = {}

    def move(key: str, depth: int = 0) -> None:
        if key in moved or depth > 4096:
            return
        if key:
            move(key.rpartition("/")[0], depth + 1)
        item = items.get(key)
        if item is None:
            return
        if item.type == HARDLINK:
            try:
                move(normalize_name(item.info.linkname, what="hardlink target"), depth + 1)
            except EntryEscapesRootError:
                pass
        if key not in moved:
            moved[key] = item

    found: list[str] = []
    for raw in prioritized:
        key = posixpath.normpath("/" + raw).lstrip("/")  # Go's cleanEntryName: `..` stops at the root
        if key not in items:
            log.debug("prioritized path %r is not in this layer", raw)
            continue
        found.append(key)
        move(key)
    rest = [item for key, item in items.items() if key not in moved]
    return list(moved.values()), rest, found


_USTAR_MAGIC = b"ustar\x0000"
_MAX_ID = 8**7
_MAX_SIZE = 8**11


def _ascii(text: str, limit: int) -> bytes | None:
    if len(text) > limit or not text.isascii():
        return None
    return text.encode("ascii")


def fast_ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """`info.tobuf(PAX_FORMAT)` byte for byte when no PAX record is needed, else None.

    `tarfile`'s generic encoder costs more than deflating a small file does; layers of many
    small files spend most of their time here otherwise.
    """
    if info.pax_headers:
        return None
    name = info.name + "/" if info.type == tarfile.DIRTYPE and not info.name.endswith("/") else info.name
    name_b = _ascii(name, 100)
    link_b = _ascii(info.linkname, 100)
    uname_b = _ascii(info.uname, 32)
    gname_b = _ascii(info.gname, 32)
    if name_b is None or link_b is None or uname_b is None or gname_b is None:
        return None
    uid, gid, size, mtime = info.uid, info.gid, info.size, info.mtime
    if type(mtime) is not int or not (0 <= uid < _MAX_ID and 0 <= gid < _MAX_ID and 0 <= size < _MAX_SIZE and 0 <= mtime < _MAX_SIZE):
        return None
    hdr = bytearray(_BLOCK)
    hdr[0 : len(name_b)] = name_b
    hdr[100:148] = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (info.mode & 0o7777, uid, gid, size, mtime)
    hdr[148:156] = b"        "
    hdr[156:157] = info.type
    hdr[157 : 157 + len(link_b)] = link_b
    hdr[257:265] = _USTAR_MAGIC
    hdr[265 : 265 + len(uname_b)] = uname_b
    hdr[297 : 297 + len(gname_b)] = gname_b
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if not (0 <= info.devmajor < _MAX_ID and 0 <= info.devminor < _MAX_ID):
            return None
        hdr[329:345] = b"%07o\0%07o\0" % (info.devmajor, info.devminor)
    hdr[148:155] = b"%06o\0" % sum(hdr)
    return bytes(hdr)


class _EntryStream:
    """Turns ordered items into TOC entries and the op stream the compressors consume."""

    def __init__(self, spool: _Spool, chunk_size: int) -> None:
        self.spool = spool
        self.chunk_size = chunk_size
        self.toc_entries: list[dict[str, Any]] = []
        self._uname = _NameTracker()
        self._gname = _NameTracker()

    def ops(self, items: Sequence[_Item]) -> Iterator[_Op]:
        for item in items:
            yield from self._item_ops(item)

    def _header(self, info: tarfile.TarInfo) -> bytes:
        return fast_ustar_header(info) or info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def _item_ops(self, item: _Item) -> Iterator[_Op]:
        info = item.info
        entry = self._toc_entry(item)
        self.toc_entries.append(entry)
        yield self._header(info)
        size = info.size if item.type == REG else 0
        if size <= 0:
            return
        written = 0
        current = entry
        while written < size:
            length = min(self.chunk_size, size - written)
            if written > 0:
                current = {"name": entry["name"], "type": CHUNK, "offset": 0, "chunkOffset": written}
                self.toc_entries.append(current)
            if length == self.chunk_size:
                current["chunkSize"] = length
            single = written == 0 and length == size
            if single:
                current["chunkDigest"] = item.digest
            else:
                current["chunkDigest"] = ""
            yield _DataOp(item.spool_offset + written, length, current, needs_digest=not single)
            written += length
        pad = -size % _BLOCK
        if pad:
            yield b"\0" * pad

    def _toc_entry(self, item: _Item) -> dict[str, Any]:
        """Go's TOCEntry field order; zero values omitted (`omitempty`)."""
        info = item.info
        name = info.name + "/" if item.type == DIR and not info.name.endswith("/") else info.name
        e: dict[str, Any] = {"name": _go_string(name), "type": item.type}
        if item.type == REG and info.size > 0:
            e["size"] = info.size
        modtime = _format_modtime(info.mtime)
        if modtime:
            e["modtime"] = modtime
        if item.type in (SYMLINK, HARDLINK) and info.linkname:
            e["linkName"] = _go_string(info.linkname)
        if info.mode:
            e["mode"] = info.mode
        if info.uid:
            e["uid"] = info.uid
        if info.gid:
            e["gid"] = info.gid
        uname = self._uname(info.uid, info.uname)
        if uname:
            e["userName"] = _go_string(uname)
        gname = self._gname(info.gid, info.gname)
        if gname:
            e["groupName"] = _go_string(gname)
        if item.type == REG and info.size > 0:
            e["offset"] = 0  # placeholder, keeps Go's key order; set once the part is placed
        if item.type in (CHAR, BLOCK):
            if info.devmajor:
                e["devMajor"] = info.devmajor
            if info.devminor:
                e["devMinor"] = info.devminor
        xattrs = {
            _go_string(k[len(_XATTR_PREFIX):]): base64.b64encode(v.encode("utf-8", "surrogateescape")).decode("ascii")
            for k, v in info.pax_headers.items()
            if k.startswith(_XATTR_PREFIX)
        }
        if xattrs:
            e["xattrs"] = xattrs
        if item.type == REG:
            e["digest"] = item.digest
        return e


def _cut_parts(ops: Iterator[_Op], target: int) -> Iterator[list[_Op]]:
    """Groups of ops of about `target` bytes; a new group only ever starts at a data op."""
    part: list[_Op] = []
    size = 0
    for op in ops:
        if isinstance(op, _DataOp):
            if size >= target and part:
                yield part
                part, size = [], 0
            size += op.length
        else:
            size += len(op)
        part.append(op)
    if part:
        yield part


def _compress_part(ops: list[_Op], spool: _Spool, level: int, tmpdir: str | None) -> _PartResult:
    """Deflate one part into its own members; offsets in the result are relative to the part."""
    out: BinaryIO = tempfile.SpooledTemporaryFile(max_size=4 << 20, dir=tmpdir)  # type: ignore[assignment]
    result = _PartResult(output=out, size=0)
    pos = 0
    co = None
    for op in ops:
        if isinstance(op, _DataOp):
            if co is not None:
                tail = co.flush()
                out.write(tail)
                pos += len(tail)
            co = zlib.compressobj(level, zlib.DEFLATED, 31)
            data = spool.read(op.spool_offset, op.length)
            digest = _sha256_hex(data) if op.needs_digest else ""
            result.placements.append((op.entry, pos, digest))
        else:
            data = op
            if co is None:
                co = zlib.compressobj(level, zlib.DEFLATED, 31)
        c = co.compress(data)
        if c:
            out.write(c)
            pos += len(c)
    if co is not None:
        tail = co.flush()
        out.write(tail)
        pos += len(tail)
    out.seek(0)
    result.size = pos
    return result


class _Output:
    """The destination stream, hashed and counted as it is written."""

    def __init__(self, dst: BinaryIO) -> None:
        self.dst = dst
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.dst.write(data)
        self.hash.update(data)
        self.size += len(data)

    def copy_from(self, src: BinaryIO) -> None:
        while True:
            block = src.read(_COPY_SIZE)
            if not block:
                return
            self.write(block)


_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]  # C-accelerated, keeps UTF-8


def _encode_value(value: Any, depth: int) -> str:
    if type(value) is str:
        return _encode_str(value)
    if type(value) is int:
        return str(value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        pad = "\t" * (depth + 1)
        inner = ",\n".join(f"{pad}{_encode_str(k)}: {_encode_value(v, depth + 1)}" for k, v in value.items())
        return "{\n" + inner + "\n" + "\t" * depth + "}"
    return json.dumps(value, ensure_ascii=False)


def encode_toc_json(entries: Sequence[dict[str, Any]]) -> bytes:
    """The TOC document as Go's `json.MarshalIndent(toc, "", "\t")` lays it out.

    Byte-identical to `json.dumps(..., indent="\t", ensure_ascii=False)`, which is pure Python
    when indenting and the slowest step for layers of many small files.
    """
    if not entries:
        return b'{\n\t"version": 1,\n\t"entries": []\n}'
    body = ",\n".join("\t\t" + _encode_value(e, 2) for e in entries)
    return ('{\n\t"version": 1,\n\t"entries": [\n' + body + "\n\t]\n}").encode("utf-8")


def build_toc_member(toc_json: bytes, level: int) -> tuple[bytes, bytes]:
    """`(uncompressed tar bytes, gzip member)` of the TOC entry plus the tar end-of-archive."""
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size = len(toc_json)
    info.mode = 0o644
    raw = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + toc_json + b"\0" * (-len(toc_json) % _BLOCK)
    raw += b"\0" * (2 * _BLOCK)
    return raw, zlib.compress(raw, level, wbits=31)


def _landmark(name: str, spool: _Spool) -> _Item:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENTS)
    info.mode = 0o644
    info.mtime = 0
    offset = spool.append(LANDMARK_CONTENTS)
    return _Item(info=info, type=REG, key=name, spool_offset=offset, digest=_sha256_hex(LANDMARK_CONTENTS))


class _SpoolReader:
    """A file-like reader of `length` spooled bytes from `offset`, for `tarfile.addfile`."""

    def __init__(self, spool: _Spool, offset: int, length: int) -> None:
        self._spool, self._pos, self._end = spool, offset, offset + length

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n is None or n < 0 else min(n, self._end - self._pos)
        data = self._spool.read(self._pos, n) if n > 0 else b""
        self._pos += len(data)
        return data


def write_prioritized_tar(src: BinaryIO, dst: BinaryIO, prioritized: Sequence[str], *,
                          tmpdir: str | None = None) -> list[str]:
    """Write the layer tar `src` (plain, gzip or zstd) to `dst` as a plain tar in the order an
    eStargz blob has (`estargz.md` §8.3): the prioritized entries (parents and hardlink targets
    first), `.prefetch.landmark`, then the rest in tar order; returns the prioritized paths found.

    For formats without an ordering of their own (zstd:chunked): their writer keeps the order of
    the tar it is given, and the store prefetches up to the landmark's offset in any format.
    """
    spool = _Spool(tmpdir)
    try:
        items = _read_input(src, spool)
        first, rest, found = _order_items(items, prioritized)
        landmark = _landmark(PREFETCH_LANDMARK, spool)
        spool.seal()
        with tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape") as tar:
            for item in first + [landmark] + rest:
                size = item.info.size if item.type == REG else 0
                tar.addfile(item.info, _SpoolReader(spool, item.spool_offset, size) if size else None)
    finally:
        spool.close()
    return found


def build_estargz(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    prioritized: Sequence[str] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression_level: int = 6,
    workers: int = 2,
    tmpdir: str | None = None,
) -> BuildResult:
    """Convert the layer tar read from `src` (plain, gzip or zstd) into an eStargz blob on `dst`.

    `dst` is written strictly sequentially (a pipe or an upload stream will do). `prioritized`
    lists paths in first-access order; a non-empty list yields `.prefetch.landmark` even when
    none of its paths is in this layer, as the Go converter does. The diff_id covers the whole
    uncompressed stream, the TOC entry included (`estargz.md` §1.2).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    if not 0 <= compression_level <= 9:
        raise ValueError(f"gzip compression level must be 0..9, got {compression_level}")
    workers = max(1, workers)
    spool = _Spool(tmpdir)
    try:
        items = _read_input(src, spool)
        first, rest, found = _order_items(items, prioritized)
        landmark = _landmark(PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK, spool)
        spool.seal()
        ordered = first + [landmark] + rest
        log.debug("eStargz: %d entries, %d payload bytes, %d prioritized", len(ordered), spool.size, len(first))

        stream = _EntryStream(spool, chunk_size)
        target = min(_MAX_PART, max(_MIN_PART, spool.size // (workers * 4) + 1))
        out = _Output(dst)
        diff_hash = hashlib.sha256()
        diff_size = 0

        def finish(part: list[_Op], fut: Future[_PartResult] | _PartResult) -> None:
            nonlocal diff_size
            for op in part:  # hashed here while the pool deflates later parts
                data = spool.read(op.spool_offset, op.length) if isinstance(op, _DataOp) else op
                diff_hash.update(data)
                diff_size += len(data)
            res = fut.result() if isinstance(fut, Future) else fut
            base = out.size
            for entry, rel, digest in res.placements:
                entry["offset"] = base + rel
                if digest:
                    entry["chunkDigest"] = digest
            with res.output:
                out.copy_from(res.output)

        parts = _cut_parts(stream.ops(ordered), target)
        if workers == 1:
            for part in parts:
                finish(part, _compress_part(part, spool, compression_level, tmpdir))
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz") as pool:
                inflight: collections.deque[tuple[list[_Op], Future[_PartResult]]] = collections.deque()
                try:
                    for part in parts:
                        inflight.append((part, pool.submit(_compress_part, part, spool, compression_level, tmpdir)))
                        if len(inflight) > workers:
                            finish(*inflight.popleft())
                    while inflight:
                        finish(*inflight.popleft())
                finally:
                    for _, fut in inflight:
                        fut.cancel()

        toc_offset = out.size
        toc_json = encode_toc_json(stream.toc_entries)
        toc_raw, toc_gz = build_toc_member(toc_json, compression_level)
        diff_hash.update(toc_raw)
        diff_size += len(toc_raw)
        out.write(toc_gz)
        out.write(build_footer(toc_offset))
    finally:
        spool.close()

    toc_digest = _sha256_hex(toc_json)
    return BuildResult(
        digest="sha256:" + out.hash.hexdigest(),
        size=out.size,
        toc_digest=toc_digest,
        diff_id="sha256:" + diff_hash.hexdigest(),
        diff_size=diff_size,
        media_type=MEDIA_TYPE_LAYER_GZIP,
        annotations={ANNOTATION_TOC_DIGEST: toc_digest, ANNOTATION_UNCOMPRESSED_SIZE: str(diff_size)},
        prioritized_found=tuple(found),
    )
