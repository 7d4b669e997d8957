"""Rootless mode: the store run by an unprivileged user, for that user's rootless Podman.

What differs from a root store, and why (README "Rootless Podman"):
- per-user defaults (`UserDefaults`): data root `$XDG_DATA_HOME/stargz-store` (0700), the mount at
  `<root>/store`, the config `$XDG_CONFIG_HOME/stargz-store/config.toml` (missing = defaults),
  the control socket `<root>/store.sock`;
- the mount is made by `fusermount3` (setuid) without `allow_other` (which needs
  `user_allow_other` in /etc/fuse.conf): only the user's own processes reach it, and rootless
  Podman, its containers' overlay mounts included, acts as the user on the host;
- owners are shown as Podman's user namespace needs them (`fs.idmap`): the user's
  `/etc/subuid`/`/etc/subgid` ranges after the user's own id, as Podman builds its namespace;
- the user's own uid may make the store resolve and send notifications (it is Podman's root);
- visibility: Podman keeps its user and mount namespaces in a "pause" process; a mount made
  after it started reaches it only if it sits under a shared mount (systemd makes `/` shared;
  containers and some init systems do not). `visibility_warning` says so before mounting.
"""
from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..fs.idmap import IdMap, IdMapError, IdRange, Ownership

log = logging.getLogger("stargz_store.daemon")

APP = "stargz-store"
SUBUID_FILE = "/etc/subuid"
SUBGID_FILE = "/etc/subgid"
STORE_DIR = "store"


@dataclass(frozen=True)
class UserDefaults:
    """Where a rootless store keeps things when no flag says otherwise."""

    root: Path
    mountpoint: Path
    config: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, home: str | None = None) -> UserDefaults:
        env = os.environ if env is None else env
        home = home or env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
        data = _xdg(env, "XDG_DATA_HOME", Path(home) / ".local" / "share")
        config = _xdg(env, "XDG_CONFIG_HOME", Path(home) / ".config")
        root = data / APP
        return cls(root=root, mountpoint=root / STORE_DIR, config=config / APP / "config.toml")


def _xdg(env: Mapping[str, str], name: str, default: Path) -> Path:
    """An XDG base directory: the variable if it is an absolute path (the spec ignores others)."""
    value = env.get(name, "")
    return Path(value) if value.startswith("/") else default


def in_user_namespace() -> bool:
    """True inside a user namespace other than the initial one (`podman unshare`, Podman's own
    helpers): uid 0 there is a user on the host."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = f.read().split()
    except OSError:
        return False
    return lines != ["0", "0", "4294967295"]


def is_rootless() -> bool:
    """Whether the store runs as an unprivileged user. Root of a user namespace (`podman unshare
    stargz-store`) is not: there the kernel maps owners itself, and the mount is its own."""
    return os.geteuid() != 0


def subordinate_ranges(path: str, user: str, uid: int) -> list[tuple[int, int]]:
    """The user's `(start, count)` ranges in a subuid/subgid file (by name or by number), in
    file order, as newuidmap/Podman use them. A missing file has none."""
    ranges = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if count > 0:
            ranges.append((start, count))
    return ranges


def namespace_map(own_id: int, ranges: list[tuple[int, int]]) -> IdMap:
    """Rootless Podman's default namespace: 0 is `own_id`, then each subordinate range in order."""
    parts = [IdRange(0, own_id, 1)]
    next_id = 1
    for start, count in ranges:
        parts.append(IdRange(next_id, start, count))
        next_id += count
    return IdMap(parts)


def default_ownership(uid: int | None = None, gid: int | None = None, subuid: str = SUBUID_FILE,
                      subgid: str = SUBGID_FILE) -> Ownership:
    """The user's Podman namespace from /etc/subuid and /etc/subgid (a user without ranges maps
    0 only: layers owned by anyone else are refused, as Podman would refuse to pull them)."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    uids = namespace_map(uid, subordinate_ranges(subuid, user, uid))
    gids = namespace_map(gid, subordinate_ranges(subgid, user, uid))
    if uids.size == 1 or gids.size == 1:
        log.warning("user %s has no subordinate %s ranges (%s): only files owned by root in the image can be "
                    "served", user, "uid" if uids.size == 1 else "gid", subuid if uids.size == 1 else subgid)
    return Ownership(store_uid=uid, uids=uids, gids=gids)


def ownership_from_flags(uidmap: str | None, gidmap: str | None, *, rootless: bool) -> Ownership | None:
    """`--uidmap/--gidmap` over the defaults (rootless: the user's namespace; root: none).
    Raises `IdMapError` for a bad map. The store trusts the host id of container uid 0."""
    if not rootless and uidmap is None and gidmap is None:
        return None
    base = default_ownership() if rootless else Ownership(store_uid=0)
    uids = IdMap.parse(uidmap) if uidmap is not None else base.uids
    gids = IdMap.parse(gidmap) if gidmap is not None else base.gids
    store_uid = uids.to_host(0) if uids is not None else base.store_uid
    if store_uid is None:
        raise IdMapError("the uid map must map container uid 0 (Podman's root) to a host uid")
    return Ownership(store_uid=store_uid, uids=uids, gids=gids)


# -- visibility to Podman's pause process ------------------------------------------------------

def _mountinfo(pid: str = "self") -> list[tuple[str, list[str]]]:
    """(mount point, optional fields) of each mount of `pid`'s mount namespace."""
    mounts = []
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index(b"-")
            except ValueError:
                continue
            point = fields[4].decode("unicode_escape", "replace")
            mounts.append((point, [o.decode() for o in fields[6:sep]]))
    return mounts


def enclosing_mount_is_shared(path: Path) -> bool:
    """Whether the mount `path` lies on propagates new mounts to its peers and slaves (`shared:N`)."""
    target = os.path.realpath(path)
    best, shared = "", False
    for point, optional in _mountinfo():
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, shared = point, any(o.startswith("shared:") for o in optional)
    return shared


def pause_pid(env: Mapping[str, str] | None = None) -> int | None:
    """The pid of the user's Podman pause process, if one is running."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    try:
        pid = int(Path(runtime, "libpod", "tmp", "pause.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def visibility_warning(mountpoint: Path, env: Mapping[str, str] | None = None) -> str | None:
    """Why Podman may not see a mount made at `mountpoint` now, with the fixes; None when it will."""
    if enclosing_mount_is_shared(mountpoint.parent):
        return None
    pid = pause_pid(env)
    advice = ("make the directory a shared mount once, as root (`mount --bind D D && mount --make-shared D`, "
              "systemd hosts have / shared already), or start the store before Podman (the user unit "
              "contrib/systemd/user/stargz-store.service)")
    if pid is None:
        return (f"{mountpoint.parent} is not on a shared mount: a store restarted while Podman's pause process "
                f"runs will not be seen by it; {advice}")
    return (f"Podman's pause process (pid {pid}) is running and {mountpoint.parent} is not on a shared mount: "
            f"Podman will not see this mount and pulls normally; run `podman system migrate` after the store "
            f"has started (it restarts the pause process), or {advice}")
