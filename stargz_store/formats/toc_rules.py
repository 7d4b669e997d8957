"""What a TOC may hold: names the kernel can have, and caps on what a build may allocate.

Pure rules, shared by the TOC builder (`toc_records`) and the writers (which
refuse in their input what the readers would refuse in a TOC). Issue 11: a hostile TOC must be
refused with a typed error before it costs more than the caps, whatever it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .errors import (
    BadEntryNameError,
    ChunkTooLargeError,
    EntryEscapesRootError,
    InvalidTocError,
    MissingHardlinkTargetError,
    PathTooDeepError,
    TocTooLargeError,
    TooManyEntriesError,
)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_MAX_DEPTH = 2048
DEFAULT_MAX_IMPLICIT_NAMES = 150 << 20
# 16 times the 4 MiB eStargz and zstd:chunked default (our writers' and containers/storage's
# largest chunk); above it only unchunked legacy stargz files and unusual --chunk-size values.
DEFAULT_MAX_CHUNK_SIZE = 64 << 20


@dataclass(frozen=True)
class TocLimits:
    """What a TOC may make a build allocate, beyond its JSON bytes (capped where it is read).

    - `max_entries`: TOC list elements (files, directories, links, chunk entries) plus the
      parent directories the TOC implies without listing them. A built entry costs 300-800
      bytes and a decoded record 200-600 more while the build runs, so this bounds the build's
      memory where the byte cap cannot: 150 MB of `{"type":"dir"}` is 10 million records.
    - `max_depth`: components of a name. 2048 is the most a path within PATH_MAX (4096 bytes)
      can have; deeper trees cannot be walked by path, and each level of a deep TOC repeats the
      whole prefix in every name.
    - `max_implicit_names`: total bytes of the names of implied parent directories. A listed
      name costs its bytes of JSON, an implied one nothing: one 4 KB name 2048 levels deep
      implies 4 MB of names. Real TOCs list their directories, or imply a few.
    - `max_chunk_size`: bytes one chunk inflates to (its `innerOffset` included: the skipped
      bytes are inflated too), and half the bytes its compressed extent may span. A chunk is
      fetched, inflated and verified whole, in memory (a zstd `zeros` chunk is made whole too), so
      a TOC declaring a 1 TB chunk must be refused here, not met with a MemoryError at the first
      read. The extent gets twice the room: incompressible data grows a little, and an extent
      runs to the next data offset, over the tar headers of the entries without data between.
    """

    max_entries: int = DEFAULT_MAX_ENTRIES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_implicit_names: int = DEFAULT_MAX_IMPLICIT_NAMES
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE

    @property
    def long_name(self) -> int:
        """Names up to this length cannot be too deep (each component takes a byte and a `/`)."""
        return 2 * self.max_depth

    def check_count(self, count: int) -> None:
        if count > self.max_entries:
            raise TooManyEntriesError(f"TOC has {count} entries, more than the cap of {self.max_entries}")

    def check_chunk(self, name: str, file_offset: int, inflated: int, extent: int) -> None:
        """`inflated`: innerOffset + size of one chunk; `extent`: its compressed bytes in the blob."""
        if inflated > self.max_chunk_size or extent > 2 * self.max_chunk_size:
            raise ChunkTooLargeError(
                f"file {name!r}: the chunk at file offset {file_offset} inflates to {inflated} bytes from "
                f"{extent} compressed, over the chunk cap of {self.max_chunk_size} (and twice that compressed)"
            )


DEFAULT_LIMITS = TocLimits()


class ImpliedDirectories:
    """The budget of a build's implied parent directories (count and name bytes, `TocLimits`)."""

    def __init__(self, limits: TocLimits, listed: int) -> None:
        self._room = limits.max_entries - listed
        self._bytes_left = limits.max_implicit_names
        self._limits = limits

    def add(self, name: str) -> None:
        self._room -= 1
        self._bytes_left -= len(name)
        if self._room < 0:
            raise TooManyEntriesError(
                f"TOC implies more directories than fit the cap of {self._limits.max_entries} entries"
            )
        if self._bytes_left < 0:
            raise TocTooLargeError(
                f"the directories the TOC implies have names of more than {self._limits.max_implicit_names} bytes"
            )


