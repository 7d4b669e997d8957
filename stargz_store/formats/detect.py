"""Which lazy format a layer is, from its descriptor, and its verified TOC.

The manifest is trusted (fetched by digest or verified), so its layer descriptor decides: the
media type and annotations pick the reader, and the annotation (or the podman 5.1+ lookup key)
that authenticates the TOC. A layer whose TOC nothing trusted can authenticate is refused without
any read: serving an unverified TOC would let the registry choose the files' contents.

Rules (containers/storage `GetTOCDigest`, estargz.md §9, zstd-chunked.md §2.5, §3):
- zstd media type or any zstd:chunked annotation -> `zstd_chunked.read_toc_any` (both the
  containers/storage layout and stargz-snapshotter's zstd flavour);
- otherwise (gzip) -> eStargz, verified against `containerd.io/snapshot/stargz/toc.digest`, or
  against the lookup key when that is a TOC digest.
- `key_digest` equal to the blob digest is the old (compressed digest) lookup key and adds no
  check; any other value is a TOC digest the TOC must match.
"""
from __future__ import annotations

from typing import Mapping

from .errors import DigestMismatchError, InvalidTocError, NotLazyFormatError
from .layer_toc import (
    ANNOTATION_TOC_DIGEST,
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_OLD_MANIFEST_POSITION,
    ParsedToc,
    ReadAt,
)
from .toc import DEFAULT_LIMITS, TocLimits

_ZSTD_ANNOTATIONS = (
    ANNOTATION_ZSTD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_MANIFEST_POSITION,
    ANNOTATION_ZSTD_OLD_MANIFEST_CHECKSUM,
    ANNOTATION_ZSTD_OLD_MANIFEST_POSITION,
)


class UnverifiableLayerError(NotLazyFormatError):
    """The descriptor carries no TOC digest (and the lookup key is not one): the layer may be
    eStargz, but nothing trusted vouches for its TOC, so it is pulled normally."""


def is_zstd_layer(descriptor: Mapping) -> bool:
    annotations = descriptor.get("annotations") or {}
    media_type = str(descriptor.get("mediaType") or "")
    return "zstd" in media_type or any(k in annotations for k in _ZSTD_ANNOTATIONS)


def read_layer_toc(
    read_at: ReadAt,
    blob_size: int,
    descriptor: Mapping,
    *,
    key_digest: str | None = None,
    max_toc_size: int = 150 << 20,
    tail_size: int = 512 << 10,
    limits: TocLimits = DEFAULT_LIMITS,
) -> ParsedToc:
    """The verified TOC of the layer `descriptor` describes; `read_at` reads its blob.

    Raises `NotLazyFormatError` for plain layers (at most one tail read), other `FormatError`s
    for broken or mismatching ones. `max_toc_size` caps the TOC's bytes, compressed and inflated
    (checked while inflating); `limits` its entries and depth.
    """
    annotations: Mapping[str, str] = descriptor.get("annotations") or {}
    blob_digest = descriptor.get("digest")
    toc_key = key_digest if key_digest and key_digest != blob_digest else None
    if annotations.get(ANNOTATION_TOC_DIGEST) and annotations.get(ANNOTATION_ZSTD_MANIFEST_CHECKSUM):
        raise InvalidTocError(
            f"layer {blob_digest} has both an eStargz and a zstd:chunked TOC digest annotation"
        )
    if is_zstd_layer(descriptor):
        from . import zstd_chunked  # imported on use: the zstd module pulls in the zstandard C extension

        return zstd_chunked.read_toc_any(
            read_at,
            blob_size,
            annotations,
            key_digest=toc_key,
            max_toc_size=max_toc_size,
            tail_size=tail_size,
            limits=limits,
        )
    from . import estargz

    expected = annotations.get(ANNOTATION_TOC_DIGEST) or None
    if toc_key is not None:
        if expected is not None and expected != toc_key:
            raise DigestMismatchError(f"layer {blob_digest} lookup key", expected, toc_key)
        expected = toc_key
    if expected is None:
        raise UnverifiableLayerError(
            f"layer {blob_digest} has no {ANNOTATION_TOC_DIGEST} annotation: not served lazily"
        )
    return estargz.read_toc(
        read_at, blob_size, expected_toc_digest=expected, max_toc_size=max_toc_size, tail_size=tail_size, limits=limits
    )
