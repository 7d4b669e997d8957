"""Building a TOC tree lets the decoder's records go while the tree's last objects are made.

The records msgspec decodes (a struct and its strings per entry, ~600 bytes) used to live until
the whole tree was built, so a resolve's peak was the records plus the whole tree. The builder
now empties the record list once the first pass has read it and drops each file's record once
its chunks are built; what the tree allocates after that fills the memory the records left, and
the peak over what the tree keeps falls (python image: serving-process peak while resolving its
44,000-entry layer 132 -> 119-122 MB, sampled from /proc during `python -m benchmarks startup`). Measured with tracemalloc
(Python's own allocations, deterministic), not RSS.
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
    # Before: records and the whole tree at once, 1.2x what the tree keeps on top of it; now 0.88x.
    assert transient < kept, (transient >> 10, kept >> 10)