_ROOT_SPELLINGS = frozenset({".", "./", "/"})


def normalize_name(raw: str, *, what: str = "entry") -> str:
    """`./a/b/` -> `a/b`; the root (`./`, `.`, `/`) is `""`. Only names the kernel can have pass.

    Tar writes a leading `./` and a trailing `/` (directories), so those are accepted; anything
    else that is not a plain relative path is refused rather than cleaned: a NUL byte (the kernel
    would cut the name there, so the entry would list under one name and be found under none),
    an empty name, empty or `.` components (`a//b`, `a/./b`), and `..` components or absolute
    paths, which leave the root. The Go reader cleans such names (`path.Clean`); a TOC holding
    them is broken or hostile, and the converter refuses them in its input as well.
    """
    if "\0" in raw:
        raise BadEntryNameError(f"{what} {raw!r} holds a NUL byte")
    if raw in _ROOT_SPELLINGS:
        return ""
    if not raw:
        raise BadEntryNameError(f"{what} has an empty name")
    if raw[0] == "/":
        raise EntryEscapesRootError(f"{what} {raw!r} is an absolute path")
    name = raw[2:] if raw.startswith("./") else raw
    if name.endswith("/"):
        name = name[:-1]
    parts = name.split("/")
    if ".." in parts:
        raise EntryEscapesRootError(f"{what} {raw!r} escapes the layer root with '..'")
    if "" in parts:
        raise BadEntryNameError(f"{what} {raw!r} has an empty component")
    if "." in parts:
        raise BadEntryNameError(f"{what} {raw!r} has a '.' component")
    return name


def resolve_hardlinks(link_names: Mapping[str, str], type_of: Callable[[str], str | None]) -> dict[str, str]:
    """Each hardlink's final target: the non-hardlink entry its chain of hardlinks ends at.

    `link_names` maps each hardlink's name to its raw `linkName`, in TOC order; `type_of(name)`
    is the type of the non-hardlink entry of that name, None when there is none. Every link's
    target is remembered once resolved, so a chain of n hardlinks costs n steps, not n*n/2 (a
    hostile chain of 100,000 would otherwise take hours). Loops, missing targets and
    directories are refused, named by the first hardlink (in TOC order) that leads to them.
    """
    resolved: dict[str, str] = {}
    for name in link_names:
        if name in resolved:
            continue
        chain = [name]
        on_chain = {name}
        current = name
        while True:
            target = normalize_name(link_names[current], what=f"hardlink {current!r} target")
            final = resolved.get(target)
            if final is not None:
                break
            if target in on_chain:
                raise InvalidTocError(f"hardlink loop at {name!r}")
            kind = type_of(target)
            if kind is not None:
                if kind == "dir":
                    raise InvalidTocError(f"hardlink {name!r} points to a directory")
                final = target
                break
            if target not in link_names:
                raise MissingHardlinkTargetError(f"hardlink {name!r} points to missing {target!r}")
            chain.append(target)
            on_chain.add(target)
            current = target
        for link in chain:
            resolved[link] = final
    return resolved


def check_depth(name: str, limits: TocLimits) -> None:
    """Refuse a normalised name of more than `limits.max_depth` components (callers test
    `len(name) > limits.long_name` first: a shorter name cannot have that many)."""
    if name.count("/") >= limits.max_depth:
        raise PathTooDeepError(
            f"entry {name[:64]!r}... is {name.count('/') + 1} components deep, deeper than the cap of {limits.max_depth}"
        )


def check_link_target(name: str, link_name: str) -> None:
    """A symlink target holding NUL cannot be returned by readlink (it would be cut there)."""
    if "\0" in link_name:
        raise BadEntryNameError(f"symlink {name!r}: target {link_name!r} holds a NUL byte")


def check_xattr_names(name: str, names: Iterable[str]) -> None:
    for key in names:
        if not key or "\0" in key:
            raise BadEntryNameError(f"entry {name!r}: xattr name {key!r} is empty or holds a NUL byte")
