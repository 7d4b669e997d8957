"""Writing containers/storage zstd:chunked, the current layout (`zstd-chunked.md` §2.1-§2.7).

The blob is a plain zstd stream of the *unchanged* input tar: `zstd -d` gives back the input byte
for byte, so the DiffID is the input's. Only the framing carries information: a frame ends before
each file payload, after each chunk, and metadata follows in three skippable frames (TOC,
tar-split, 64-byte footer).

Chunking is containers/storage's by default: a run of >= 1 KiB of zeros is a `zeros` chunk, other
data is cut by its 64-byte rolling checksum (~64 KiB average, `zstd_rollsum`), so the same file
gives the same chunks (and chunk digests) as podman, and chunk reuse works across both. The
checksum costs about as much CPU as the compression; a fixed `chunk_size` skips it.

Memory stays bounded: the input is streamed; only the TOC entries and the compressed tar-split
(spooled to a temp file past 16 MiB) are kept until the end.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import zstandard

from .crc64 import Crc64
from .layer_toc import (
    ANNOTATION_UNCOMPRESSED_SIZE,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_TARSPLIT_POSITION,
    BuildResult,
    sha256_digest,
)
from .tar_input import INPUT_ERRORS, InputTarError, open_tar_stream
from .tar_split import FileEntry, Segment, TarHeader, TarSplitPacker, split_tar
from .toc import normalize_name
from .zstd_chunked_footer import (
    MANIFEST_TYPE_CRFS,
    MEDIA_TYPE_LAYER_ZSTD,
    build_footer,
    skippable_frame_header,
)
from .zstd_rollsum import WINDOW, split_points

log = logging.getLogger(__name__)

DEFAULT_COMPRESSION_LEVEL = 3
HOLE_THRESHOLD = 1 << 10  # containers/storage `holesThreshold`
# containers/storage has no caps; ours keep every chunk's decompression small. Random data
# reaches the data cap with probability e^-64, so real chunks match containers/storage's.
MAX_ZERO_CHUNK = 4 << 20
MAX_DATA_CHUNK = 4 << 20

_ZERO_RUN = bytes(HOLE_THRESHOLD)
_NON_ZERO = re.compile(rb"[^\x00]")
_READ_SIZE = 1 << 20
_ROLLSUM_BLOCK = 256 << 10




def _file_sha256(f: BinaryIO) -> str:
    f.seek(0)
    h = hashlib.sha256()
    while piece := f.read(_READ_SIZE):
        h.update(piece)
    return "sha256:" + h.hexdigest()


def go_time(ns: int) -> str | None:
    """RFC 3339 with trimmed nanoseconds in UTC, as Go marshals `time.Time`; None when unrepresentable."""
    secs, frac = divmod(ns, 1_000_000_000)
    try:
        t = time.gmtime(secs)
    except (OverflowError, OSError, ValueError):
        return None
    if not 0 <= t.tm_year <= 9999:  # Go's MarshalJSON refuses these years
        return None
    text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def _go_string(text: str) -> str:
    """What Go's JSON encoder makes of a string holding arbitrary bytes: invalid UTF-8 -> U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def toc_entry_for(header: TarHeader) -> dict[str, Any]:
    """The TOC `FileMetadata` of one tar entry (`minimal.NewFileMetadata`), key order as Go's."""
    e: dict[str, Any] = {"type": header.type_name, "name": _go_string(header.name)}
    if header.link_name:
        e["linkName"] = _go_string(header.link_name)
    if header.mode:
        e["mode"] = header.mode
    if header.size:
        e["size"] = header.size
    if header.uid:
        e["uid"] = header.uid
    if header.gid:
        e["gid"] = header.gid
    for key, ns in (("modtime", header.mtime_ns), ("accesstime", header.atime_ns), ("changetime", header.ctime_ns)):
        if ns is None:
            continue
        text = go_time(ns)
        if text is None:
            log.warning("%s of %r (%d ns) cannot be represented; omitted from the TOC", key, header.name, ns)
        else:
            e[key] = text
    if header.dev_major:
        e["devMajor"] = header.dev_major
    if header.dev_minor:
        e["devMinor"] = header.dev_minor
    if header.xattrs:
        e["xattrs"] = {_go_string(k): base64.b64encode(v).decode("ascii") for k, v in header.xattrs.items()}
    return e


