"""Typed errors of the format layer.

Every error says what is wrong and where, so a log line is enough to understand a refused layer.
All derive from `FormatError`, which the layer and fs code map to "not lazily servable" (ENOENT at
lookup) or EIO (at read), in one place each.
"""
from __future__ import annotations


class FormatError(Exception):
    """Base class: the blob or its TOC is not something we can serve safely."""


class NotLazyFormatError(FormatError):
    """The blob has no eStargz/zstd:chunked footer: a plain layer, to be pulled normally."""


class BadFooterError(FormatError):
    """A footer was found where one was expected, but its magic or fields are invalid."""


class InvalidTocError(FormatError):
    """The TOC is malformed (bad JSON, wrong types, missing required fields)."""


class TocTooLargeError(InvalidTocError):
    """The TOC exceeds one of the configured caps (bytes, entries, depth): protects memory
    against hostile blobs. Raised before the excess is allocated, as far as it can be known."""


class TooManyEntriesError(TocTooLargeError):
    """The TOC holds more entries (implicit parent directories included) than the cap."""


class PathTooDeepError(TocTooLargeError):
    """An entry name has more components than the depth cap."""


class ChunkTooLargeError(TocTooLargeError):
    """A chunk would be inflated (or its compressed extent fetched) larger than the chunk cap: the
    read path holds a whole chunk in memory, so its size is bounded like the TOC's."""


class BadEntryNameError(InvalidTocError):
    """A name the kernel cannot have: empty, with a NUL byte, or with an empty, `.` or `..`
    component (a leading `./` and a trailing `/` are spellings tar uses, and are accepted)."""


class EntryEscapesRootError(BadEntryNameError):
    """An entry name or hardlink target is absolute or contains a `..` component."""


class DuplicateEntryError(InvalidTocError):
    """Two TOC entries carry the same (normalised) name."""


class OutOfBoundsError(InvalidTocError):
    """An offset or size points outside the blob's data area."""


class ChunkCoverageError(InvalidTocError):
    """A file's chunks do not cover it exactly (gap, overlap, or wrong total)."""


class MissingHardlinkTargetError(InvalidTocError):
    """A hardlink names a target that is not in the TOC."""


class DigestMismatchError(FormatError):
    """Content does not hash to the digest that authenticates it (TOC digest or chunk digest)."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual
