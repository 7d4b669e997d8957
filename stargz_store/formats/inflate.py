"""gzip inflation of layer data (TOC members, chunks), zlib's `decompressobj` API.

ISA-L's igzip (the `isal` package) inflates 2-5x faster than zlib on compressible data and
releases the GIL while it works, which is most of a resolve's TOC inflation and of a cold read's
CPU. zlib stays the fallback where `isal` has no wheel; both behave the same for every stream
(tests/formats run against whichever is installed, and test_inflate.py holds them equal).
"""
from __future__ import annotations

import zlib
from typing import Any

try:
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal has wheels for the platforms we ship on
    _isal_zlib = None

IMPLEMENTATION = "isal" if _isal_zlib is not None else "zlib"

# What a corrupt stream raises, whichever library inflates it.
INFLATE_ERRORS: tuple[type[Exception], ...] = (
    (zlib.error, _isal_zlib.error) if _isal_zlib is not None else (zlib.error,)
)


def decompressobj(wbits: int = 31) -> Any:
    """A streaming inflater (`wbits` 31: one gzip member), like `zlib.decompressobj`."""
    if _isal_zlib is not None:
        return _isal_zlib.decompressobj(wbits)
    return zlib.decompressobj(wbits)


def zlib_decompressobj(wbits: int = 31) -> Any:
    """zlib's own inflater (the reference the tests compare against)."""
    return zlib.decompressobj(wbits)