def iter_payload_chunks(
    read: Callable[[int], bytes], size: int, chunk_size: int | None = None
) -> Iterator[tuple[bytes, bool]]:
    """Cut a file's payload into `(bytes, is_zeros)` chunks, reading it forward once.

    A run of >= 1 KiB of zeros is one `zeros` chunk (at most `MAX_ZERO_CHUNK`). Other data is cut
    where containers/storage's rolling checksum says (`chunk_size` None; at most
    `MAX_DATA_CHUNK` per chunk), or every `chunk_size` bytes.
    """
    max_data = MAX_DATA_CHUNK if chunk_size is None else chunk_size
    window = max(max_data, MAX_ZERO_CHUNK) + HOLE_THRESHOLD
    buf = bytearray()
    buf_start = 0  # file offset of buf[0]
    remaining = size
    cuts: collections.deque[int] = collections.deque()  # file offsets where a rollsum chunk ends
    context = b""

    def fill() -> None:
        nonlocal remaining, context
        while len(buf) < window and remaining:
            data = read(min(remaining, _READ_SIZE))
            remaining -= len(data)
            if chunk_size is None:
                for start in range(0, len(data), _ROLLSUM_BLOCK):  # bounds the big-integer temporaries
                    piece = data[start : start + _ROLLSUM_BLOCK]
                    base = buf_start + len(buf) + start
                    cuts.extend(base + i + 1 for i in split_points(piece, context))
                    context = (context + piece)[-(WINDOW - 1) :]
            buf.extend(data)

    while True:
        fill()
        if not buf:
            return
        while cuts and cuts[0] <= buf_start:
            cuts.popleft()
        cut = min(max_data, len(buf), cuts[0] - buf_start if cuts else max_data)
        hole = buf.find(_ZERO_RUN, 0, cut + HOLE_THRESHOLD - 1)
        if hole == 0:
            m = _NON_ZERO.search(buf, 0, MAX_ZERO_CHUNK)
            cut = m.start() if m else min(len(buf), MAX_ZERO_CHUNK)
            yield bytes(cut), True
        else:
            if 0 < hole < cut:
                cut = hole
            yield bytes(buf[:cut]), False
        del buf[:cut]
        buf_start += cut


class _Output:
    """The blob being written: counts and hashes every byte, and manages zstd frames.

    Non-payload tar bytes go into the "open" frame; each payload chunk is a frame of its own.
    """

    def __init__(self, dst: BinaryIO, level: int) -> None:
        self._dst = dst
        self._hash = hashlib.sha256()
        self.offset = 0
        self._stream_cctx = zstandard.ZstdCompressor(level=level)
        self._chunk_cctx = zstandard.ZstdCompressor(level=level)
        self._open: Any = None

    def _emit(self, data: bytes) -> None:
        if data:
            self._dst.write(data)
            self._hash.update(data)
            self.offset += len(data)

    def write_stream(self, data: bytes) -> None:
        if not data:
            return
        if self._open is None:
            self._open = self._stream_cctx.compressobj()
        self._emit(self._open.compress(data))

    def close_frame(self) -> None:
        if self._open is not None:
            self._emit(self._open.flush())
            self._open = None

    def write_frame(self, data: bytes) -> int:
        """Close the open frame, write `data` as one frame; its blob offset."""
        self.close_frame()
        start = self.offset
        self._emit(self._chunk_cctx.compress(data))
        return start

    def write_skippable(self, payload: bytes) -> int:
        """Write a skippable frame; the blob offset of its payload."""
        self.close_frame()
        self._emit(skippable_frame_header(len(payload)))
        start = self.offset
        self._emit(payload)
        return start

    def write_skippable_file(self, f: BinaryIO, size: int) -> int:
        """`write_skippable` for a payload in a file (read from its start), without loading it."""
        self.close_frame()
        self._emit(skippable_frame_header(size))
        start = self.offset
        f.seek(0)
        while piece := f.read(_READ_SIZE):
            self._emit(piece)
        if self.offset - start != size:
            raise OSError(f"spool file holds {self.offset - start} bytes, expected {size}")
        return start

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


