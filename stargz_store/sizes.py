"""Byte counts for people (log lines, `stargz-store status`): "3.2 GiB", "512 B"."""
from __future__ import annotations


def size_text(n: int | None) -> str:
    """`n` bytes in the largest binary unit it reaches, one decimal; "-" for unknown (None)."""
    if n is None:
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
