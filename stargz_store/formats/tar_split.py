"""A tar stream split into raw segments and file payloads, byte for byte (vbatts/tar-split).

zstd:chunked must preserve the input tar exactly (`zstd-chunked.md` §2.1, §2.7): headers, PAX
records, padding and trailing bytes stay where they were, only payload framing changes. `tarfile`
normalises what it reads (it strips the `/` of directory names and hides raw header bytes), so this
module walks the 512-byte blocks itself, parsing headers the way Go's `archive/tar` does (the
reader containers/storage uses), which is what decides the names and fields of the TOC.

It also writes and reads the tar-split NDJSON stream and re-assembles a tar from it, which is how
containers/storage recreates the exact uncompressed layer.
"""
from __future__ import annotations

import base64
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator

from .crc64 import Crc64
from .errors import FormatError
from .tar_input import InputTarError

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# Types whose size field does not announce a payload (Go `isHeaderOnlyType`).
_HEADER_ONLY = frozenset(b"123456")
TYPE_NAMES = {
    ord("0"): "reg",
    ord("7"): "reg",
    ord("1"): "hardlink",
    ord("2"): "symlink",
    ord("3"): "char",
    ord("4"): "block",
    ord("5"): "dir",
    ord("6"): "fifo",
}
SEGMENT_TYPE = 2
FILE_TYPE = 1


class TarFormatError(InputTarError):
    """The input is not a tar stream we can re-frame faithfully (corrupt header, sparse file...)."""


class TarSplitError(FormatError):
    """A tar-split stream is malformed or does not match the file contents given to it."""


@dataclass
class TarHeader:
    """One tar entry after PAX / GNU long-name records are applied, as Go's reader presents it.

    `name` and `link_name` keep the exact header bytes (decoded with `surrogateescape`); times are
    nanoseconds since the epoch, `None` when the header has none.
    """

    name: str
    typeflag: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    atime_ns: int | None = None
    ctime_ns: int | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.typeflag]

    @property
    def payload_size(self) -> int:
        return 0 if self.typeflag in _HEADER_ONLY else self.size


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstring(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _parse_numeric(b: bytes, what: str) -> int:
    """Octal (NUL/space padded) or GNU base-256 (`0x80`/`0xff` lead byte), as Go `parseNumeric`."""
    if b and b[0] & 0x80:
        value = int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
        if b[0] & 0x40:  # negative: two's complement over the field width
            value -= 1 << (8 * len(b) - 1)
        return value
    text = b.strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"invalid octal {what} field {b!r} in tar header") from None


def _parse_pax_time(value: bytes) -> int:
    text = value.decode("ascii", "replace").strip()
    sign = -1 if text.startswith("-") else 1
    secs, _, frac = text.lstrip("+-").partition(".")
    if not secs.isdigit() or (frac and not frac.isdigit()):
        raise TarFormatError(f"invalid PAX time {text!r}")
    return sign * (int(secs) * 1_000_000_000 + int(frac[:9].ljust(9, "0") if frac else 0))


