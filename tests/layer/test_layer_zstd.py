"""Layer over containers/storage zstd:chunked blobs from our writer: the same data path, zstd frames."""
from __future__ import annotations

import random

from .helpers import build_zstd_layer


def test_zstd_chunked_reads_are_byte_exact_and_holes_cost_nothing(tmp_path, open_layer):
    rnd = random.Random(9)
    sparse = rnd.randbytes(300_000) + bytes(2_000_000) + rnd.randbytes(100_000)
    files = {"sparse.img": sparse, "text": b"zstd text\n" * 20_000, "one": b"1"}
    built = build_zstd_layer(tmp_path / "z.blob", files)
    layer, src = open_layer(built)
    assert src.calls == 1
    entry = layer.toc.lookup("sparse.img")
    holes = [c for c in entry.chunks if c.zeros]
    assert holes, "the writer should have cut the zero run into hole chunks"
    src.reset_counters()
    hole = holes[0]
    assert layer.read(entry, hole.file_offset, hole.size) == bytes(hole.size)
    assert src.calls == 0
    for name, data in files.items():
        e = layer.toc.lookup(name)
        assert layer.read(e, 0, e.size) == data
        for _ in range(30):
            off = rnd.randrange(0, len(data))
            size = rnd.choice([1, 4096, 131072, 1 << 20])
            assert layer.read(e, off, size) == data[off : off + size]


def test_zstd_chunked_opens_by_its_toc_key(tmp_path, open_layer, cache):
    from stargz_store.layer import LayerResolver

    from .conftest import lazy_config

    built = build_zstd_layer(tmp_path / "z.blob", {"f": b"data" * 1000})
    resolver = LayerResolver(None, cache, lazy_config())
    with resolver.open_layer_from_source(built.source(), built.descriptor, key_digest=built.result.toc_digest) as layer:
        assert layer.parsed.toc_digest == built.result.toc_digest
        assert layer.read(layer.toc.lookup("f"), 0, 10) == b"datadatada"
