"""The fast inflater (`formats.inflate`, ISA-L when installed) must behave exactly like zlib on
every stream the readers feed it: whole members, bounded output, members followed by more data,
truncated and corrupt input."""
from __future__ import annotations

import gzip
import os
import zlib

import pytest

from stargz_store.formats import inflate


def _gzip(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


TEXT = b"".join(b"line %d of a text file that compresses well\n" % i for i in range(20000))
STREAMS = {
    "text": _gzip(TEXT),
    "random": _gzip(os.urandom(300_000), 1),
    "empty": _gzip(b""),
    "two members": _gzip(b"first member ") + _gzip(b"second member"),
    "member then padding": _gzip(TEXT[:5000]) + b"\0" * 1024,
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("limit", [0, 1, 512, 4096, 10**9])
def test_bounded_inflate_matches_zlib(name: str, limit: int) -> None:
    """Same output for a bounded call and for continuing with `unconsumed_tail` (how much input
    each library buffers inside differs, so the tails themselves may differ), same end state."""
    data = STREAMS[name]

    def run(d) -> tuple[bytes, bytes, bool, bytes]:
        first = d.decompress(data, limit) if limit else d.decompress(data)
        rest = d.decompress(d.unconsumed_tail) if d.unconsumed_tail else b""
        return first, rest, d.eof, d.unused_data

    ours, ref = run(inflate.decompressobj(31)), run(inflate.zlib_decompressobj(31))
    assert ours[0] == ref[0]  # the bounded call
    assert ours[0] + ours[1] == ref[0] + ref[1]
    assert ours[2:] == ref[2:]


def test_member_boundary_leaves_the_next_member_in_unused_data() -> None:
    d = inflate.decompressobj(31)
    assert d.decompress(STREAMS["two members"]) == b"first member "
    assert d.eof and gzip.decompress(d.unused_data) == b"second member"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not gzip"])
def test_bad_streams_raise_one_of_the_inflate_errors(damage: str) -> None:
    data = bytearray(STREAMS["text"])
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        data[len(data) // 2 + 1] ^= 0xFF
    else:
        data = bytearray(b"plainly not a gzip member" * 10)
    d = inflate.decompressobj(31)
    try:
        out = d.decompress(bytes(data))
    except inflate.INFLATE_ERRORS:
        return  # refused outright
    # Truncation is not an error for a streaming inflater: it simply has not reached the end.
    assert not d.eof and out != TEXT


def test_the_fast_implementation_is_in_use() -> None:
    """setup.cfg installs isal; falling back to zlib silently would lose the speed."""
    assert inflate.IMPLEMENTATION == "isal"