@dataclass
class _Chunk:
    file_offset: int
    size: int
    offset: int
    digest: str
    zeros: bool


def _write_payload(out: _Output, entry: FileEntry, chunk_size: int | None) -> tuple[list[dict[str, Any]], dict[str, Any], bytes]:
    """Frame one regular file's payload; its extra TOC entries, main-entry fields, and CRC-64."""
    header = entry.header
    whole = hashlib.sha256()
    crc = Crc64()
    chunks: list[_Chunk] = []
    file_offset = 0
    for data, zeros in iter_payload_chunks(entry.read, header.payload_size, chunk_size):
        whole.update(data)
        crc.update(data)
        chunks.append(_Chunk(file_offset, len(data), out.write_frame(data), sha256_digest(data), zeros))
        file_offset += len(data)
    out.close_frame()
    if not chunks:
        return [], {}, crc.digest()
    main: dict[str, Any] = {
        "digest": "sha256:" + whole.hexdigest(),
        "offset": chunks[0].offset,
        "endOffset": out.offset,
    }
    extra: list[dict[str, Any]] = []
    if len(chunks) > 1:
        main["chunkSize"] = chunks[0].size
        main["chunkDigest"] = chunks[0].digest
        if chunks[0].zeros:
            main["chunkType"] = "zeros"
        name = _go_string(header.name)
        for c in chunks[1:]:
            e: dict[str, Any] = {
                "type": "chunk",
                "name": name,
                "offset": c.offset,
                "chunkSize": c.size,
                "chunkOffset": c.file_offset,
                "chunkDigest": c.digest,
            }
            if c.zeros:
                e["chunkType"] = "zeros"
            extra.append(e)
    return extra, main, crc.digest()


class _SpooledZstd:
    """zstd-compresses what is written to it into a temp file spooled in memory up to 16 MiB."""

    def __init__(self, level: int, tmpdir: str | None) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=16 << 20, dir=tmpdir)
        self._writer = zstandard.ZstdCompressor(level=level).stream_writer(self.file, closefd=False)
        self.uncompressed_size = 0

    def write(self, data: bytes) -> None:
        self.uncompressed_size += len(data)
        self._writer.write(data)

    def finish(self) -> int:
        """End the frame; the compressed size."""
        self._writer.close()
        return self.file.tell()


def _write_entries(
    src: BinaryIO,
    out: _Output,
    tar_split: _SpooledZstd,
    chunk_size: int | None,
    on_data: Callable[[bytes], None],
) -> list[dict[str, Any]]:
    """Re-frame the tar into `out` and the tar-split stream; the TOC entries, later duplicates winning."""
    packer = TarSplitPacker(tar_split.write)
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    last_index: dict[str, int] = {}
    for item in split_tar(open_tar_stream(src), on_data=on_data):
        if isinstance(item, Segment):
            out.write_stream(item.data)
            packer.add_segment(item.data)
            continue
        header = item.header
        main = toc_entry_for(header)
        extra: list[dict[str, Any]] = []
        crc: bytes | None = None
        if header.payload_size > 0:
            extra, fields, crc = _write_payload(out, item, chunk_size)
            main.update(fields)
        elif header.size > 0:
            crc = Crc64().digest()  # tar-split checksums what Go read: nothing, for header-only types
        name = normalize_name(header.name)
        if name in last_index:
            log.warning(
                "tar names %r twice: the TOC keeps the later entry; containers/storage will not "
                "partially pull this layer (its tar-split reader refuses duplicate paths)",
                header.name,
            )
        last_index[name] = len(groups)
        groups.append((name, [main, *extra]))
        packer.add_file(header.name, header.size, crc)
    out.close_frame()
    return [e for i, (name, group) in enumerate(groups) if last_index[name] == i for e in group]


