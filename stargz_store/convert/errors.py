"""Typed errors of the converter; the CLI turns each into one line on stderr and a non-zero exit.

Registry failures keep their own types (`stargz_store.registry.errors`) and format failures theirs
(`stargz_store.formats.errors`); these cover what only the converter knows about.
"""
from __future__ import annotations


class ConvertError(Exception):
    """Base class of converter failures."""


class LocationSyntaxError(ConvertError, ValueError):
    """SRC or DST is neither `oci:DIR[:TAG]` nor `docker://HOST[:PORT]/REPO:TAG`."""


class ImageNotFoundError(ConvertError):
    """The source image (layout, tag, or platform) does not exist."""


class UnsupportedImageError(ConvertError):
    """The source is an image we cannot convert (Docker schema 1, an unknown layer media type, ...)."""


class RecordFileError(ConvertError):
    """The `--record-in` file is not a sequence of JSON objects with a string `path`."""


class BlobDigestMismatchError(ConvertError):
    """A source blob does not hash to the digest its manifest names: the source is corrupt."""
