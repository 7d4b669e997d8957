"""containers/storage's content-defined chunk boundaries (`compressor/rollsum.go`), at C speed.

containers/storage cuts a file after byte t when its bup-style rolling checksum has its low 16
bits set (`OnSplitWithBits(16)`). Matching those cuts makes our chunks identical to podman's for
the same file, so chunk-level reuse works across images made by either tool.

The checksum over a 64-byte window is linear in the bytes: with the window primed with zeros,
`s2(t) & 0xFFFF == 0xFFFF` holds exactly when `W(t) = sum_{j<64} (j+1) * b[t-j]` is congruent to
6079 modulo 2^16 (6079 = 0xFFFF - 64*63*31 mod 2^16, from the checksum's initial state). `W` is a
convolution with the ramp `1..64`; evaluating polynomials at z = 2^24 turns it into big-integer
arithmetic: pack the bytes into 24-bit lanes (X), multiply by the ramp's numerator
(1 - 65 z^64 + 64 z^65) and divide twice, exactly, by (z - 1). Every lane of the result is one
`W(t)` (< 2^20, so lanes never carry), read back with byte slicing. No per-byte Python loop.
"""
from __future__ import annotations

WINDOW = 64
SPLIT_BITS = 16
_CHAR_OFFSET = 31
_LANE_BITS = 24
_LANE_BYTES = _LANE_BITS // 8
_Z_MINUS_1 = (1 << _LANE_BITS) - 1
_MASK = (1 << SPLIT_BITS) - 1
_TARGET = (_MASK - WINDOW * (WINDOW - 1) * _CHAR_OFFSET) & _MASK
_TARGET_BYTES = _TARGET.to_bytes(2, "little")


def split_points(data: bytes | bytearray, context: bytes = b"") -> list[int]:
    """Indices i of `data` after which containers/storage would cut a chunk.

    `context` is up to 63 bytes of the same file that precede `data` (empty at the start of a
    file, where the window holds zeros), so a file can be processed in blocks.
    """
    context = context[-(WINDOW - 1) :] if context else b""
    stream = bytes(context) + bytes(data)
    n = len(stream)
    if not data:
        return []
    lanes = bytearray(_LANE_BYTES * n)
    lanes[0::_LANE_BYTES] = stream
    x = int.from_bytes(lanes, "little")
    shift = WINDOW * _LANE_BITS
    numerator = x + (((x << (_LANE_BITS + 6)) - (x << 6) - x) << shift)
    w = numerator // _Z_MINUS_1 // _Z_MINUS_1
    raw = w.to_bytes(_LANE_BYTES * (n + WINDOW + 2), "little")
    low = bytearray(2 * n)
    low[0::2] = raw[0 : _LANE_BYTES * n : _LANE_BYTES]
    low[1::2] = raw[1 : _LANE_BYTES * n : _LANE_BYTES]
    skip = len(context)
    points = []
    i = low.find(_TARGET_BYTES, 2 * skip)
    while i >= 0:
        if not i & 1:
            points.append(i // 2 - skip)
        i = low.find(_TARGET_BYTES, i + 1)
    return points


class RollsumReference:
    """containers/storage's `RollSum`, byte at a time: the specification `split_points` must match."""

    def __init__(self) -> None:
        self.s1 = WINDOW * _CHAR_OFFSET
        self.s2 = WINDOW * (WINDOW - 1) * _CHAR_OFFSET
        self._window = [0] * WINDOW
        self._pos = 0

    def roll(self, ch: int) -> None:
        drop = self._window[self._pos]
        self.s1 = (self.s1 + ch - drop) & 0xFFFFFFFF
        self.s2 = (self.s2 + self.s1 - WINDOW * (drop + _CHAR_OFFSET)) & 0xFFFFFFFF
        self._window[self._pos] = ch
        self._pos = (self._pos + 1) % WINDOW

    def on_split(self) -> bool:
        return self.s2 & _MASK == _MASK
