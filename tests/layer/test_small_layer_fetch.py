"""The first miss in a small layer (a busybox or alpine base) fetches the whole layer: the wanted
bytes and what follows them in one streamed request, what precedes them in a second one alongside,
so the reader still waits for its own bytes only and every later read of the layer is a hit."""
from __future__ import annotations

import random
import threading

from stargz_store.cache import ChunkCache
from stargz_store.layer.sources import FileBlobSource

from .conftest import lazy_config
from .helpers import build_layer


def _files() -> dict[str, bytes]:
    rnd = random.Random(5)
    return {
        "bin/busybox": rnd.randbytes(150_000),
        "etc/group": b"root:x:0:\n",
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
        "lib/libc.so": rnd.randbytes(60_000),
        "usr/share/doc.txt": b"docs\n" * 500,
    }


class HoldingSource(FileBlobSource):
    """Holds every request that starts before `hold_below` until `gate` is set."""

    def __init__(self, path, hold_below: int) -> None:
        super().__init__(path)
        self.hold_below = hold_below
        self.gate = threading.Event()

    def _hold(self, offset: int) -> None:
        if offset < self.hold_below:
            assert self.gate.wait(60), "test never opened the gate"

    def stream_range(self, offset, length, sink):
        self._hold(offset)
        super().stream_range(offset, length, sink)

    def read_ranges(self, ranges):
        self._hold(min(o for o, _ in ranges))
        return super().read_ranges(ranges)


def test_first_miss_fetches_the_whole_small_layer_wanted_bytes_first(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    probe, _ = open_layer(built)
    passwd = probe.toc.lookup("etc/passwd")
    src = HoldingSource(built.path, hold_below=passwd.chunks[0].blob_offset)
    layer, _ = open_layer(built, source=src, config=lazy_config(small_layer_fetch_size=1 << 20))
    passwd = layer.toc.lookup("etc/passwd")
    # What is stored before /etc/passwd (bin/busybox) is held back, yet passwd reads.
    assert layer.read(passwd, 0, passwd.size) == built.files["etc/passwd"]
    src.gate.set()
    assert layer.drain(30)
    first_data = min(e.chunks[0].blob_offset for e in layer.toc.files_in_blob_order())
    assert sorted(off for off, _ in src.log) == [first_data, passwd.chunks[0].blob_offset]
    assert sum(n for _, n in src.log) == layer.parsed.toc_offset - first_data  # each byte once
    calls = src.calls
    for name, data in built.files.items():
        e = layer.toc.lookup(name)
        assert layer.read(e, 0, e.size) == data
    assert src.calls == calls  # everything came with the first miss
    assert layer.stats()["small_layer_chunks"] >= 4


def test_only_layers_within_the_limit_and_only_once(tmp_path, open_layer):
    built = build_layer(tmp_path / "l", _files())
    probe, _ = open_layer(built)
    data_size = probe.parsed.toc_offset
    big, src = open_layer(built, config=lazy_config(small_layer_fetch_size=data_size - 1))
    src.reset_counters()
    group = big.toc.lookup("etc/group")
    big.read(group, 0, group.size)
    assert big.drain(30)  # a request started alongside the read (as a small layer's is) is in the log too
    assert src.log == [(group.chunks[0].blob_offset, group.chunks[0].blob_end - group.chunks[0].blob_offset)]

    small, src = open_layer(built, config=lazy_config(small_layer_fetch_size=data_size),
                            cache_=ChunkCache(tmp_path / "other-cache"))
    small.read(small.toc.lookup("etc/group"), 0, 10)
    assert small.drain(30)
    src.reset_counters()
    doc = small.toc.lookup("usr/share/doc.txt")
    assert small.read(doc, 0, doc.size) == built.files["usr/share/doc.txt"]
    assert src.calls == 0
