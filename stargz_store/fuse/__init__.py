"""A FUSE server of our own: the kernel protocol on `/dev/fuse`, no libfuse (see `session`)."""
from .mount import MountError, MountSpec, is_dead_mount, mount, unmount
from .session import ConnectionState, Context, DirEntry, FuseError, OpenReply, Operations, Session, SessionOptions
from .journal import OpenFilesJournal
from .session import passthrough_permitted

__all__ = ["ConnectionState", "Context", "DirEntry", "FuseError", "MountError", "MountSpec", "OpenFilesJournal", "OpenReply", "Operations",
           "Session", "SessionOptions", "is_dead_mount", "mount", "passthrough_permitted", "unmount"]
