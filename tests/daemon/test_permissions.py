"""Permissions like a local filesystem, through the real mount, as root and as `nobody`.

The store runs as root with `allow_other`, so every local user reaches the mount. What must hold:
the kernel enforces the layers' own modes and owners; store files that hold a whole image (blob,
manifest, config, info) are root's; only root makes the store resolve an image (with root's
registry credentials) or send notifications; the data root is 0700 and everything under it private.

The mount and the data root sit in a directory `nobody` can walk through, so every refusal seen
here comes from the store's own modes and checks, not from a private parent directory.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.e2e.app_images import convert_and_push, fetch_image
from tests.fixtures.images import LayerBuilder, write_oci_image
from tests.fixtures.store import private_tmpdir, remove_tmpdir
from tests.fixtures.unprivileged import NOBODY, as_user

from .conftest import FAST_CONFIG

PUBLIC = b"anyone may read this\n"
SHADOW = b"root:$6$secret:19000:0:99999:7:::\n"
NOTE = b"0644, but inside a 0700 directory\n"
OWN = b"nobody's own 0600 file\n"
REPO = "perm/modes"


def modes_layer() -> LayerBuilder:
    layer = LayerBuilder()
    layer.add_dir("public", mode=0o755).add_file("public/readme.txt", PUBLIC, mode=0o644, parents=False)
    layer.add_dir("etc", mode=0o755).add_file("etc/shadow", SHADOW, mode=0o600, parents=False)
    layer.add_dir("private", mode=0o700).add_file("private/note.txt", NOTE, mode=0o644, parents=False)
    layer.add_dir("home", mode=0o755).add_dir("home/nobody", mode=0o700, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    layer.add_file("home/nobody/own.txt", OWN, mode=0o600, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, parents=False)
    return layer


@pytest.fixture(scope="module")
def modes_image(registry, tmp_path_factory) -> tuple[str, str]:
    """(repository:tag, layer digest) of a one-layer eStargz image with files of every mode above."""
    layout = tmp_path_factory.mktemp("modes") / "layout"
    write_oci_image(layout, [modes_layer().gzip()], tag="src")
    convert_and_push(layout, "src", f"{registry.host}/{REPO}:1")
    image = fetch_image(registry.host, REPO, "1")
    return f"{REPO}:1", image.layers[0]["digest"]


@pytest.fixture
def walkable_base():
    """A private temp dir that others may walk through (0755), for the mountpoint and the data root."""
    base = private_tmpdir()
    os.chmod(base, 0o755)
    yield base
    remove_tmpdir(base)


@pytest.fixture
def store(walkable_base, store_daemon_factory):
    """A store whose mountpoint `nobody` can reach, on a data root made 0755 beforehand (the
    daemon must tighten it)."""
    root = walkable_base / "root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    return store_daemon_factory(FAST_CONFIG, root=root, mountpoint=walkable_base / "mnt")


def outcome_errno(outcome: tuple[str, object]) -> str | None:
    return outcome[1] if outcome[0] == "err" else None  # type: ignore[return-value]


def test_the_kernel_enforces_the_layer_modes_and_owners(store, modes_image, registry):
    repo_tag, digest = modes_image
    ref = f"{registry.host}/{repo_tag}"
    layer = store.layer_dir(ref, digest)
    diff = layer / "diff"
    assert (diff / "etc" / "shadow").read_bytes() == SHADOW  # root resolves the image and reads anything

    probes = [
        ("read", diff / "public" / "readme.txt"),
        ("read", diff / "etc" / "shadow"),
        ("read", diff / "private" / "note.txt"),
        ("listdir", diff / "private"),
        ("read", diff / "home" / "nobody" / "own.txt"),
        ("listdir", diff / "public"),
        ("read", layer / "blob"),
        ("read", layer / "info"),
        ("read", store.ref_dir(ref) / "manifest"),
        ("read", store.ref_dir(ref) / "config"),
        ("listdir", store.mountpoint),
    ]
    got = dict(zip([f"{op} {Path(p).relative_to(store.mountpoint)}" for op, p in probes], as_user(probes)))
    names = list(got)
    assert got[names[0]] == ("ok", PUBLIC.decode())
    assert outcome_errno(got[names[1]]) == "EACCES", "a 0600 root file of the layer"
    assert outcome_errno(got[names[2]]) == "EACCES", "a 0644 file under a 0700 directory"
    assert outcome_errno(got[names[3]]) == "EACCES", "listing a 0700 directory"
    assert got[names[4]] == ("ok", OWN.decode()), "the owner reads its own 0600 file"
    assert got[names[5]] == ("ok", ["readme.txt"])
    for name in names[6:10]:
        assert outcome_errno(got[name]) == "EACCES", f"{name}: a store file holding the whole image is root's"
    assert outcome_errno(got[names[10]]) == "EACCES", "only root lists which images the node holds"
    assert "default_permissions" in _mount_options(store.mountpoint)


def test_modes_of_the_store_nodes(store, modes_image, registry):
    repo_tag, digest = modes_image
    ref = f"{registry.host}/{repo_tag}"
    layer = store.layer_dir(ref, digest)
    os.stat(layer / "diff")
    expected = {
        store.mountpoint: stat.S_IFDIR | 0o711,
        store.ref_dir(ref): stat.S_IFDIR | 0o555,
        store.ref_dir(ref) / "manifest": stat.S_IFREG | 0o400,
        store.ref_dir(ref) / "config": stat.S_IFREG | 0o400,
        layer: stat.S_IFDIR | 0o555,
        layer / "info": stat.S_IFREG | 0o400,
        layer / "blob": stat.S_IFREG | 0o400,
        layer / "diff": stat.S_IFDIR | 0o755,  # the layer's own root (implicit: 0755)
        layer / "diff" / "private": stat.S_IFDIR | 0o700,
        layer / "diff" / "etc" / "shadow": stat.S_IFREG | 0o600,
    }
    for path, mode in expected.items():
        st = os.stat(path)
        assert (st.st_mode, st.st_uid, st.st_gid) == (mode, 0, 0), f"{path}: {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"
    st = os.stat(layer / "diff" / "home" / "nobody" / "own.txt")
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)


def test_unprivileged_lookup_of_an_unresolved_image_reaches_no_registry(store, modes_image, fault_proxy):
    repo_tag, digest = modes_image
    ref = f"{fault_proxy.host}/{repo_tag}"  # the same image under a name this daemon never resolved
    ref_dir, layer = store.ref_dir(ref), store.layer_dir(ref, digest)
    probes = [
        ("stat", ref_dir),
        ("listdir", ref_dir),
        ("read", ref_dir / "manifest"),
        ("stat", layer),
        ("stat", layer / "diff"),
        ("read", layer / "diff" / "public" / "readme.txt"),
        ("read", layer / "info"),
        ("stat", layer / "blob"),
        ("create", layer / "use"),
    ]
    outcomes = as_user(probes)
    for (op, path), outcome in zip(probes, outcomes):
        assert outcome_errno(outcome) in ("EACCES", "ENOENT"), f"{op} {path}: {outcome}"
    assert fault_proxy.requests_to(f"/{REPO}/") == []
    pool = store.stats()
    assert pool["pool"]["images"] == 0 and pool["pool"]["image_resolves"] == 0
    assert pool["pool"]["image_resolve_failures"] == 0 and pool["refcounts"] == {}

    # the same lookup by root resolves through the proxy: the probes above would have shown there
    assert (layer / "diff" / "public" / "readme.txt").read_bytes() == PUBLIC
    assert fault_proxy.requests_to(f"/{REPO}/manifests/")
    # ... and once root has resolved it, nobody reads what the modes allow
    assert as_user([("read", layer / "diff" / "public" / "readme.txt")]) == [("ok", PUBLIC.decode())]


def test_only_root_sends_notifications(store, modes_image, registry):
    repo_tag, digest = modes_image
    ref = f"{registry.host}/{repo_tag}"
    layer = store.layer_dir(ref, digest)
    os.stat(layer / "diff")
    outcomes = as_user([("create", layer / "use"), ("rmdir", layer)])
    assert [outcome_errno(o) for o in outcomes] == ["EACCES", "EACCES"]
    assert store.stats()["refcounts"] == {}
    with pytest.raises(OSError) as info:  # root's notifications still reach the store
        os.open(layer / "use", os.O_CREAT | os.O_WRONLY, 0o644)
    assert info.value.errno == errno.ENOENT
    assert store.stats()["refcounts"] == {f"{ref} {digest}": 1}
    with pytest.raises(OSError) as info:
        os.rmdir(layer)
    assert info.value.errno == errno.ENOENT
    assert store.stats()["refcounts"] == {}


def test_the_data_root_is_private(store, modes_image, registry):
    repo_tag, digest = modes_image
    ref = f"{registry.host}/{repo_tag}"
    diff = store.layer_dir(ref, digest) / "diff"
    assert (diff / "etc" / "shadow").read_bytes() == SHADOW  # fills the chunk cache
    store.stats()  # writes stats.json
    root = store.root
    [metadata] = root.glob("pool/metadata--*/manifest")
    outcomes = as_user([
        ("listdir", root),
        ("read", root / "stats.json"),
        ("read", metadata),
        ("readlink", store.mountpoint / "pool"),
        ("listdir", store.mountpoint / "pool"),
    ])
    assert [outcome_errno(o) for o in outcomes[:3]] == ["EACCES"] * 3
    assert outcomes[3] == ("ok", str(root / "pool"))  # the probe target of the Go store's scripts: only a path
    assert outcome_errno(outcomes[4]) == "EACCES"

    assert store.stop() == 0  # nothing writes under the root any more: every file it made is here
    written = [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files]
    assert {"pool", "cache", "stats.json", "stargz-store.lock"} <= {p.relative_to(root).parts[0] for p in written}
    assert {"manifest", "config", "meta.json"} <= {p.name for p in written}
    assert any(p.relative_to(root).parts[0] == "cache" and p.is_file() for p in written), "nothing cached"
    loose = [f"{p.relative_to(root)} {stat.filemode(os.lstat(p).st_mode)}" for p in written if os.lstat(p).st_mode & 0o077]
    assert loose == [], "readable by others under the data root"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert "tightening it to 0700" in store.log_tail(100_000)


def _mount_options(mountpoint: Path) -> set[str]:
    target = os.path.realpath(mountpoint)
    options: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                options = set(fields[5].split(",")) | set(line.split(" - ", 1)[1].split()[2].split(","))
    return options
