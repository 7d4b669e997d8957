"""The Podman 5 chroot's pieces: the mirror it is built from, when it is rebuilt, podman's paths in
it, and a session's mounts (private, undone, never inside the cache)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stargz_store.localenv import podman5
from stargz_store.localenv.podman import CHROOT_VAR, podman_command, podman_env
from stargz_store.localenv.procs import is_mounted


def test_the_mirror_is_the_first_enabled_non_security_source(tmp_path, monkeypatch):
    monkeypatch.delenv(podman5.MIRROR_VAR, raising=False)
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "a-off.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n")
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")
    (sources / "other.list.disabled-by-someone").write_text("deb http://disabled.example/debian bookworm main\n")
    assert podman5.debian_mirror(tmp_path) == "http://mirror.example/debian"

    (sources / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://oneline.example/debian bookworm main\n")
    assert podman5.debian_mirror(tmp_path) == "http://oneline.example/debian"

    monkeypatch.setenv(podman5.MIRROR_VAR, "http://override.example/debian/")
    assert podman5.debian_mirror(tmp_path) == "http://override.example/debian"


def test_only_a_finished_build_of_the_current_package_list_is_reused(tmp_path):
    (tmp_path / "rootfs" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "rootfs" / "usr" / "bin" / "podman").write_text("")
    assert not podman5._complete(tmp_path)  # no marker: a build that stopped half-way

    marker = {"suite": podman5.SUITE, "packages": list(podman5.PACKAGES), "layout": podman5.LAYOUT}
    (tmp_path / "COMPLETE").write_text(json.dumps(marker))
    assert podman5._complete(tmp_path)

    (tmp_path / "COMPLETE").write_text(json.dumps({**marker, "packages": ["podman"]}))
    assert not podman5._complete(tmp_path)  # the package list changed since: rebuild


def test_podman_env_in_a_chroot_names_its_paths_as_the_chroot_sees_them(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    pod_dir = root / "ci" / "pod-1"
    env = podman_env(pod_dir, additional_layer_store=root / "ci" / "store-1" / "mnt", chroot=root)

    storage = (pod_dir / "storage.conf").read_text()
    assert 'graphroot = "/ci/pod-1/graph"' in storage
    assert 'additionallayerstores = ["/ci/store-1/mnt:ref"]' in storage
    runroot = env["STARGZ_LOCALENV_PODMAN_RUNROOT"]
    assert Path(runroot).parent == root / "run" and f'runroot = "/run/{Path(runroot).name}"' in storage
    containers = (pod_dir / "containers.conf").read_text()
    for line in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"', 'events_logger = "file"', 'netns = "none"'):
        assert line in containers
    assert env["CONTAINERS_STORAGE_CONF"] == "/ci/pod-1/storage.conf"
    assert env["PODMAN_IGNORE_CGROUPSV1_WARNING"] == "1"
    assert podman_command(env, "info") == ["chroot", str(root), "podman", "info"]

    with pytest.raises(ValueError, match="cannot see it"):
        podman_env(pod_dir, additional_layer_store=tmp_path / "outside" / "mnt", chroot=root)

    host_env = podman_env(tmp_path / "host-pod")
    try:
        assert CHROOT_VAR not in host_env and podman_command(host_env, "info") == ["podman", "info"]
    finally:  # a host runroot is made under /tmp, outside tmp_path
        shutil.rmtree(host_env["STARGZ_LOCALENV_PODMAN_RUNROOT"], ignore_errors=True)


def _mounts_under(path: Path) -> dict[str, str]:
    """mount point -> its optional fields (propagation) from /proc/self/mountinfo, for mounts under `path`."""
    out = {}
    prefix = str(path) + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        if point == str(path) or point.startswith(prefix):
            out[point] = " ".join(fields[6:fields.index("-")])
    return out


@pytest.mark.root
@pytest.mark.podman5
def test_a_session_mounts_privately_and_undoes_everything():
    if os.geteuid() != 0:
        pytest.fail("needs root (mounts)")
    rootfs = podman5.ensure_rootfs()
    with podman5.ChrootSession.open() as session:
        mounts = _mounts_under(session.root)
        for sub in ("", "/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/lib/containers", "/ci"):
            assert str(session.root) + sub in mounts, f"{sub or '/'} is not mounted in the session"
        shared = {m: opt for m, opt in mounts.items() if "shared:" in opt}
        assert shared == {}, f"session mounts that would propagate to the host: {shared}"
        (session.workdir / "probe").write_text("x")
        out = subprocess.run(["chroot", str(session.root), "/bin/sh", "-c", "cat /ci/probe; podman --version"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.startswith("x") and "podman version 5." in out
        base = session.base
    assert _mounts_under(base) == {}
    assert not base.exists()
    assert not is_mounted(rootfs) and (rootfs / "usr" / "bin" / "podman").is_file()
    assert not (rootfs / "ci" / "probe").exists(), "a session must never write into the cached root"
