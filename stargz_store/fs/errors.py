"""Typed errors of the filesystem model.

The model raises these; the FUSE adapter maps them to errno in one place (`fuse_adapter.ERRNO`).
Each says which podman-visible answer it stands for, because containers/storage treats ENOENT/EIO
at lookup as "fall back to a normal pull" but an unreadable `info` as a fatal pull error.
"""
from __future__ import annotations


class FsError(Exception):
    """Base class of every error the filesystem model raises."""


class EntryNotFound(FsError):
    """No such name (ENOENT). Also the deliberate answer for layers we decline to serve."""


class InvalidName(FsError):
    """A name that can never be valid here: bad base64, bad reference, bad digest (EINVAL)."""


class PermissionDenied(FsError):
    """The caller may not make the store do this: only root may resolve an image that is not
    resolved yet or send notifications (EACCES)."""


class LayerUnavailable(FsError):
    """The data exists but cannot be fetched or verified right now (EIO)."""


class ReadOnly(FsError):
    """A write other than the `use`/`rmdir` notifications (EROFS)."""


class NoSuchAttribute(FsError):
    """getxattr of a name the node does not have (ENODATA)."""


class NotADirectory(FsError):
    """A path walks through a non-directory (ENOTDIR)."""


class IsADirectory(FsError):
    """read/open-for-data of a directory (EISDIR)."""


class NotASymlink(FsError):
    """readlink of something that is not a symlink (EINVAL)."""


class BadHandle(FsError):
    """A file handle that was never issued or was already released (EBADF)."""


class StaleNode(FsError):
    """A node id the store does not know (ESTALE): never given out, or its layer was forgotten."""
