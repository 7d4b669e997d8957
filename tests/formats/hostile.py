"""What the hostile-input properties and the fuzzer share: seeds, invariants and the targets.

A target takes bytes and feeds them to one format parser the way a registry could: a footer, a
whole blob, a TOC member, TOC JSON inside an otherwise valid blob, a zstd:chunked blob whose
manifest digest matches (an attacker controls the manifest too), a tar-split stream, a tar, a
chunk. It returns normally when the parser produced a model that satisfies `check_tree` (and
every file of it read back verified or refused), or when the parser raised a `FormatError`;
anything else escapes, which is a bug. `run_input` picks the target from the first byte, so one
corpus covers them all (`tests/fuzz/fuzz_formats.py`, `test_fuzz_regressions.py`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import zlib
from typing import Callable

from stargz_store.formats import estargz_footer, zstd_chunked, zstd_chunked_footer
from stargz_store.formats.errors import FormatError
from stargz_store.formats.estargz import build_estargz, decompress_chunk, read_toc
from stargz_store.formats.estargz_writer import build_toc_member
from stargz_store.formats.file_reader import read_file
from stargz_store.formats.layer_toc import ParsedToc, sha256_digest
from stargz_store.formats.tar_split import parse_tar_split, split_tar
from stargz_store.formats.toc import DIR, REG, Chunk, Toc, TocLimits, parse_toc_document
from stargz_store.formats.toc_member import extract_toc_json
from stargz_store.formats.zstd_chunked_writer import build_zstd_chunked

from .tarfixtures import small_tar

LIMITS = TocLimits(max_entries=64, max_depth=8, max_implicit_names=4096)
CAP = 1 << 20


def outcome(fn: Callable, *args, **kwargs) -> tuple[str, object]:
    """("ok", value) or ("refused", error type); any other exception fails the caller."""
    try:
        return "ok", fn(*args, **kwargs)
    except FormatError as e:
        return "refused", type(e)


class BytesReadAt:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __call__(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise AssertionError(f"a reader asked for a negative range ({offset}, {length})")
        return self.data[offset : offset + length]


def check_tree(toc: Toc, data_end: int, limits: TocLimits = LIMITS) -> None:
    """The invariants `formats.toc` promises, and the caps."""
    assert len(toc) <= limits.max_entries + 1  # the root may be implied
    assert toc.root.type == DIR and toc.lookup("") is toc.root
    for name, e in toc.entries():
        if name:
            parts = name.split("/")
            assert all(p not in ("", ".", "..") for p in parts), name
            assert "\0" not in name
            assert len(parts) <= limits.max_depth
            parent = toc.lookup(name.rpartition("/")[0])
            assert parent is not None and parent.type == DIR, name
            assert toc.children(name.rpartition("/")[0]).get(parts[-1]) is e
        if e.type == REG and e.size:
            covered = 0
            for c in e.chunks:
                assert c.file_offset == covered and c.size > 0
                assert 0 <= c.blob_offset < c.blob_end <= data_end
                assert c.inner_offset >= 0
                covered += c.size
            assert covered == e.size
        else:
            assert not e.chunks


def snapshot(toc: Toc) -> list:
    return [(name, tuple(e)) for name, e in toc.entries()]


def build_outcome(build: Callable[[], Toc]) -> tuple[str, object, object]:
    """The outcome of one TOC build: (kind, snapshot or error type, value)."""
    kind, value = outcome(build)
    return kind, snapshot(value) if kind == "ok" else value, value  # type: ignore[arg-type]


# Files larger than this are not read back: a file is read whole here, and its chunks, though each
# within `TocLimits.max_chunk_size`, may be many.
READ_BACK_LIMIT = 16 << 20


def read_all_files(parsed: ParsedToc, blob: bytes) -> None:
    """Every file of a parsed TOC reads back its verified bytes, or fails with a FormatError."""
    for _, e in parsed.toc.entries():
        if e.type == REG and 0 < e.size <= READ_BACK_LIMIT:
            kind, data = outcome(read_file, parsed, BytesReadAt(blob), e)
            if kind == "ok":
                assert len(data) == e.size  # type: ignore[arg-type]


@functools.lru_cache(maxsize=None)
def estargz_seed() -> tuple[bytes, int, bytes]:
    """A small real eStargz blob, its TOC offset and its TOC JSON."""
    out = io.BytesIO()
    build_estargz(io.BytesIO(small_tar()), out)
    blob = out.getvalue()
    toc_offset, footer_size = estargz_footer.parse_footer(blob[-51:])
    toc_json = bytes(extract_toc_json(blob[toc_offset : len(blob) - footer_size], CAP))
    return blob, toc_offset, toc_json


@functools.lru_cache(maxsize=None)
def zstd_seed() -> tuple[bytes, dict]:
    out = io.BytesIO()
    result = build_zstd_chunked(io.BytesIO(small_tar()), out, chunk_size=4096)
    return out.getvalue(), dict(result.annotations)


def estargz_with_toc_json(toc_json: bytes) -> tuple[bytes, int]:
    blob, toc_offset, _ = estargz_seed()
    return blob[:toc_offset] + build_toc_member(toc_json, 1)[1] + estargz_footer.build_footer(toc_offset), toc_offset


# --- targets ---------------------------------------------------------------------------------------


def target_estargz_footer(data: bytes) -> None:
    kind, value = outcome(estargz_footer.parse_footer, data)
    if kind == "ok":
        offset, size = value  # type: ignore[misc]
        assert size in (estargz_footer.FOOTER_SIZE, estargz_footer.LEGACY_FOOTER_SIZE) and offset >= 0


def target_zstd_footer(data: bytes) -> None:
    kind, value = outcome(zstd_chunked_footer.parse_footer, data)
    if kind == "ok":
        assert value.size in (40, 56, 64) and value.toc_offset >= 0  # type: ignore[union-attr]


def target_toc_json(data: bytes) -> None:
    """Any document is refused with a typed error or builds a tree that keeps the invariants
    (the one builder's two entry points agree on curated TOCs: tests/formats/test_toc_paths.py)."""
    kind, _, value = build_outcome(lambda: parse_toc_document(data, data_end=1 << 20, limits=LIMITS))
    if kind == "ok":
        check_tree(value, 1 << 20)  # type: ignore[arg-type]


def target_toc_member(data: bytes) -> None:
    split = data[0] if data else 0
    kind, value = outcome(extract_toc_json, [data[1 : 1 + split], data[1 + split :]], 4096)
    if kind == "ok":
        assert len(value) <= 4096  # type: ignore[arg-type]


def target_estargz_blob(data: bytes) -> None:
    kind, parsed = outcome(read_toc, BytesReadAt(data), len(data), expected_toc_digest=None, max_toc_size=CAP,
                           limits=LIMITS, tail_size=4096)
    if kind == "ok":
        check_tree(parsed.toc, parsed.toc_offset)  # type: ignore[union-attr]
        read_all_files(parsed, data)  # type: ignore[arg-type]


def target_estargz_toc_json(data: bytes) -> None:
    target_estargz_blob(estargz_with_toc_json(data)[0])


def target_zstd_blob(data: bytes) -> None:
    """The footer decides where the manifest is; its digest is taken as the trusted one."""
    read_at = BytesReadAt(data)
    try:
        toc_bytes = zstd_chunked._fetch_toc(read_at, len(data), None, max_toc_size=CAP, tail_size=4096)
        parsed = zstd_chunked._read_containers(toc_bytes, sha256_digest(toc_bytes.compressed), {}, CAP, LIMITS)
    except FormatError:
        return
    check_tree(parsed.toc, parsed.toc_offset - 8)
    read_all_files(parsed, data)
    if parsed.tar_split_digest:
        outcome(zstd_chunked.read_tar_split, read_at, parsed, max_size=CAP)


def target_zstd_manifest(data: bytes) -> None:
    """`data` as the compressed manifest of a valid blob, with a matching checksum annotation."""
    blob, annotations = zstd_seed()
    offset, _, usize = zstd_chunked.manifest_position(annotations)
    rebuilt = blob[: offset - 8] + zstd_chunked_footer.skippable_frame(data)
    ann = {zstd_chunked.ANNOTATION_ZSTD_MANIFEST_CHECKSUM: sha256_digest(data),
           zstd_chunked.ANNOTATION_ZSTD_MANIFEST_POSITION: f"{offset}:{len(data)}:0:1"}
    kind, parsed = outcome(zstd_chunked.read_toc_any, BytesReadAt(rebuilt), len(rebuilt), ann, max_toc_size=CAP,
                           limits=LIMITS)
    if kind == "ok":
        check_tree(parsed.toc, offset - 8)  # type: ignore[union-attr]
        read_all_files(parsed, rebuilt)  # type: ignore[arg-type]


def target_tar_split(data: bytes) -> None:
    kind, value = outcome(parse_tar_split, data)
    if kind == "ok":
        assert all(e.type in (1, 2) for e in value)  # type: ignore[union-attr]


def target_tar(data: bytes) -> None:
    def walk() -> None:
        for item in split_tar(io.BytesIO(data)):
            read = getattr(item, "read", None)
            if read is not None:
                read(1 << 20)

    outcome(walk)


def target_chunk(data: bytes) -> None:
    """A chunk's compressed bytes: the verified payload (zeros, so its digest is known) or a refusal."""
    if len(data) < 4:
        return
    size = 1 + int.from_bytes(data[:2], "little")
    inner = data[2]
    zstd, zeros = bool(data[3] & 1), bool(data[3] & 2)
    payload = bytes(size)
    chunk = Chunk(0, size, 0, len(data) - 4, inner, sha256_digest(payload), zeros)
    kind, value = outcome(zstd_chunked.decompress_chunk if zstd else decompress_chunk, data[4:], chunk)
    if kind == "ok":
        assert value == payload


TARGETS: list[Callable[[bytes], None]] = [
    target_estargz_footer,
    target_zstd_footer,
    target_toc_json,
    target_toc_member,
    target_estargz_blob,
    target_estargz_toc_json,
    target_zstd_blob,
    target_zstd_manifest,
    target_tar_split,
    target_tar,
    target_chunk,
]


def run_input(data: bytes) -> None:
    """One fuzz input: its first byte picks the target, the rest is the target's input."""
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def seeds() -> dict[str, bytes]:
    """A valid input for each target (the fuzzer's starting corpus), named by target."""
    blob, toc_offset, toc_json = estargz_seed()
    zblob, annotations = zstd_seed()
    offset, size, _ = zstd_chunked.manifest_position(annotations)
    member = blob[toc_offset : len(blob) - estargz_footer.FOOTER_SIZE]
    tar_split = b'{"type":2,"payload":"AAAA","position":0}\n{"type":1,"name":"a","size":1,"payload":null,"position":1}\n'
    bodies = {
        target_estargz_footer: blob[-51:],
        target_zstd_footer: zblob[-72:],
        target_toc_json: toc_json,
        target_toc_member: bytes([min(255, len(member) // 2)]) + member,
        target_estargz_blob: blob,
        target_estargz_toc_json: toc_json,
        target_zstd_blob: zblob,
        target_zstd_manifest: zblob[offset : offset + size],
        target_tar_split: tar_split,
        target_tar: small_tar(),
        target_chunk: b"\x10\x00\x00\x00" + _gzip_zeros(17),
    }
    return {fn.__name__: bytes([TARGETS.index(fn)]) + body for fn, body in bodies.items()}


def _gzip_zeros(size: int) -> bytes:
    return zlib.compress(bytes(size), 6, wbits=31)


def input_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
