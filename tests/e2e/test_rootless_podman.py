"""Rootless Podman 4.3.1 through a store run by the same unprivileged user (issue 19).

Everything runs as the real test user `stargz-rootless` (tests/fixtures/rootless.py): the store
with no path flags (its per-user defaults: data root, mountpoint and config under the user's XDG
directories), mounted through `fusermount3` without `allow_other`, and Podman with its own user
namespace (newuidmap, the user's /etc/subuid range), runc, cgroupfs and `driver = "overlay"` set
in its storage.conf by the test (rootless Podman defaults to `vfs`, which never asks a layer
store). The user's directory is a shared mount, as `/` is on a systemd host.

Podman 5 is not run rootless here: its lane runs in a chroot, and a chrooted process may not
create a user namespace.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.fixtures.images import LayerBuilder, random_bytes

from .app_images import (
    APP_CMD,
    APP_LINE,
    APP_MESSAGE,
    MERGED_EXPECTED,
    MERGED_SCRIPT,
    build_source,
    convert_and_push,
    fetch_image,
)
from .conftest import LAZY_CONFIG
from .recording_proxy import RecordingProxy

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.podman4, pytest.mark.slow]

LAZY_FRACTION = 0.25
OWNED_BY_USER = 1000  # a non-root owner in the image: inside the container it must stay 1000
OWNERS_SCRIPT = "stat -c '%u:%g %n' /owned /owned/root.txt /owned/user.txt /owned/userdir; cat /owned/root.txt"
OWNERS_EXPECTED = ("0:0 /owned\n0:0 /owned/root.txt\n1000:1000 /owned/user.txt\n1000:1000 /owned/userdir\n"
                   "root file\n")
APP_OUTPUT = f"{APP_LINE}\n{APP_MESSAGE}\n"


def owners_layer() -> LayerBuilder:
    """busybox, the app, files owned by root and by uid 1000, and 60 MiB nobody reads."""
    layer = LayerBuilder().add_busybox()
    layer.add_file("app/run.sh", f'#!/bin/sh\necho "{APP_LINE}"\ncat /app/message.txt\n'.encode(), mode=0o755)
    layer.add_file("app/message.txt", (APP_MESSAGE + "\n").encode())
    layer.add_dir("owned")
    layer.add_file("owned/root.txt", b"root file\n", mode=0o600)
    layer.add_file("owned/user.txt", b"user file\n", mode=0o640, uid=OWNED_BY_USER, gid=OWNED_BY_USER)
    layer.add_dir("owned/userdir", mode=0o750, uid=OWNED_BY_USER, gid=OWNED_BY_USER)
    for i in range(3):
        layer.add_file(f"filler/blob-{i}.bin", random_bytes(20 << 20, seed=300 + i))
    return layer


def unmappable_layer() -> LayerBuilder:
    """A file owned by a uid no rootless namespace of 65537 ids holds."""
    return LayerBuilder().add_busybox().add_file("far/away.txt", b"far\n", uid=3_000_000, gid=3_000_000)


@pytest.fixture(scope="module")
def rootless_images(e2e_images, registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("rootless-images")
    owners = build_source(work / "owners", [owners_layer().gzip()], APP_CMD)
    far = build_source(work / "far", [unmappable_layer().gzip()], {"Cmd": ["/bin/sh"]})
    convert_and_push(owners, "src", f"{registry.host}/rootless/owners:esgz")
    convert_and_push(far, "src", f"{registry.host}/rootless/far:esgz")
    return {
        "owners": fetch_image(registry.host, "rootless/owners", "esgz"),
        "far": fetch_image(registry.host, "rootless/far", "esgz"),
        "multi": e2e_images.multi_esgz,
    }


@pytest.fixture
def proxy(registry):
    p = RecordingProxy(registry.host).start()
    yield p
    p.stop()


@pytest.fixture
def rootless(rootless_session, proxy, rootless_images):
    """The user's store (background fetch off, so what is fetched is what the container read)
    and the user's Podman pointed at the store's default mountpoint."""
    store = rootless_session.store(LAZY_CONFIG)
    rootless_session.configure_podman(store.mountpoint)
    rootless_session.proxy = proxy
    rootless_session.current_store = store
    rootless_session.images = rootless_images
    return rootless_session


def _ref(session, image) -> str:
    return image.ref(session.proxy.host)


def _pull(session, image) -> None:
    session.podman("pull", "--tls-verify=false", _ref(session, image))


def _run(session, image, *cmd: str) -> str:
    return session.podman("run", "--rm", "--net=none", "--pull=never", _ref(session, image), *cmd).stdout


def _store_links(session) -> dict[str, str]:
    """overlay layer id -> its `diff` symlink target, for layers podman took from the store."""
    links = {}
    overlay = session.graphroot / "overlay"
    if overlay.is_dir():
        for layer_dir in overlay.iterdir():
            if (layer_dir / "diff").is_symlink():
                links[layer_dir.name] = os.readlink(layer_dir / "diff")
    return links


def test_the_store_runs_as_the_user_with_per_user_defaults(rootless):
    store = rootless.current_store
    mounts = [line.split() for line in open("/proc/mounts") if f" {store.mountpoint} " in line]
    assert len(mounts) == 1, mounts
    options = mounts[0][3].split(",")
    assert f"user_id={rootless.user.uid}" in options and "allow_other" not in options, options
    assert (store.root / "store.sock").is_socket()
    assert os.stat(store.root).st_uid == rootless.user.uid
    assert "config.toml" in store.log_text() and str(rootless.config_home) in store.log_text()


def test_lazy_pull_and_run_fetch_under_a_quarter_of_the_image(rootless):
    image = rootless_images_of(rootless)["owners"]
    started = time.monotonic()
    _pull(rootless, image)
    links = _store_links(rootless)
    assert len(links) == len(image.layers), f"the layer must come from the store: {links}\n{rootless.current_store.log_tail()}"
    assert all(str(rootless.current_store.mountpoint) in target for target in links.values()), links

    assert _run(rootless, image) == APP_OUTPUT
    elapsed = time.monotonic() - started

    requests = rootless.proxy.requests()
    fetched = sum(r.bytes_sent for r in requests)
    assert not [r for r in requests if r.method == "GET" and r.from_podman and r.blob_digest == image.layers[0]["digest"]]
    assert 0 < fetched < LAZY_FRACTION * image.compressed_size, (
        f"{fetched} bytes fetched before the first output, image is {image.compressed_size} bytes")
    print(f"rootless lazy pull+run: {fetched} of {image.compressed_size} bytes, {elapsed:.1f} s")


def test_a_normal_rootless_pull_fetches_the_whole_image(rootless_session, proxy, rootless_images):
    """The baseline the lazy pull is measured against: the same image without the store."""
    rootless_session.configure_podman(None)
    rootless_session.proxy = proxy
    image = rootless_images["owners"]
    started = time.monotonic()
    _pull(rootless_session, image)
    assert _run(rootless_session, image) == APP_OUTPUT
    elapsed = time.monotonic() - started
    fetched = sum(r.bytes_sent for r in proxy.requests())
    assert _store_links(rootless_session) == {}
    assert fetched >= image.compressed_size
    print(f"rootless normal pull+run: {fetched} of {image.compressed_size} bytes, {elapsed:.1f} s")


def test_owners_inside_the_container_are_the_image_s(rootless):
    image = rootless_images_of(rootless)["owners"]
    _pull(rootless, image)
    assert _run(rootless, image, "/bin/sh", "-c", OWNERS_SCRIPT) == OWNERS_EXPECTED
    # Seen from the host, the store shows the user's own uid for root and the subordinate range for 1000.
    listing = rootless.run(["stat", "-c", "%u:%g", *[str(p) for p in _diff_paths(rootless, image)]]).stdout
    start = _subordinate_start(rootless.user.name)
    assert listing.splitlines() == [f"{rootless.user.uid}:{rootless.user.gid}",  # owned/root.txt
                                    f"{start + OWNED_BY_USER - 1}:{start + OWNED_BY_USER - 1}"]  # owned/user.txt


def _diff_paths(session, image) -> list:
    store = session.current_store
    layer_dir = store.mountpoint / _ref_dir(_ref(session, image)) / image.layers[0]["digest"]
    return [layer_dir / "diff" / "owned" / "root.txt", layer_dir / "diff" / "owned" / "user.txt"]


def _ref_dir(ref: str) -> str:
    import base64

    return base64.b64encode(ref.encode()).decode()


def _subordinate_start(name: str) -> int:
    for line in open("/etc/subuid"):
        user, start, _count = line.strip().split(":")
        if user == name:
            return int(start)
    raise AssertionError(f"no /etc/subuid range for {name}")


def test_whiteouts_and_opaque_directories(rootless):
    image = rootless_images_of(rootless)["multi"]
    _pull(rootless, image)
    assert len(_store_links(rootless)) == len(image.layers)
    assert _run(rootless, image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED


def test_rmi_releases_the_layers(rootless):
    image = rootless_images_of(rootless)["owners"]
    _pull(rootless, image)
    before = _stats(rootless)
    rootless.podman("rmi", _ref(rootless, image))
    after = _stats(rootless)
    assert _store_links(rootless) == {}
    assert after["pool"]["releases"] > before["pool"]["releases"], (before["pool"], after["pool"])


def _stats(session) -> dict:
    store = session.current_store
    path = store.root / "stats.json"
    path.unlink(missing_ok=True)
    os.kill(store.proc.pid, __import__("signal").SIGUSR1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    raise AssertionError(f"no stats.json:\n{store.log_tail()}")


def test_a_restarted_store_is_seen_by_the_running_podman(rootless):
    """The pause process started with the first podman command; the new mount reaches it."""
    image = rootless_images_of(rootless)["multi"]
    _pull(rootless, image)
    assert _run(rootless, image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED
    pause = rootless.pause_pid()
    assert pause is not None

    store = rootless.current_store
    assert store.stop() == 0
    store.start()
    assert rootless.pause_pid() == pause
    assert _run(rootless, image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED

    rootless.podman("system", "migrate")
    assert _run(rootless, image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED


def test_a_layer_with_owners_outside_the_namespace_is_refused_loudly(rootless):
    image = rootless_images_of(rootless)["far"]
    ref = _ref(rootless, image)
    pull = rootless.podman("pull", "--tls-verify=false", ref, check=False)
    assert _store_links(rootless) == {}
    # Podman falls back to its own pull, which fails as it does without the store.
    assert pull.returncode != 0 and "insufficient UIDs or GIDs" in pull.stderr, pull.stderr[-2000:]
    log = rootless.current_store.log_text()
    assert "uid 3000000 of the layer outside the uid map" in log, rootless.current_store.log_tail()


def rootless_images_of(session):
    return session.images
