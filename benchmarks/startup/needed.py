"""How many compressed bytes a lazy start cannot avoid: the chunks of the files the workload reads.

The issue's fetch target is "bytes fetched before first output at most 1.2x the
compressed size of the chunks the workload reads". For an eStargz variant that
size is, per file in the record, the compressed span of its chunks in the
topmost layer that has it, plus each layer's TOC and footer (a lazy pull must
read them). The blobs are read from the registry's storage directory (or an OCI
layout), so this costs no network.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def registry_blob_path(registry_data: Path, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob."""
    algorithm, hexdigest = digest.split(":", 1)
    return registry_data / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"


def oci_blob_path(layout: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexdigest


def needed_bytes(blob_path: Callable[[str], Path], manifest: dict, record: Path) -> int | None:
    """Compressed bytes of the recorded files' chunks plus TOCs; None if the layers cannot be parsed."""
    from stargz_store.formats.errors import FormatError
    from stargz_store.formats.estargz import read_toc

    paths = [json.loads(line)["path"].lstrip("/") for line in record.read_text().splitlines() if line.strip()]
    tocs = []
    total = 0
    for layer in manifest["layers"]:
        blob = blob_path(layer["digest"])
        size = blob.stat().st_size
        with open(blob, "rb") as f:
            def read_at(offset: int, length: int, f=f) -> bytes:
                f.seek(offset)
                return f.read(length)

            try:
                parsed = read_toc(read_at, size, expected_toc_digest=None)
            except (FormatError, ValueError) as e:
                log.warning("cannot parse the TOC of %s: %s", layer["digest"], e)
                return None
        tocs.append(parsed.toc)
        total += size - parsed.toc_offset  # TOC + footer
    for path in dict.fromkeys(paths):
        for toc in reversed(tocs):  # the upper layer hides the lower ones
            entry = toc.lookup(path)
            if entry is None:
                continue
            total += sum(c.blob_end - c.blob_offset for c in entry.chunks)
            break
    return total


def manifest_from_storage(registry_data: Path, repo: str, tag: str) -> dict:
    """A tag's manifest read straight from the registry's filesystem storage."""
    link = registry_data / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag / "current/link"
    return json.loads(registry_blob_path(registry_data, link.read_text().strip()).read_bytes())
