"""Errors of the data path. Each becomes EIO at the FUSE boundary (mapped once, in fs/)."""
from __future__ import annotations


class LayerReadError(Exception):
    """Bytes of a layer could not be produced: network failure, timeout, digest mismatch, closed layer.

    Nothing partial or unverified is ever returned instead; the reader gets this and can retry.
    """
