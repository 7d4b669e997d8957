"""The eStargz TOC member: one gzip member holding a tar entry `stargz.index.json` (`estargz.md` §4).

What must hold: no more is inflated than the TOC's declared size, and never more than the cap.
A member is inflated a bounded piece at a time from its compressed bytes, which may come in two
pieces (the head of a large TOC fetched apart from the blob's tail), so they are never joined.
The usual member (one plain ustar header, then the JSON) is refused as soon as its header
declares more than the cap, and otherwise inflated straight into one buffer of the declared size;
anything else (PAX headers, GNU long names) goes through `tarfile`, reading from the same bounded
inflater, so a hostile PAX header cannot make it inflate more than the cap either.
"""
from __future__ import annotations

import tarfile
from typing import Sequence

from . import inflate
from .errors import InvalidTocError, TocTooLargeError
from .inflate import INFLATE_ERRORS
from .toc import TOC_TAR_NAME

# Room for the TOC entry's tar header(s) (a PAX header included) on top of the JSON itself.
TAR_HEADER_SLACK = 64 << 10
# Compressed bytes handed to the inflater at once: its unconsumed input is copied on every call
# that stops early, so it must stay small.
_INPUT_PIECE = 64 << 10
# Largest piece of output asked for at once (a piece is copied once into the result).
_OUTPUT_PIECE = 4 << 20

Member = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


class BoundedInflater:
    """A file-like reader of one gzip member's content, refusing to produce more than `budget`
    bytes in all (`TocTooLargeError`); a corrupt stream is `InvalidTocError`."""

    def __init__(self, member: Member, budget: int) -> None:
        pieces = [member] if isinstance(member, (bytes, bytearray, memoryview)) else list(member)
        self._pieces = [memoryview(p) for p in pieces]
        self._next_piece = 0
        self._pending = memoryview(b"")
        self._inflater = inflate.decompressobj(31)
        self._tail = b""  # input the inflater stopped before
        self.budget = budget
        self.produced = 0

    @property
    def eof(self) -> bool:
        return self._inflater.eof

    def _input(self) -> bytes | memoryview | None:
        if self._tail:
            data, self._tail = self._tail, b""
            return data
        while not self._pending:
            if self._next_piece >= len(self._pieces):
                return None
            self._pending = self._pieces[self._next_piece]
            self._next_piece += 1
        data, self._pending = self._pending[:_INPUT_PIECE], self._pending[_INPUT_PIECE:]
        return data

    def read_into(self, out: bytearray, start: int, length: int) -> int:
        """Inflate up to `length` bytes into `out[start:]`; fewer only at the member's end."""
        pos = start
        end = start + length
        while pos < end and not self._inflater.eof:
            want = min(end - pos, _OUTPUT_PIECE, self.budget - self.produced + 1)
            data = self._input()
            if data is None:
                break
            try:
                piece = self._inflater.decompress(data, want)
            except INFLATE_ERRORS as e:
                raise InvalidTocError(f"TOC member is not valid gzip: {e}") from None
            self._tail = self._inflater.unconsumed_tail
            self.produced += len(piece)
            if self.produced > self.budget:
                raise TocTooLargeError(f"TOC member decompresses to more than {self.budget} bytes")
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
        return pos - start

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (the file-object call `tarfile` makes); -1 means up to the budget."""
        if size < 0:
            size = self.budget - self.produced + 1
        out = bytearray(size)
        n = self.read_into(out, 0, size)
        del out[n:]
        return bytes(out)


def extract_toc_json(member: Member, max_toc_size: int) -> bytes | bytearray:
    """The JSON payload of the TOC member, at most `max_toc_size` bytes (else `TocTooLargeError`).

    Only that one member is decompressed (the footer member after it is never touched). The usual
    result is a `bytearray` filled in place, so a 150 MB TOC is not held twice while it is joined.
    """
    direct = _extract_direct(member, max_toc_size)
    if direct is not None:
        return direct
    reader = BoundedInflater(member, max_toc_size + TAR_HEADER_SLACK)
    try:
        with tarfile.open(fileobj=reader, mode="r|", encoding="utf-8") as tar:  # type: ignore[call-overload]
            info = tar.next()
            if info is None:
                raise InvalidTocError("TOC member holds no tar entry")
            if info.name != TOC_TAR_NAME:
                raise InvalidTocError(f"first entry of the TOC member is {info.name!r}, expected {TOC_TAR_NAME!r}")
            if not info.isreg():
                raise InvalidTocError(f"{TOC_TAR_NAME} in the TOC member is not a regular file")
            if info.size > max_toc_size:
                raise TocTooLargeError(f"TOC is {info.size} bytes, over the cap of {max_toc_size}")
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
    except tarfile.TarError as e:
        raise InvalidTocError(f"TOC member is not a valid tar stream: {e}") from None
    if len(data) != info.size:
        raise InvalidTocError(f"TOC member is truncated: {len(data)} of {info.size} JSON bytes")
    return data


def _extract_direct(member: Member, max_toc_size: int) -> bytearray | None:
    """The JSON when the member starts with a plain regular-file header for it; None otherwise
    (the caller then decodes the member generically, which also produces the precise errors).
    A plain header declaring more than the cap is refused here, before any JSON is inflated."""
    reader = BoundedInflater(member, max_toc_size + tarfile.BLOCKSIZE)
    header = bytearray(tarfile.BLOCKSIZE)
    try:
        if reader.read_into(header, 0, tarfile.BLOCKSIZE) != tarfile.BLOCKSIZE:
            return None
        info = tarfile.TarInfo.frombuf(bytes(header), "utf-8", "surrogateescape")
    except (InvalidTocError, tarfile.TarError):
        return None
    if info.name != TOC_TAR_NAME or info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return None
    if info.size > max_toc_size:
        raise TocTooLargeError(f"TOC is {info.size} bytes, over the cap of {max_toc_size}")
    data = bytearray(info.size)
    try:
        if reader.read_into(data, 0, info.size) != info.size:
            return None
    except InvalidTocError:
        return None
    return data
