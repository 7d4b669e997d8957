"""CRC-64/ISO as Go's `hash/crc64` computes it with `crc64.MakeTable(crc64.ISO)`.

tar-split records this checksum of every file payload (`zstd-chunked.md` §2.7) and checks it when
it re-assembles a tar, so it must be exact. There is no C implementation in the standard library,
and a byte-at-a-time table loop in Python runs at a few MB/s, so the residue is computed with
whole-buffer big-integer operations instead: in GF(2)[x] with P = x^64 + x^4 + x^3 + x + 1,
x^(64*2^j) = x^(4*2^j) + x^(3*2^j) + x^(2^j) + 1 (Frobenius), which folds the upper half of a
polynomial of any length onto the lower half with four shifts and xors, at C speed.
"""
from __future__ import annotations

_MASK64 = (1 << 64) - 1
# Reverses the bit order of every byte: the CRC is "reflected" (least significant bit first).
_REVERSE_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _reflect64(value: int) -> int:
    return int(f"{value:064b}"[::-1], 2)


def _reduce(a: int) -> int:
    """`a mod P` for a polynomial of any degree (bit i = coefficient of x^i)."""
    while a.bit_length() > 64:
        n = a.bit_length()
        k = 64
        while k * 2 < n:
            k *= 2
        high = a >> k
        a = (a & ((1 << k) - 1)) ^ high ^ (high << (k >> 6)) ^ (high << (3 * k >> 6)) ^ (high << (k >> 4))
    return a


class Crc64:
    """Incremental CRC-64/ISO (`update` any number of times, then `digest`/`value`)."""

    def __init__(self) -> None:
        # The residue of (init * x^(8L) + M * x^64) mod P, with init = all ones.
        self._residue = _MASK64

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        block = int.from_bytes(bytes(data).translate(_REVERSE_BITS), "big")
        self._residue = _reduce((self._residue << (8 * len(data))) ^ (block << 64))

    @property
    def value(self) -> int:
        return _reflect64(self._residue) ^ _MASK64

    def digest(self) -> bytes:
        """Big-endian 8 bytes, as Go's `hash.Hash64.Sum(nil)`."""
        return self.value.to_bytes(8, "big")


def crc64_iso(data: bytes) -> int:
    c = Crc64()
    c.update(data)
    return c.value
