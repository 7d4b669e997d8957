"""A layer refused at open frees everything it read and built, even while its error is kept.

The daemon keeps a refused layer's error (the open's future, the negative cache) and answers the
next lookup with it; before, the error's traceback kept the frames of the TOC readers alive, and
with them the compressed TOC, its JSON and the decoded records: hundreds of MB per refused lookup
at the default caps. Measured here with tracemalloc (Python's own allocations, deterministic),
through `LayerResolver`, on layers that are refused only after a few MB were allocated.
"""
from __future__ import annotations

import functools
import gc
import tracemalloc

import pytest

from stargz_store.cache.chunk_cache import ChunkCache
from stargz_store.formats.errors import FormatError
from stargz_store.layer.config import LayerConfig
from stargz_store.layer.resolver import LayerResolver
from stargz_store.layer.sources import FileBlobSource
from tests.fixtures.hostile_layers import estargz_layer, streamed_member, tar_header

MB = 1 << 20


def _files(n: int) -> list[dict]:
    digest = "sha256:" + "1" * 64
    return [{"name": f"dir{i % 50}/file-{i:06d}-{'x' * 120}", "type": "reg", "size": 1, "offset": 0,
             "digest": digest, "chunkDigest": digest} for i in range(n)]


@functools.lru_cache(maxsize=None)
def _layers():
    files = {"f.txt": b"payload\n"}
    many = _files(12_000)  # a TOC of ~3 MB of JSON, parsed whole before it is refused
    return {
        "toc digest mismatch": estargz_layer("mismatch", files, toc_edit=lambda e, _: e.extend(many),
                                             toc_digest="sha256:" + "0" * 64),
        "too deep": estargz_layer("deep", files, toc_edit=lambda e, _: e.extend(
            many + [{"name": "/".join(["d"] * 3000), "type": "dir"}])),
        "PAX header bomb": estargz_layer("pax", files, member=streamed_member(
            tar_header("././@PaxHeader", 20 * MB, b"x"), (b"9999 comment=" + b"y" * 9985 + b"\n" for _ in range(2000)))),
    }


@pytest.mark.parametrize("kind", ["toc digest mismatch", "too deep", "PAX header bomb"])
def test_refused_layer_keeps_no_memory_while_its_error_is_kept(tmp_path, kind):
    layer = _layers()[kind]
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob)
    config = LayerConfig(no_prefetch=True, no_background_fetch=True, max_toc_size=8 * MB, tail_size=64 << 10)
    resolver = LayerResolver(None, ChunkCache(tmp_path / "cache"), config)
    source = FileBlobSource(blob)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(FormatError) as info:
            resolver.open_layer_from_source(source, layer.descriptor)
        kept = info.value  # as the daemon keeps it: a future's result, the negative cache
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before > 3 * MB, "the refusal came before the layer cost anything: nothing measured"
    assert held - before < MB // 2, f"{kind}: {(held - before) / MB:.1f} MB still held by {kept!r}"