def build_zstd_chunked(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    chunk_size: int | None = None,
    tmpdir: str | None = None,
    prioritized: Sequence[str] = (),
) -> BuildResult:
    """Convert a layer tar (plain, gzip or zstd) into a zstd:chunked blob written to `dst`.

    `dst` only needs `write`. The result's `toc_digest` is the manifest checksum (sha256 of the
    compressed TOC), the layer's TOC digest for containers/image; `diff_id` is the sha256 of the
    input tar, which the blob decompresses back to exactly.

    `chunk_size` None cuts data chunks as containers/storage does (content-defined); a number
    cuts every `chunk_size` bytes instead (faster, but chunks then differ from podman's).
    `tmpdir` holds the tar-split stream once it outgrows memory. Entry names must stay inside the layer root (`EntryEscapesRootError`); a name given twice
    keeps both in the tar stream and tar-split, and only the later one in the TOC, as
    extraction would.

    `prioritized` (paths in first-read order): the tar is first rewritten in eStargz's order,
    those entries first, then `.prefetch.landmark`, then the rest (`write_prioritized_tar`), so
    the store prefetches `[0, landmark offset)` as it does for eStargz; the blob then decompresses
    to that rewritten tar (`diff_id` is its digest), not to the input.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    found: list[str] = []
    if prioritized:  # the tar reordered first; the blob then decompresses to that tar (its diff_id)
        from .estargz_writer import write_prioritized_tar

        ordered = tempfile.TemporaryFile(dir=tmpdir)
        try:
            found = write_prioritized_tar(src, ordered, prioritized, tmpdir=tmpdir)
            ordered.seek(0)
            return _build(ordered, dst, compression_level, chunk_size, tmpdir, found)
        finally:
            ordered.close()
    return _build(src, dst, compression_level, chunk_size, tmpdir, found)


def _build(src: BinaryIO, dst: BinaryIO, compression_level: int, chunk_size: int | None, tmpdir: str | None,
           found: list[str]) -> BuildResult:
    out = _Output(dst, compression_level)
    diff_hash = hashlib.sha256()
    diff_size = 0

    def on_data(data: bytes) -> None:
        nonlocal diff_size
        diff_hash.update(data)
        diff_size += len(data)

    tar_split = _SpooledZstd(compression_level, tmpdir)
    try:
        try:
            entries = _write_entries(src, out, tar_split, chunk_size, on_data)
        except INPUT_ERRORS as e:
            raise InputTarError(f"input layer is not a valid tar stream: {e}") from e
        tar_split_size = tar_split.finish()
        tar_split_digest = _file_sha256(tar_split.file)
        toc = {"version": 1, "entries": entries, "tarSplitDigest": tar_split_digest}
        toc_json = json.dumps(toc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        toc_compressed = zstandard.ZstdCompressor(level=compression_level).compress(toc_json)
        toc_offset = out.write_skippable(toc_compressed)
        tar_split_offset = out.write_skippable_file(tar_split.file, tar_split_size)
    finally:
        tar_split.file.close()
    footer = build_footer(
        toc_offset, len(toc_compressed), len(toc_json), tar_split_offset, tar_split_size, tar_split.uncompressed_size
    )
    out.write_skippable(footer)
    toc_digest = sha256_digest(toc_compressed)
    annotations = {
        ANNOTATION_ZSTD_MANIFEST_CHECKSUM: toc_digest,
        ANNOTATION_ZSTD_MANIFEST_POSITION: f"{toc_offset}:{len(toc_compressed)}:{len(toc_json)}:{MANIFEST_TYPE_CRFS}",
        ANNOTATION_ZSTD_TARSPLIT_POSITION: f"{tar_split_offset}:{tar_split_size}:{tar_split.uncompressed_size}",
        ANNOTATION_UNCOMPRESSED_SIZE: str(diff_size),
    }
    log.debug("zstd:chunked blob: %d bytes, %d TOC entries, diff %d bytes", out.offset, len(toc["entries"]), diff_size)
    return BuildResult(
        digest=out.digest,
        size=out.offset,
        toc_digest=toc_digest,
        diff_id="sha256:" + diff_hash.hexdigest(),
        diff_size=diff_size,
        media_type=MEDIA_TYPE_LAYER_ZSTD,
        annotations=annotations,
        prioritized_found=tuple(found),
    )
