"""Building a TOC tree never holds the decoder's records of a whole layer at once.

The records msgspec decodes (a struct and its strings per entry, ~600 bytes) used to live until
the whole tree was built, so a resolve's peak was the records plus the whole tree, and the arenas
they filled stayed resident, part empty, between the tree's objects. Then (rss6) the builder let
each file's record go as its chunks were built (python image: serving-process peak while
resolving its 44,000-entry layer 132 -> 119-122 MB). Now the JSON is decoded a batch of entries at
a time and a file keeps only a small tuple of its pieces until the second pass, so the records
alive at once are one batch's (44,000 entries: RSS after the build 98 -> 86 MB, peak 113 -> 100 MB;
see benchmarks/startup/README.md, round 6). Measured with tracemalloc (Python's own allocations, deterministic), not RSS.
"""
from __future__ import annotations

import gc
import json
import tracemalloc

from stargz_store.formats.toc import parse_toc_document


def _site_packages_toc(files: int) -> tuple[bytes, int]:
    """A TOC shaped like an interpreter's library layer: directories of 20 small modules each."""
    entries: list[dict] = []
    offset = 0
    for i in range(files):
        if i % 20 == 0:
            entries.append({"name": f"usr/lib/python3/pkg{i // 20:05d}/", "type": "dir", "mode": 0o755,
                            "modtime": "2024-01-01T00:00:00Z"})
        digest = f"sha256:{i:064x}"
        entries.append({"name": f"usr/lib/python3/pkg{i // 20:05d}/module_{i:06d}.py", "type": "reg",
                        "mode": 0o644, "size": 1000 + i % 7, "offset": offset, "digest": digest,
                        "chunkDigest": digest, "modtime": "2024-01-01T00:00:00Z"})
        offset += 600
    return json.dumps({"version": 1, "entries": entries}).encode(), offset


def test_records_are_let_go_while_the_tree_is_built():
    toc_json, data_end = _site_packages_toc(30_000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        toc = parse_toc_document(toc_json, data_end=data_end)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(toc) == 31_504  # the files, their 1,500 directories and the 4 implicit ones up to the root
    kept -= before
    transient = peak - before - kept
    # Records of the whole layer at once: 1.2x what the tree keeps on top of it; letting each go as
    # its file's chunks were built: 0.88x; one batch of records at a time: 0.35x.
    assert transient < kept / 2, (transient >> 10, kept >> 10)
