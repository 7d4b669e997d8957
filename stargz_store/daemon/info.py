"""The ALS `info` file: the containers/storage layer JSON, in the shape each lookup key needs.

additional-layer-store.md §6.2. The key decides the protocol:
- the blob digest (Podman <= 5.0) gets `compressed-diff-digest` and the config's DiffID as
  `diff-digest` (mandatory there: an empty one panics Podman 4);
- the TOC digest (Podman 5.1+) gets `toc-digest` equal to the key and the DiffID only as
  `flags.expected-layer-diffid` (no `compressed-diff-digest`/`diff-digest`, see §4.1).
Both carry `compressed-size`, `diff-size`, a truthful `compression` (2 gzip, 4 zstd) and the
TOC's `uidset`/`gidset`. The file is the JSON followed by a newline.

`diff-size` comes from the `io.containers.estargz.uncompressed-size` annotation. Without it the
new key says -1 ("unknown", as stargz-store v0.16 does for Podman 5), but the old key says 0, as
stargz-store v0.15 did: Podman 4.3 refuses to run an image with a negative layer size ("size for
layer ... is unknown, failing getSize()"; seen with tests/data/podman-zstdchunked), and the exact
tar size cannot be derived from a TOC.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from ..formats.layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_UNCOMPRESSED_SIZE,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
)


def toc_digest_annotation(descriptor: Mapping[str, Any]) -> str | None:
    """The TOC digest containers/image would use as the key (`GetTOCDigest`), if the layer has one."""
    annotations = descriptor.get("annotations") or {}
    return annotations.get(ANNOTATION_TOC_DIGEST) or annotations.get(ANNOTATION_ZSTD_MANIFEST_CHECKSUM) or None


def diff_size(descriptor: Mapping[str, Any], *, unknown: int = -1) -> int:
    """Uncompressed size from the eStargz annotation; `unknown` when absent or malformed."""
    raw = (descriptor.get("annotations") or {}).get(ANNOTATION_UNCOMPRESSED_SIZE)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return unknown
    return value if value >= 0 else unknown


def _common(
    descriptor: Mapping[str, Any], compression: int, uids: Sequence[int], gids: Sequence[int], *, unknown_size: int
) -> dict:
    return {
        "compressed-size": int(descriptor["size"]),
        "diff-size": diff_size(descriptor, unknown=unknown_size),
        "compression": compression,
        "uidset": list(uids),
        "gidset": list(gids),
    }


def info_for_blob_key(
    descriptor: Mapping[str, Any], diff_id: str, compression: int, uids: Sequence[int], gids: Sequence[int]
) -> bytes:
    """`info` for a lookup by compressed blob digest (old protocol)."""
    doc = {
        "compressed-diff-digest": descriptor["digest"],
        **_common(descriptor, compression, uids, gids, unknown_size=0),
        "diff-digest": diff_id,
    }
    return encode(doc)


def info_for_toc_key(
    toc_digest: str,
    descriptor: Mapping[str, Any],
    diff_id: str,
    compression: int,
    uids: Sequence[int],
    gids: Sequence[int],
) -> bytes:
    """`info` for a lookup by TOC digest (new protocol)."""
    doc = {
        "toc-digest": toc_digest,
        **_common(descriptor, compression, uids, gids, unknown_size=-1),
        "flags": {"expected-layer-diffid": diff_id},
    }
    return encode(doc)


def encode(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()
