"""Input layers for the writers: compression detection and damaged input."""
import io

import pytest
import zstandard

from stargz_store.formats.tar_input import InputTarError, open_tar_stream

SKIPPABLE = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"


def _frames() -> tuple[bytes, bytes]:
    plain = b"".join(bytes([i]) * 300_000 for i in range(3))
    cctx = zstandard.ZstdCompressor()
    compressed = b"".join(cctx.compress(plain[i * 300_000 : (i + 1) * 300_000]) for i in range(3))
    return plain, compressed


def test_multi_frame_zstd_with_skippable_frames_reads_whole_stream():
    plain, compressed = _frames()
    assert open_tar_stream(io.BytesIO(SKIPPABLE + compressed + SKIPPABLE)).read() == plain


def test_truncated_zstd_input_is_an_error_not_a_shorter_layer():
    _, compressed = _frames()
    with pytest.raises(InputTarError, match="truncated"):
        open_tar_stream(io.BytesIO(compressed[:-5])).read()
