"""Our chunk boundaries are containers/storage's: same rolling checksum, same zero-run rule.

Checked against a byte-at-a-time model of containers/storage's `holesFinder` +
`rollingChecksumReader` on synthetic data, and against the chunks podman itself wrote into the
reference blob.
"""
from __future__ import annotations

import io
import random

import pytest

from stargz_store.formats import zstd_chunked
from stargz_store.formats.file_reader import read_file
from stargz_store.formats.zstd_chunked_writer import MAX_ZERO_CHUNK, iter_payload_chunks
from stargz_store.formats.zstd_rollsum import RollsumReference, split_points

from .expected import load_oci_image

HOLE = 1024


def go_chunks(data: bytes) -> list[tuple[int, int, bool]]:
    """containers/storage's chunking, byte by byte: (file offset, size, is_zeros) per chunk."""
    rs = RollsumReference()
    chunks: list[tuple[int, int, bool]] = []
    start = i = 0
    n = len(data)

    def data_byte(k: int, value: int) -> None:
        nonlocal start
        rs.roll(value)
        if rs.on_split():
            chunks.append((start, k + 1 - start, False))
            start = k + 1

    while i < n:
        if data[i] == 0:
            j = i
            while j < n and data[j] == 0:
                j += 1
            if j - i >= HOLE:
                if i > start:
                    chunks.append((start, i - start, False))
                for _ in range(j - i):
                    rs.roll(0)
                chunks.append((i, j - i, True))
                start = i = j
                continue
            for k in range(i, j):
                data_byte(k, 0)
            i = j
            continue
        data_byte(i, data[i])
        i += 1
    if start < n:
        chunks.append((start, n - start, False))
    return chunks


def our_chunks(data: bytes, chunk_size: int | None = None) -> list[tuple[int, int, bool]]:
    src = io.BytesIO(data)
    out, offset = [], 0
    for piece, zeros in iter_payload_chunks(src.read, len(data), chunk_size):
        out.append((offset, len(piece), zeros))
        offset += len(piece)
    assert offset == len(data)
    return out


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(
    "data",
    [
        _rand(400_000, 1),
        bytes(HOLE) + _rand(200_000, 2),  # hole at the very start
        _rand(150_000, 3) + bytes(HOLE - 1) + _rand(150_000, 4),  # one byte short of a hole
        _rand(150_000, 5) + bytes(HOLE) + _rand(150_000, 6) + bytes(5000),  # hole of exactly 1 KiB, hole at the end
        (_rand(300, 7) + bytes(900)) * 300,  # many short zero runs: all data
        bytes(range(256)) * 2000,  # periodic data
        _rand(70, 8),
    ],
    ids=["random", "hole-first", "almost-hole", "holes", "short-runs", "periodic", "tiny"],
)
def test_chunks_match_containers_storage_model(data):
    assert our_chunks(data) == go_chunks(data)


def test_split_points_match_the_byte_at_a_time_checksum():
    data = _rand(300_000, 9) + bytes(3000) + bytes(range(256)) * 300
    rs = RollsumReference()
    expected = []
    for i, b in enumerate(data):
        rs.roll(b)
        if rs.on_split():
            expected.append(i)
    assert expected  # the data does hit the split condition
    assert split_points(data) == expected
    for cut in (1, 62, 63, 64, 65, 100_000):  # block-wise with carried context
        tail = split_points(data[cut:], data[max(0, cut - 63) : cut])
        assert split_points(data[:cut]) + [cut + i for i in tail] == expected


def test_podman_chunks_are_reproduced_exactly(testdata):
    """Same file in, same chunks out as containers/storage (podman 4.3.1's blob)."""
    layer = load_oci_image(testdata / "podman-zstdchunked").layers[0]
    with layer.open() as read_at:
        parsed = zstd_chunked.read_toc_any(read_at, layer.size, layer.annotations)
        for name in ("data/rand", "bin/busybox"):
            entry = parsed.toc.lookup(name)
            content = read_file(parsed, read_at, entry)
            want = [(c.file_offset, c.size, c.zeros) for c in entry.chunks]
            assert len(want) > 10
            assert our_chunks(content) == want


def test_fixed_chunks_and_caps():
    data = _rand(100_000, 10) + bytes(MAX_ZERO_CHUNK + 5000) + _rand(10, 11)
    fixed = our_chunks(data, 30_000)
    assert [c[1] for c in fixed[:4]] == [30_000, 30_000, 30_000, 10_000]
    zeros = [c for c in fixed if c[2]]
    assert [c[1] for c in zeros] == [MAX_ZERO_CHUNK, 5000]
    assert fixed[-1] == (len(data) - 10, 10, False)
    assert our_chunks(b"") == []
