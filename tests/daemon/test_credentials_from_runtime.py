"""A mounted store and a registry with htpasswd: credentials reach the daemon only through its control
socket (what `stargz-store-helper` does for Podman), none is in its config or files."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from stargz_store.daemon.control import SOCKET_NAME, call
from tests.fixtures.images import push_oci_layout
from tests.fixtures.store import REPO_ROOT

from .conftest import FAST_CONFIG, layout_tag, load_pushed

pytestmark = [pytest.mark.root]

IMAGE = "multilayer-esgz"
WRONG = "wrong-S3CRET"


def store_config(tmp_path) -> str:
    """FAST_CONFIG, and an auth file that does not exist: no credentials from any file of the machine."""
    return FAST_CONFIG.replace("[resolver]\n", f'[resolver]\nauth_file = "{tmp_path / "no-auth.json"}"\n')


@pytest.fixture
def private_image(basic_registry, testdata):
    tag = layout_tag(testdata / IMAGE)
    ref = f"{basic_registry.host}/private/{IMAGE}:{tag}"
    push_oci_layout(testdata / IMAGE, tag, ref, dest_creds=f"alice:{basic_registry.users['alice']}")
    return load_pushed(testdata, IMAGE, ref)


def helper(store, doc: dict) -> subprocess.CompletedProcess:
    """The helper as containers/image runs it, with the daemon's root."""
    return subprocess.run([sys.executable, "-m", "stargz_store.cli", "auth-helper", "--root", str(store.root)],
                          input=json.dumps(doc).encode(), capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def check_layers(store, image) -> None:
    for desc, want, diff_id in zip(image.layers, image.expected["source_layers"], image.config["rootfs"]["diff_ids"],
                                   strict=True):
        layer = store.layer_dir(image.ref, desc["digest"])
        assert json.loads((layer / "info").read_bytes())["diff-digest"] == diff_id
        files = [(p, e) for p, e in want["entries"].items() if e["type"] == "reg" and e.get("size")]
        path, entry = files[0]
        assert len((layer / "diff" / path).read_bytes()) == entry["size"]


def test_credentials_sent_to_the_socket_open_a_private_image(store_daemon_factory, basic_registry, private_image,
                                                             tmp_path):
    store = store_daemon_factory(store_config(tmp_path))
    sock = store.root / SOCKET_NAME
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    layer = store.layer_dir(private_image.ref, private_image.layers[0]["digest"])
    assert errno_of(os.stat, layer / "diff") == errno.EIO, "no credentials: the registry refuses, EIO at once"

    result = helper(store, {private_image.ref: {"username": "alice", "password": WRONG}})
    assert result.returncode == 0, result.stderr
    assert errno_of(os.stat, layer / "diff") == errno.EIO, "wrong password: EIO, no hang"

    # Right away (the earlier failure is remembered for negative_ttl, but new credentials reset it).
    result = helper(store, {private_image.ref: {"username": "alice", "password": basic_registry.users["alice"]}})
    assert result.returncode == 0, result.stderr
    check_layers(store, private_image)

    log = store.log_path.read_text()
    assert basic_registry.users["alice"] not in log and WRONG not in log
    assert f"credentials from the runtime for {private_image.ref}: updated" in log
    assert store.stop() == 0
    assert not sock.exists(), "the socket goes with the daemon"


def test_addr_flag_moves_the_socket(store_daemon_factory, tmp_path):
    """`--addr` as the Go store takes it (unix://PATH): the helper's address and the daemon's agree."""
    path = tmp_path / "elsewhere.sock"
    store = store_daemon_factory(store_config(tmp_path), extra_args=["--addr", f"unix://{path}"])
    reply = call(path, "ping")
    assert reply["ok"] and reply["pid"] == store.server_pid()  # the serving process answers
    assert not (store.root / SOCKET_NAME).exists()
    store.stop()
    assert not path.exists()


def test_credentials_from_the_runtime_survive_a_restart_and_a_crash_of_the_server(
        store_daemon_factory, basic_registry, private_image, testdata, tmp_path):
    """The runtime sends credentials once (at its pull); the serving process that needs them may be
    a later one: after a planned restart (handed over) or a kill -9 (kept by the holder)."""
    tag = layout_tag(testdata / IMAGE)
    second_ref = f"{basic_registry.host}/private/{IMAGE}-again:{tag}"
    push_oci_layout(testdata / IMAGE, tag, second_ref, dest_creds=f"alice:{basic_registry.users['alice']}")
    second = load_pushed(testdata, IMAGE, second_ref)
    store = store_daemon_factory(store_config(tmp_path))
    right = {"username": "alice", "password": basic_registry.users["alice"]}
    result = helper(store, {private_image.ref: right, second_ref: right})
    assert result.returncode == 0, result.stderr
    store.restart()
    check_layers(store, private_image)  # resolved by a process that never saw the helper
    generation = store.server_state()["generation"]  # no spare (the default): a new process takes over
    store.kill_server()
    store.wait_generation(generation)
    check_layers(store, second)
    assert basic_registry.users["alice"] not in store.log_path.read_text()
    assert store.stop() == 0
