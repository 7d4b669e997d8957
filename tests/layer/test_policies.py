"""Each fetch policy alone, at its production value, on one layer that gives every policy work.

One table of defaults (`LayerConfig()`) is what the daemon runs and what these tests start from;
`with_policies(name)` keeps only that policy on. The same reads then move that policy's counter
and no other policy's: the policies are separate objects, switched separately.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from stargz_store.cache import ChunkCache
from stargz_store.daemon.config import config_from_toml
from stargz_store.layer import LayerConfig
from stargz_store.layer.config import LAYER_POLICIES, POLICIES
from stargz_store.layer.elf import MULTIARCH, dynamic_info

from .helpers import BuiltLayer, WatchedScheduler, build_layer, wait_until

PROGRAM = Path(shutil.which("ls") or "/bin/ls").resolve()  # any dynamically linked system program

# The counter each policy moves (Layer.stats()).
COUNTERS = {
    "neighbour": "neighbour_chunks",
    "executable": "executable_chunks",
    "small_layer": "small_layer_chunks",
    "sequential_readahead": "readahead_chunks",
    "library_readahead": "ahead_chunks",
    "import_readahead": "import_chunks",
    "reads_hold_background": "reads_holding_background",
    "prefetch": "prefetch_bytes",
    "background": "background_bytes",
    "reads_overtake_prefetch": "prefetch_pieces",  # a region of more than two pieces (test_prefetch_pieces.py)
    "start": "start_chunks",  # image-wide (tests/layer/test_start_fetch.py): no layer alone runs it
}
# Production leaves sequential readahead off (0 = off); to drive it alone, give it a window.
VALUES = {"sequential_readahead": {"readahead_size": 256 << 10}}


def test_the_production_table_is_the_daemons():
    production = LayerConfig()
    assert config_from_toml({}).layer == production
    assert production.enabled_policies() == (
        "neighbour", "executable", "small_layer", "library_readahead", "import_readahead", "reads_hold_background",
        "prefetch", "background", "reads_overtake_prefetch", "start")
    assert set(COUNTERS) == set(POLICIES)
    off = production.with_policies()
    assert off.enabled_policies() == ()
    assert (off.neighbour_fetch_size, off.executable_fetch_limit, off.small_layer_fetch_size, off.readahead_size) == (0,) * 4


@pytest.fixture(scope="module")
def busy_layer(tmp_path_factory) -> BuiltLayer:
    """Small files side by side (a module importing its sibling), executables of several chunks,
    a program and the libc it loads, a file read sequentially, a prioritized file: under 2 MiB,
    so a small layer."""
    info = dynamic_info(lambda offset, size: PROGRAM.read_bytes()[offset : offset + size])
    assert info is not None and "libc.so.6" in info.needed
    rnd = random.Random(9)
    text = lambda n, tag: b"".join(b"%s %d\n" % (tag, i) for i in range(n))  # noqa: E731
    files = {
        "etc/motd": b"welcome\n",
        "pkg/a.py": text(200, b"a"), "pkg/b.py": b"from . import c\n" + text(200, b"b"), "pkg/c.py": text(200, b"c"),
        "bin/tool": rnd.randbytes(300_000),
        "data/seq": rnd.randbytes(400_000),
        "usr/bin/prog": PROGRAM.read_bytes(),
        f"usr/lib/{MULTIARCH[info.machine]}/libc.so.6": rnd.randbytes(120_000),
    }
    d = tmp_path_factory.mktemp("busy")
    built = build_layer(d / "l", files, prioritized=("etc/motd",), executables=("bin/tool", "usr/bin/prog"))
    assert built.result.size < 2 << 20
    return built


def _workload(layer, files: dict[str, bytes]) -> None:
    """The same reads for every policy: a small file, the middle of an executable, a file read
    sequentially, the start of a program."""
    b = layer.toc.lookup("pkg/b.py")
    assert layer.read(b, 0, b.size) == files["pkg/b.py"]
    tool = layer.toc.lookup("bin/tool")
    c1 = tool.chunks[1]
    assert layer.read(tool, c1.file_offset, 100) == files["bin/tool"][c1.file_offset:][:100]
    seq = layer.toc.lookup("data/seq")
    assert layer.read(seq, 0, 4096) + layer.read(seq, 4096, 4096) == files["data/seq"][:8192]
    prog = layer.toc.lookup("usr/bin/prog")
    assert layer.read(prog, 0, 4096) == files["usr/bin/prog"][:4096]


@pytest.mark.parametrize("policy", LAYER_POLICIES)
def test_each_policy_alone_moves_its_counter_and_no_other(policy, busy_layer, open_layer):
    config = LayerConfig().with_policies(policy, fetch_timeout=30.0, **VALUES.get(policy, {}))
    assert config.enabled_policies() == (policy,)
    layer, _ = open_layer(busy_layer, config=config)
    _workload(layer, busy_layer.files)
    counter = COUNTERS[policy]
    if policy == "background":
        assert layer.wait_background(60) and layer.background_state == "done"
    elif policy in ("library_readahead", "import_readahead"):  # looked up on a readahead worker
        wait_until(lambda: layer.stats()[counter] > 0)
    assert layer.drain(30)
    stats = layer.stats()
    assert stats[counter] > 0, stats
    assert {name: stats[c] for name, c in COUNTERS.items() if name != policy} == {
        name: 0 for name in COUNTERS if name != policy}, stats


def test_with_every_policy_off_only_what_is_read_is_fetched(busy_layer, open_layer):
    layer, src = open_layer(busy_layer, config=LayerConfig().with_policies(fetch_timeout=30.0))
    src.reset_counters()
    _workload(layer, busy_layer.files)
    assert layer.drain(30)
    assert all(layer.stats()[c] == 0 for c in COUNTERS.values())
    needed = set()
    for name, offset, size in (("pkg/b.py", 0, 1 << 30), ("bin/tool", None, 100), ("data/seq", 0, 8192),
                               ("usr/bin/prog", 0, 4096)):
        entry = layer.toc.lookup(name)
        start = entry.chunks[1].file_offset if offset is None else offset
        needed |= {(c.blob_offset, c.blob_end) for c in entry.chunks_for_range(start, size)}
    assert src.bytes_read == sum(end - start for start, end in needed)


def test_reads_from_the_cache_hold_background_fetch_back(busy_layer, open_layer, tmp_path):
    """A container reading prefetched files (no fetch at all) keeps background fetch off the CPU
    until it stops reading for the quiet period; the baseline (Go store) counts fetches only."""
    quiet = 1.5
    for policies, held in ((("reads_hold_background", "prefetch", "background"), True),
                           (("prefetch", "background"), False)):
        scheduler = WatchedScheduler(quiet_period=quiet)
        layer, _ = open_layer(busy_layer, config=LayerConfig().with_policies(*policies, fetch_timeout=30.0),
                              scheduler=scheduler, cache_=ChunkCache(tmp_path / str(held)))
        motd = layer.toc.lookup("etc/motd")
        wait_until(lambda: layer.reader.cache.contains(motd.chunks[0].digest))  # the prefetch landed
        assert layer.drain(30)
        scheduler.refused.clear()
        wait_until(scheduler.refused.is_set)  # background fetch is waiting for its turn
        began = time.monotonic()
        while time.monotonic() - began < 2.5 * quiet and layer.stats()["background_bytes"] == 0:
            assert layer.read(motd, 0, motd.size) == busy_layer.files["etc/motd"]  # a cache hit
            time.sleep(0.05)  # the container's pace between reads, not synchronisation
        assert (layer.stats()["background_bytes"] == 0) is held, layer.stats()
        assert layer.wait_background(60) and layer.background_state == "done"  # reads stopped: it runs
