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
import threading
from typing import Any, Iterator, Mapping, Protocol, Sequence

from ..formats.layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_UNCOMPRESSED_SIZE,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
)
from ..formats.toc import Toc


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


class LayerOfImage(Protocol):
    """What `LayerInfos` needs of a layer slot: its descriptor and the config's DiffID for it."""

    blob_digest: str
    descriptor: Mapping[str, Any]
    diff_id: str | None


class ParsedLayer(Protocol):
    """What `LayerInfos` needs of a parsed layer (`formats.layer_toc.ParsedToc`)."""

    toc_digest: str
    compression: int

    @property
    def toc(self) -> Toc: ...


class LayerInfos(Mapping[str, bytes]):
    """The `info` JSON of a layer under both its keys (blob and TOC digest). The keys are known at
    once (lookups check them); the JSON is built at the first read of an `info` file, because its
    uid/gid sets take a pass over every TOC entry, which a first lookup should not wait for."""

    def __init__(self, slot: LayerOfImage, parsed: ParsedLayer) -> None:
        self._slot = slot
        self._parsed = parsed
        self._keys = (slot.blob_digest, parsed.toc_digest)
        self._built: dict[str, bytes] | None = None
        self._lock = threading.Lock()

    def _build(self) -> dict[str, bytes]:
        with self._lock:
            if self._built is None:
                slot, parsed = self._slot, self._parsed
                assert slot.diff_id is not None
                uids, gids = parsed.toc.uids(), parsed.toc.gids()
                self._built = {
                    slot.blob_digest: info_for_blob_key(slot.descriptor, slot.diff_id, parsed.compression, uids, gids),
                    parsed.toc_digest: info_for_toc_key(
                        parsed.toc_digest, slot.descriptor, slot.diff_id, parsed.compression, uids, gids
                    ),
                }
            return self._built

    def __getitem__(self, key: str) -> bytes:
        if key not in self._keys:
            raise KeyError(key)
        return self._build()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(self._keys))

    def __len__(self) -> int:
        return len(set(self._keys))
