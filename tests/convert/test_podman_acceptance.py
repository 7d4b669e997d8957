"""Acceptance: a converted image pushed to a registry is pulled and run by plain podman (no store).

This is what proves the converter's output stays an ordinary OCI image: podman knows nothing of
lazy pulling here, it just downloads the layers, applies them (whiteouts included) and runs.
"""
from __future__ import annotations

import hashlib

import pytest

from tests.convert.layer_compare import run_convert
from tests.fixtures.images import random_bytes
from tests.fixtures.podman import podman

pytestmark = [pytest.mark.podman, pytest.mark.slow]


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_plain_podman_runs_the_converted_image(fmt, source_image, registry, podman_environment, tmp_path):
    ref = f"{registry.host}/x:{'esgz' if fmt == 'estargz' else 'zstdchunked'}"
    record = tmp_path / "record.json"
    record.write_text('{"path": "bin/busybox"}\n{"path": "etc/motd"}\n')
    proc = run_convert("--format", fmt, "--record-in", str(record), source_image.ref, f"docker://{ref}")
    assert proc.returncode == 0, proc.stderr

    env = podman_environment
    podman("pull", "-q", "--tls-verify=false", ref, env=env)
    # The image's own command prints /etc/motd.
    assert podman("run", "--rm", "--net=none", ref, env=env).stdout == "converted image says hi\n"
    script = (
        "sha256sum /big/random.bin; "
        "ls -a /data | tr '\\n' ' '; echo; "
        "test -e /hello.txt && echo hello-present || echo hello-gone; "
        "cat '/caf\u00e9/na\u00efve.txt'; stat -c '%a %u %g' /etc/suid"
    )
    out = podman("run", "--rm", "--net=none", ref, "/bin/sh", "-c", script, env=env).stdout.splitlines()
    assert out[0].split()[0] == hashlib.sha256(random_bytes((9 << 20) + 123, seed=7)).hexdigest()
    assert out[1].split() == [".", "..", "new.txt"]  # the opaque whiteout hid the lower data/
    assert out[2] == "hello-gone"  # the whiteout removed it
    assert out[3] == "non-ASCII name"
    assert out[4] == "4755 1000 1001"


def test_plain_podman_picks_its_platform_from_a_converted_index(registry, podman_environment, tmp_path):
    """`--all-platforms` writes an OCI index; podman resolves it to the host's image and runs it."""
    from stargz_store.registry.platforms import host_platform
    from tests.fixtures.images import LayerBuilder, write_oci_index

    host = f"linux/{host_platform().architecture}"
    other = "linux/s390x" if host != "linux/s390x" else "linux/amd64"
    layers = {p: [LayerBuilder().add_busybox().add_file("platform.txt", f"{p}\n".encode()).gzip()]
              for p in (other, host)}
    write_oci_index(tmp_path / "multi", layers, tag="m", config_extra={"Cmd": ["/bin/cat", "/platform.txt"]})
    ref = f"{registry.host}/x:multi-esgz"
    proc = run_convert("--all-platforms", f"oci:{tmp_path / 'multi'}:m", f"docker://{ref}")
    assert proc.returncode == 0, proc.stderr
    podman("pull", "-q", "--tls-verify=false", ref, env=podman_environment)
    assert podman("run", "--rm", "--net=none", ref, env=podman_environment).stdout == f"{host}\n"
