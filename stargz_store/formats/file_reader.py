"""Reading a byte range of a file through its TOC, for any format (`ParsedToc.decompress_chunk`).

This is the simple, uncached path used by the converter and tests: fetch the compressed extents
of the chunks that cover the range (adjacent extents in one read), decompress and verify each
whole chunk, and cut out the requested bytes. The lazy filesystem has its own cached reader.
"""
from __future__ import annotations

from .layer_toc import ParsedToc, ReadAt
from .toc import Chunk, TocEntry

# Extents closer than this are fetched in one read; the gap costs less than another request.
_MERGE_GAP = 64 << 10


def _fetch_groups(chunks: tuple[Chunk, ...]) -> list[tuple[int, int, list[Chunk]]]:
    groups: list[tuple[int, int, list[Chunk]]] = []
    for c in chunks:
        if groups and c.blob_offset <= groups[-1][1] + _MERGE_GAP and c.blob_offset >= groups[-1][0]:
            start, end, members = groups[-1]
            groups[-1] = (start, max(end, c.blob_end), members + [c])
        else:
            groups.append((c.blob_offset, c.blob_end, [c]))
    return groups


def read_file(parsed: ParsedToc, read_at: ReadAt, entry: TocEntry, offset: int = 0, length: int = -1) -> bytes:
    """Verified bytes `[offset, offset+length)` of regular file `entry` (`length < 0`: to the end).

    Every chunk touched is decompressed whole and checked against its digest before any of it is
    returned (`DigestMismatchError` otherwise). Reads past the end of the file are clipped.
    """
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    if length < 0:
        length = max(0, entry.size - offset)
    chunks = entry.chunks_for_range(offset, length)
    if not chunks:
        return b""
    pieces: list[bytes] = []
    for start, end, members in _fetch_groups(chunks):
        blob = read_at(start, end - start)
        for c in members:
            part = blob[c.blob_offset - start : c.blob_end - start]
            pieces.append(parsed.decompress_chunk(part, c))
    data = b"".join(pieces)
    skip = offset - chunks[0].file_offset
    end = min(entry.size, offset + length)
    return data[skip : skip + (end - offset)]
