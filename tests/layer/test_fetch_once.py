"""No byte of a blob is fetched twice (issue 15, point 4).

A layer read on demand (with the production policies: neighbours, executables), prefetched and
then fetched in the background, all at once from several threads: once the background fetch is
complete, the source has sent every byte of the blob exactly once. What the bytes are: the TOC
at open (footer + TOC, two requests: the TOC is larger than the first tail read), the prefetch
from offset 0 (the tar headers before the first file come with it), and each chunk's compressed
extent once (they tile the data area of an eStargz blob whose chunks are all distinct).

Before: requests merged across gaps of up to 64 KiB fetched the chunks in those gaps along with
them and dropped their bytes, and a prefetch or background request spanned chunks that were
cached or in flight elsewhere; the background fetch then fetched them again (about 1 MB of a
64 MB layer in the podman lanes).
"""
from __future__ import annotations

import random
import threading

from stargz_store.layer import LayerConfig
from tests.e2e.recording_proxy import overlapping_pairs

from .helpers import build_layer, build_zstd_layer


def _files(seed: int) -> dict[str, bytes]:
    """Every chunk distinct: random bytes, or text whose every line is numbered."""
    rnd = random.Random(seed)
    files = {}
    for i in range(600):
        size = rnd.choice([300, 2_000, 9_000, 30_000, 90_000, 200_000])
        if rnd.random() < 0.5:
            data = rnd.randbytes(size)
        else:
            data = b"".join(b"%d.%d some text to compress\n" % (i, n) for n in range(size // 24))
        files[f"dir{i // 40}/f{i}.{'so' if i % 7 == 0 else 'txt'}"] = data
    return files


def _ranges(log: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(off, off + n - 1) for off, n in log if n]


def _read_while_fetching(layer, names: list[str]) -> None:
    """Reads from four threads while the prefetch streams in and the background fetch runs."""
    errors: list[BaseException] = []

    def reader(part: list[str]) -> None:
        try:
            for name in part:
                entry = layer.toc.lookup(name)
                layer.read(entry, 0, 5000)
                if entry.size > 100_000:
                    layer.read(entry, entry.size - 70_000, 4096)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    layer.start_background_fetch()
    for t in threads:
        t.join(120)
    assert not errors


def test_bytes_fetched_equal_the_blob_size_after_a_complete_background_fetch(tmp_path, open_layer):
    files = _files(1)
    executables = tuple(n for n in files if n.endswith(".so"))
    built = build_layer(tmp_path / "l", files, prioritized=tuple(sorted(files)[:40]), executables=executables)
    config = LayerConfig(fetch_timeout=30.0, no_background_fetch=True, background_quiet_period=0.0,
                         background_batch_size=300_000)
    assert config.policy_enabled("neighbour") and config.policy_enabled("executable")  # production values
    layer, src = open_layer(built, config=config)
    size = built.result.size
    assert layer.parsed.toc_offset < size - config.tail_size  # the tail read holds no file data
    _read_while_fetching(layer, random.Random(2).sample(sorted(files), 150))
    assert layer.wait_background(120) and layer.background_state == "done"
    assert layer.drain(30)

    assert overlapping_pairs(_ranges(src.log)) == []
    assert src.bytes_read == size, f"{src.bytes_read} bytes fetched for a {size}-byte blob"
    stats = layer.stats()
    assert stats["prefetch_bytes"] > 0 and stats["background_bytes"] > 0 and stats["neighbour_chunks"] > 0
    for name, data in files.items():  # and all of it is there, verified
        entry = layer.toc.lookup(name)
        assert layer.read(entry, 0, entry.size) == data
    assert src.bytes_read == size


def test_zstd_chunked_is_fetched_once_too(tmp_path, open_layer):
    """Between zstd:chunked frames lie tar headers no chunk covers: they are fetched at most once
    (inside a merged request), so what is fetched is at most the blob, and no range twice."""
    files = _files(3)
    built = build_zstd_layer(tmp_path / "z", files)
    config = LayerConfig(fetch_timeout=30.0, no_background_fetch=True, background_quiet_period=0.0,
                         background_batch_size=300_000)
    layer, src = open_layer(built, config=config)
    _read_while_fetching(layer, random.Random(4).sample(sorted(files), 150))
    assert layer.wait_background(120) and layer.background_state == "done"
    assert layer.drain(30)
    assert overlapping_pairs(_ranges(src.log)) == []
    assert src.bytes_read <= built.result.size