def _parse_pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError("malformed PAX record (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("malformed PAX record length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("malformed PAX record")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def _checksum_ok(block: bytes) -> bool:
    stored = _parse_numeric(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    return stored == sum((b - 256 if b > 127 else b) for b in block[:148] + block[156:]) + 8 * 32


class _CountingReader:
    """Reads the uncompressed tar, counting (and optionally hashing) every byte consumed."""

    def __init__(self, stream: BinaryIO, on_data: Callable[[bytes], None] | None) -> None:
        self._stream = stream
        self._on_data = on_data
        self.offset = 0

    def read(self, n: int) -> bytes:
        parts = []
        while n > 0:
            b = self._stream.read(n)
            if not b:
                break
            parts.append(b)
            n -= len(b)
        data = b"".join(parts)
        self.offset += len(data)
        if data and self._on_data:
            self._on_data(data)
        return data


@dataclass
class Segment:
    """Raw bytes of the tar that are not file payload (headers, padding, end blocks, trailer)."""

    data: bytes


@dataclass
class FileEntry:
    """A tar entry; its payload (`header.payload_size` bytes) must be read with `read` in order."""

    header: TarHeader
    read: Callable[[int], bytes]


def split_tar(stream: BinaryIO, *, on_data: Callable[[bytes], None] | None = None) -> Iterator[Segment | FileEntry]:
    """Walk an uncompressed tar stream, yielding its raw segments and its entries in order.

    The concatenation of every `Segment.data` and every entry's payload is exactly the input.
    Each header is preceded by a segment holding the previous entry's padding and this entry's
    header blocks (PAX and GNU long-name records included); the last segments hold the end-of-archive
    blocks and whatever trails them. `on_data` sees every byte read (for the DiffID). Payload not
    read by the consumer is read and discarded before the next entry.
    """
    reader = _CountingReader(stream, on_data)
    pending = bytearray()
    pad = 0
    payload_left = 0
    while True:
        if payload_left:
            while payload_left:
                chunk = reader.read(min(payload_left, 1 << 20))
                if not chunk:
                    raise TarFormatError("tar stream ends inside a file payload")
                payload_left -= len(chunk)
        if pad:
            padding = reader.read(pad)
            if len(padding) != pad:
                raise TarFormatError("tar stream ends inside the padding of a file")
            pending += padding
            pad = 0
        header, end = _read_header(reader, pending)
        if end:
            yield Segment(bytes(pending))
            yield Segment(_read_rest(reader))
            return
        assert header is not None
        yield Segment(bytes(pending))
        pending = bytearray()
        size = header.payload_size
        pad = -size % BLOCK
        remaining = [size]

        def read_payload(n: int, _remaining: list[int] = remaining, _name: str = header.name) -> bytes:
            n = min(n, _remaining[0])
            data = reader.read(n) if n > 0 else b""
            if len(data) != n:
                raise TarFormatError(f"tar stream ends inside the payload of {_name!r}")
            _remaining[0] -= n
            return data

        yield FileEntry(header, read_payload)
        payload_left = remaining[0]
        remaining[0] = 0


def _read_rest(reader: _CountingReader) -> bytes:
    parts = []
    while True:
        b = reader.read(1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)


def _read_block(reader: _CountingReader, pending: bytearray) -> bytes | None:
    block = reader.read(BLOCK)
    if not block:
        return None
    if len(block) != BLOCK:
        raise TarFormatError(f"tar stream ends inside a header block at offset {reader.offset - len(block)}")
    pending += block
    return block


def _read_data(reader: _CountingReader, pending: bytearray, size: int) -> bytes:
    padded = size + (-size % BLOCK)
    data = reader.read(padded)
    if len(data) != padded:
        raise TarFormatError("tar stream ends inside an extended header")
    pending += data
    return data[:size]


def _read_header(reader: _CountingReader, pending: bytearray) -> tuple[TarHeader | None, bool]:
    """The next entry's header, or `(None, True)` at the end of the archive."""
    pax: dict[str, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    while True:
        offset = reader.offset
        block = _read_block(reader, pending)
        if block is None:
            return None, True  # a tar without end-of-archive blocks: Go reads io.EOF too
        if block == _ZERO_BLOCK:
            second = _read_block(reader, pending)
            if second is None or second == _ZERO_BLOCK:
                return None, True
            raise TarFormatError(f"zero block followed by a non-zero block at offset {offset}")
        if not _checksum_ok(block):
            raise TarFormatError(f"invalid tar header checksum at offset {offset}")
        typeflag = block[156]
        size = _parse_numeric(block[124:136], "size")
        if size < 0:
            raise TarFormatError(f"negative size in tar header at offset {offset}")
        if typeflag == ord("x"):
            pax.update(_parse_pax_records(_read_data(reader, pending, size)))
            continue
        if typeflag == ord("g"):
            # A global header applies to later entries in theory, but neither Go's reader nor
            # containers/storage applies it; keep its bytes, describe nothing.
            _read_data(reader, pending, size)
            log.debug("ignoring PAX global header at offset %d", offset)
            continue
        if typeflag == ord("L"):
            long_name = _cstring(_read_data(reader, pending, size))
            continue
        if typeflag == ord("K"):
            long_link = _cstring(_read_data(reader, pending, size))
            continue
        return _make_header(block, typeflag, size, pax, long_name, long_link, offset), False


def _make_header(
    block: bytes,
    typeflag: int,
    size: int,
    pax: dict[str, bytes],
    long_name: bytes | None,
    long_link: bytes | None,
    offset: int,
) -> TarHeader:
    magic = block[257:265]
    is_ustar = magic == b"ustar\x0000"
    is_gnu = magic == b"ustar  \x00"
    name = _cstring(block[0:100])
    if is_ustar:
        prefix = _cstring(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    if long_name is not None:
        name = long_name
    if "path" in pax:
        name = pax["path"]
    link = _cstring(block[157:257])
    if long_link is not None:
        link = long_link
    if "linkpath" in pax:
        link = pax["linkpath"]
    if typeflag in (0, ord("\0")):
        typeflag = ord("5") if name.endswith(b"/") else ord("0")
    if typeflag == ord("S") or any(k.startswith("GNU.sparse.") for k in pax):
        raise TarFormatError(f"sparse tar entry {_decode(name)!r} at offset {offset} is not supported")
    if typeflag not in TYPE_NAMES:
        raise TarFormatError(f"unsupported tar entry type {chr(typeflag)!r} for {_decode(name)!r} at offset {offset}")

    def pax_int(key: str, default: int) -> int:
        if key not in pax:
            return default
        try:
            return int(pax[key])
        except ValueError:
            raise TarFormatError(f"invalid PAX {key} {pax[key]!r} for {_decode(name)!r}") from None

    atime_ns = ctime_ns = None
    if is_gnu:
        if block[345]:
            atime_ns = _parse_numeric(block[345:357], "atime") * 1_000_000_000
        if block[357]:
            ctime_ns = _parse_numeric(block[357:369], "ctime") * 1_000_000_000
    if "atime" in pax:
        atime_ns = _parse_pax_time(pax["atime"])
    if "ctime" in pax:
        ctime_ns = _parse_pax_time(pax["ctime"])
    has_dev = is_ustar or is_gnu
    return TarHeader(
        name=_decode(name),
        typeflag=typeflag,
        mode=_parse_numeric(block[100:108], "mode"),
        uid=pax_int("uid", _parse_numeric(block[108:116], "uid")),
        gid=pax_int("gid", _parse_numeric(block[116:124], "gid")),
        size=pax_int("size", size),
        mtime_ns=_parse_pax_time(pax["mtime"]) if "mtime" in pax else _parse_numeric(block[136:148], "mtime") * 1_000_000_000,
        link_name=_decode(link),
        dev_major=_parse_numeric(block[329:337], "devmajor") if has_dev else 0,
        dev_minor=_parse_numeric(block[337:345], "devminor") if has_dev else 0,
        atime_ns=atime_ns,
        ctime_ns=ctime_ns,
        xattrs={k[len("SCHILY.xattr."):]: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")},
    )


# --- the tar-split NDJSON stream ---------------------------------------------------------------


def _name_fields(name: str) -> dict[str, str]:
    """`name`, or `name_raw` (base64) when the name is not valid UTF-8 (tar-split `SetName`)."""
    try:
        name.encode("utf-8")
        return {"name": name}
    except UnicodeEncodeError:
        return {"name_raw": base64.b64encode(name.encode("utf-8", "surrogateescape")).decode("ascii")}


class TarSplitPacker:
    """Writes tar-split entries as NDJSON lines (tar-split `NewJSONPacker`) to `write`.

    tar-split's own packer refuses a path named twice (`ErrDuplicatePath`); we keep both, since
    the tar must be reproducible byte for byte, and flag it (`has_duplicates`): Go's tar-split
    unpacker will refuse the stream, so containers/storage cannot partially pull such a layer
    (ordinary pulls still work).
    """

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._position = 0
        self._seen: set[str] = set()
        self.has_duplicates = False

    def _add(self, entry: dict) -> None:
        entry["position"] = self._position
        self._position += 1
        self._write(json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n")

    def add_segment(self, data: bytes) -> None:
        self._add({"type": SEGMENT_TYPE, "payload": base64.b64encode(data).decode("ascii") if data else None})

    def add_file(self, name: str, size: int, crc: bytes | None) -> None:
        clean = posixpath.normpath(name)
        if clean in self._seen:
            self.has_duplicates = True
        self._seen.add(clean)
        entry: dict = {"type": FILE_TYPE, **_name_fields(name)}
        if size:
            entry["size"] = size
        entry["payload"] = base64.b64encode(crc).decode("ascii") if crc is not None else None
        self._add(entry)


@dataclass(frozen=True)
class TarSplitEntry:
    type: int
    name: str
    size: int
    payload: bytes
    position: int


def parse_tar_split(data: bytes) -> list[TarSplitEntry]:
    """Decode an uncompressed tar-split stream (NDJSON), validating each line's shape."""
    entries = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            etype = raw["type"]
            if etype not in (FILE_TYPE, SEGMENT_TYPE):
                raise ValueError(f"unknown type {etype!r}")
            if raw.get("name_raw"):
                name = base64.b64decode(raw["name_raw"]).decode("utf-8", "surrogateescape")
            else:
                name = raw.get("name") or ""
            payload = base64.b64decode(raw["payload"]) if raw.get("payload") else b""
            size = int(raw.get("size") or 0)
            entries.append(TarSplitEntry(etype, name, size, payload, int(raw.get("position", 0))))
        except (ValueError, KeyError, TypeError) as e:
            raise TarSplitError(f"tar-split line {lineno} is malformed: {e}") from None
    return entries


def assemble_tar(entries: Iterable[TarSplitEntry], open_file: Callable[[str], Iterable[bytes]]) -> Iterator[bytes]:
    """Re-create the original tar: segments verbatim, file payloads from `open_file(name)`.

    Each payload is checked against its CRC-64 and size, as tar-split's `WriteOutputTarStream`
    does, so a wrong file never silently produces a wrong tar.
    """
    for e in entries:
        if e.type == SEGMENT_TYPE:
            if e.payload:
                yield e.payload
            continue
        if e.size <= 0:
            continue
        crc = Crc64()
        got = 0
        for piece in open_file(e.name):
            crc.update(piece)
            got += len(piece)
            yield piece
        if got != e.size or crc.digest() != e.payload:
            raise TarSplitError(f"file {e.name!r} does not match its tar-split record (size {got} vs {e.size} or CRC)")
