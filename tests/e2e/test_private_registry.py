"""A private registry (htpasswd over TLS, a CA the test makes): Podman logs in, the store gets nothing configured.

Podman 5.2+ hands its credentials to the store through `additional-layer-store-auth-helper =
"stargz-store-helper"` (registries.conf) on every pull, so the pull is lazy. Podman 4.3.1
(containers/image 5.23) ignores that key: the store, with no credentials, declines (EIO) and
Podman pulls the image itself. In the chroot lane the helper is a script that runs the very
`stargz-store-helper` installed on the host (`PodmanLane.write_program`).
"""
from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.podman import podman, podman_cleanup

from .app_images import APP_LINE, APP_MESSAGE

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.slow]

APP_OUTPUT = f"{APP_LINE}\n{APP_MESSAGE}\n"
HELPER = "stargz-store-helper"
WRONG = "not-alices-S3CRET"


def copy_to(src_ref: str, dest_ref: str, creds: str, workdir: Path) -> None:
    """The e2e image, byte-exact, into the private registry (skopeo, with the pusher's credentials)."""
    cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
           "--src-no-creds", "--dest-creds", creds, f"docker://{src_ref}", f"docker://{dest_ref}"]
    auth_file = workdir / "skopeo-auth.json"  # never the machine's credentials
    auth_file.write_text('{"auths": {}}')
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth_file)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr


def helper_program() -> str:
    path = Path(sys.executable).parent / HELPER
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make deps` (setup.cfg installs the console script)")
    return str(path)


def store_config(host: str, ca: Path, no_auth_file: Path) -> str:
    """No credentials anywhere: an auth file that does not exist (no file of the machine is read), the CA only."""
    return ("no_background_fetch = true\n"
            f'[resolver]\nauth_file = "{no_auth_file}"\n'
            f'[resolver.host."{host}"]\nca_file = "{ca}"\n')


def store_layer_links(graphroot: Path) -> list[str]:
    overlay = graphroot / "overlay"
    return sorted(os.readlink(d / "diff") for d in overlay.iterdir() if (d / "diff").is_symlink()) \
        if overlay.is_dir() else []


def test_podman_login_then_lazy_run_from_a_private_registry(e2e_images, registry, tls_basic_registry,
                                                            store_daemon_factory, podman_lane, tmp_path):
    private = tls_basic_registry
    password = private.users["alice"]
    image = e2e_images.app_esgz
    ref = f"{private.host}/private/app:esgz"
    copy_to(image.ref(registry.host), ref, f"alice:{password}", tmp_path)

    store = store_daemon_factory(store_config(private.host, private.ca_cert, tmp_path / "no-auth.json"),
                                 mountpoint=podman_lane.store_mountpoint())
    with podman_lane.private_dir("e2e-priv-") as pod_dir:
        env = podman_lane.env(pod_dir, additional_layer_store=store.mountpoint)
        certs = pod_dir / "certs"
        certs.mkdir()
        (certs / "ca.crt").write_bytes(private.ca_cert.read_bytes())
        bin_dir = pod_dir / "bin"
        podman_lane.write_program(bin_dir, HELPER, [helper_program(), "--addr", str(store.root / "store.sock")])
        registries_conf = pod_dir / "registries.conf"
        registries_conf.write_text(f'additional-layer-store-auth-helper = "{HELPER}"\n')
        env["CONTAINERS_REGISTRIES_CONF"] = podman_lane.seen(registries_conf)
        env["PATH"] = f"{podman_lane.seen(bin_dir)}:{env['PATH']}"
        cert_dir = f"--cert-dir={podman_lane.seen(certs)}"
        layer_dirs = [store.layer_dir(ref, podman_lane.layer_key(layer)) for layer in image.layers]
        try:
            # A wrong password: Podman's login says so, and a pull with it (a password changed since
            # the login) fails clearly; the store, which has no credentials, declines at once.
            login = podman("login", cert_dir, "-u", "alice", "--password-stdin", private.host, env=env,
                           input=WRONG + "\n", check=False)
            assert login.returncode != 0 and "invalid username/password" in login.stderr, login.stderr
            (pod_dir / "auth.json").write_text(json.dumps({"auths": {private.host: {
                "auth": base64.b64encode(f"alice:{WRONG}".encode()).decode()}}}))
            pull = podman("pull", cert_dir, ref, env=env, check=False)
            assert pull.returncode != 0 and "authentication required" in pull.stderr, pull.stderr
            assert WRONG not in pull.stderr
            with pytest.raises(OSError) as refused:
                os.stat(layer_dirs[0] / "diff")
            assert refused.value.errno == errno.EIO

            # Podman's own login; nothing is configured in the store.
            podman("login", cert_dir, "-u", "alice", "--password-stdin", private.host, env=env, input=password + "\n")
            pull = podman("pull", cert_dir, ref, env=env)
            assert "additional-layer-store-auth-helper" not in pull.stderr, pull.stderr
            links = store_layer_links(pod_dir / "graph")
            if podman_lane.passes_credentials_to_the_store:
                assert links == sorted(f"{podman_lane.seen(d)}/diff" for d in layer_dirs), (
                    f"every layer must come from the store:\n{store.log_tail()}")
                assert f"credentials from the runtime for {ref}: updated" in store.log_path.read_text()
            else:
                assert links == [], "Podman 4.3.1 gives the store no credentials: it pulls the layers itself"
            out = podman("run", "--rm", "--net=none", "--pull=never", ref, env=env).stdout
            assert out == APP_OUTPUT
        finally:
            podman_cleanup(env)
    log = store.log_path.read_text()
    assert password not in log and WRONG not in log
