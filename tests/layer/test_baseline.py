"""The baseline fetch policy (`[store] fetch_policy = "baseline"`, issue 13 point 3): fetch the way
the Go store does, so benchmarks can show the default policies against it in the same run.

No heuristics; a chunk is fetched as the 50,000-byte aligned blocks of the blob that hold it,
adjacent blocks in one request, two requests at a time; every block fetched is kept, so a chunk
whose blocks are all kept needs no request.
"""
from __future__ import annotations

import random

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.daemon.config import ConfigError, config_from_toml
from stargz_store.layer import LayerConfig
from stargz_store.layer.config import BASELINE_BLOCK_SIZE

from .conftest import lazy_config
from .helpers import build_layer

B = BASELINE_BLOCK_SIZE


def _files() -> dict[str, bytes]:
    rnd = random.Random(21)
    files = {f"pkg/m{i}.py": b"".join(b"%d line %d\n" % (i, n) for n in range(rnd.randint(50, 400)))
             for i in range(30)}
    files["bin/tool"] = rnd.randbytes(300_000)
    return files


def _blocks(start: int, end: int, size: int) -> tuple[int, int]:
    """The (offset, length) of the aligned blocks holding blob bytes [start, end)."""
    lo = start // B * B
    hi = min(size, -(-end // B) * B)
    return lo, hi - lo


def test_the_config_key_switches_to_the_go_store_shape():
    cfg = config_from_toml({"store": {"fetch_policy": "baseline", "neighbour_fetch_kb": 64}}).layer
    assert cfg.fetch_policy == "baseline" and cfg == LayerConfig().baseline()
    assert cfg.enabled_policies() == ("prefetch", "background")  # no heuristics, whatever the keys say
    assert (cfg.fetch_block_size, cfg.max_concurrency, cfg.coalesce_gap) == (50_000, 2, 0)
    assert config_from_toml({}).layer.fetch_policy == "default"
    assert config_from_toml({"noprefetch": True, "store": {"fetch_policy": "baseline"}}).layer.enabled_policies() == (
        "background",)
    with pytest.raises(ConfigError, match="store.fetch_policy"):
        config_from_toml({"store": {"fetch_policy": "go"}})


def test_a_read_fetches_the_blocks_holding_its_chunks_and_kept_blocks_serve_the_next(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files(), executables=("bin/tool",))
    size = built.result.size
    layer, src = open_layer(built, config=LayerConfig().baseline().with_policies(fetch_timeout=10.0))
    assert layer.reader.fetcher.max_concurrency == 2
    src.reset_counters()
    m3 = layer.toc.lookup("pkg/m3.py")
    assert layer.read(m3, 0, m3.size) == built.files["pkg/m3.py"]
    c = m3.chunks[0]
    assert src.log == [_blocks(c.blob_offset, c.blob_end, size)]  # whole blocks, no neighbours
    assert layer.drain(30)

    # Files stored in the blocks already fetched: no request (the Go store's blob cache).
    fetched_lo, fetched_len = src.log[0]
    inside = [e for e in layer.toc.files_in_blob_order()
              if e is not m3 and e.name in built.files and e.chunks[0].blob_offset >= fetched_lo
              and e.chunks[-1].blob_end <= fetched_lo + fetched_len]
    assert inside, "the test layer must have small files sharing a block"
    src.reset_counters()
    for e in inside:
        assert layer.read(e, 0, e.size) == built.files[e.name]
    assert src.calls == 0

    # An executable: only the blocks of the chunk read, not the rest of the program.
    tool = layer.toc.lookup("bin/tool")
    c1 = tool.chunks[1]
    src.reset_counters()
    assert layer.read(tool, c1.file_offset, 10) == built.files["bin/tool"][c1.file_offset:][:10]
    lo, length = _blocks(c1.blob_offset, c1.blob_end, size)
    assert len(src.log) == 1 and src.log[0][0] >= lo and sum(src.log[0]) == lo + length  # kept blocks skipped
    assert layer.stats()["executable_chunks"] == layer.stats()["neighbour_chunks"] == 0


def test_kept_blocks_make_chunks_without_a_request_after_a_restart(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    config = lazy_config().baseline()
    first, _ = open_layer(built, config=config, cache_=ChunkCache(tmp_path / "c"))
    names = ["pkg/m1.py", "pkg/m2.py", "pkg/m7.py"]
    for name in names:
        e = first.toc.lookup(name)
        first.read(e, 0, e.size)
    first.close()
    fresh = ChunkCache(tmp_path / "c")
    for name in names:  # the chunks are gone, the blocks stay
        for c in first.toc.lookup(name).chunks:
            fresh.discard(c.digest)
    second, src = open_layer(built, config=config, cache_=fresh)
    src.reset_counters()
    for name in names:
        e = second.toc.lookup(name)
        assert second.read(e, 0, e.size) == built.files[name]
    assert src.calls == 0


def test_prefetch_and_background_fetch_complete_in_the_baseline(tmp_path, open_layer):
    files = _files()
    built = build_layer(tmp_path / "l", files, prioritized=("pkg/m3.py", "bin/tool"))
    config = LayerConfig(fetch_timeout=10.0, prefetch_wait=True, background_quiet_period=0.0).baseline()
    layer, src = open_layer(built, config=config)
    assert layer.wait_background(60) and layer.background_state == "done"
    assert layer.stats()["fetch_errors"] == layer.stats()["verify_failures"] == 0
    src.reset_counters()
    for name, data in files.items():
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == data
    assert src.calls == 0
