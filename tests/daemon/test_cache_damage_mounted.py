"""A damaged disk cache under the mounted store: what a crash, a bad sector or another process
leaves in <root>/cache is never served; the right bytes are fetched again from the registry."""
from __future__ import annotations

import hashlib
import os
import time

from tests.fixtures.disk_damage import flip_bit

from .conftest import FAST_CONFIG, push_reference

FILES = ["files/hello.txt", "files/chunk-plus1.bin", "hard/h1", "files/size-4097"]


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_damaged_cache_entries_are_fetched_again_and_temp_files_swept(store_daemon_factory, private_registry, testdata):
    image = push_reference(testdata, private_registry.host, "tricky-esgz", repo="damage/tricky")
    desc = image.layers[0]
    want = {rel: image.expected["source_layers"][0]["overlay_diff"][rel]["sha256"] for rel in FILES}
    # Chunk damage: files read whole would otherwise be read from their passthrough copies,
    # which this damage does not touch (test_passthrough.py damages a copy).
    store = store_daemon_factory(FAST_CONFIG.replace("[store]\n", "[store]\npassthrough = false\n"))
    layer_dir = store.layer_dir(image.ref, desc["digest"])
    read_all = lambda: {rel: hashlib.sha256((layer_dir / "diff" / rel).read_bytes()).hexdigest() for rel in FILES}  # noqa: E731
    assert read_all() == want
    assert hashlib.sha256((layer_dir / "blob").read_bytes()).hexdigest() == desc["digest"].split(":")[1]
    assert store.stop() == 0

    # While the daemon is stopped: one bit flipped in every cached chunk and blob block, and the
    # temp files interrupted writes leave behind, in both caches.
    cache = store.root / "cache"
    # (Dot files are temp files of writes the exit cut short, e.g. a neighbour's: swept at start.)
    chunk_files = [p for p in (cache / "chunks").rglob("*") if p.is_file() and not p.name.startswith(".")]
    blob_dir = cache / "blobs" / desc["digest"][7:9] / desc["digest"][7:]
    block_files = [p for p in blob_dir.iterdir() if not p.name.startswith(("range-", "."))]
    assert chunk_files and block_files
    for path in chunk_files + block_files:
        flip_bit(path)
    temp_files = [chunk_files[0].parent / f".{chunk_files[0].name}.dead0000beef.abcdef.tmp",
                  blob_dir / ".1048576-0.dead0000beef.abcdef.tmp"]
    for path in temp_files:
        path.write_bytes(b"half written")

    store.start()
    os.stat(layer_dir / "diff")  # resolve (the TOC comes from the kept, re-verified bytes)
    blob_gets = private_registry.blob_get_count(desc["digest"])
    assert read_all() == want
    assert hashlib.sha256((layer_dir / "blob").read_bytes()).hexdigest() == desc["digest"].split(":")[1]
    assert private_registry.blob_get_count(desc["digest"]) > blob_gets  # the registry was asked again
    assert "discarding damaged entry" in store.log_tail(200_000)
    assert "discarding damaged block" in store.log_tail(200_000)
    wait_until(lambda: not any(p.exists() for p in temp_files))  # swept at start, beside serving
    assert store.stop() == 0  # the refetched bytes are written before the daemon exits

    # What is in the cache now is right: served with the registry gone.
    private_registry.stop()
    store.start()
    assert read_all() == want
    assert hashlib.sha256((layer_dir / "blob").read_bytes()).hexdigest() == desc["digest"].split(":")[1]
