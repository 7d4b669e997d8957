"""Rootless mode's choices: per-user defaults, the namespace maps from /etc/subuid, the warnings.

Command-line tests run in this (root) process with `is_rootless` made true, as it is for a user;
the last test runs the daemon as a real unprivileged user (see tests/e2e/test_rootless_podman.py
for the whole path with rootless Podman).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from stargz_store.daemon import auth_helper, cli, rootless
from stargz_store.fs.idmap import IdMap


@pytest.fixture
def as_user(monkeypatch, tmp_path):
    """The command line as a user sees it: not root, a HOME, XDG variables unset."""
    monkeypatch.setattr(cli, "is_rootless", lambda: True)
    monkeypatch.setattr(rootless, "is_rootless", lambda: True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text(f"someone:200000:65536\n{os.getuid()}:100000:65536\n")
    subgid.write_text(f"{os.getuid()}:100000:1000\n{os.getuid()}:300000:10\n")
    monkeypatch.setattr(rootless, "SUBUID_FILE", str(subuid))
    monkeypatch.setattr(rootless, "SUBGID_FILE", str(subgid))
    monkeypatch.setattr(rootless, "default_ownership", _ownership_from(subuid, subgid))
    return tmp_path / "home"


def _ownership_from(subuid: Path, subgid: Path):
    real = rootless.default_ownership

    def ownership(uid=None, gid=None, subuid_file=str(subuid), subgid_file=str(subgid)):
        return real(uid, gid, subuid_file, subgid_file)

    return ownership


def test_a_user_gets_per_user_defaults_and_no_mountpoint_is_needed(as_user):
    args = cli.parse_args([])
    assert args.rootless
    assert args.root == str(as_user / ".local/share/stargz-store")
    assert args.mountpoint == str(as_user / ".local/share/stargz-store/store") and args.create_mountpoint
    assert args.config_path == str(as_user / ".config/stargz-store/config.toml") and not args.config_explicit
    uid, gid = os.getuid(), os.getgid()
    assert args.ownership.store_uid == uid
    assert args.ownership.uids == IdMap.parse(f"0:{uid}:1,1:100000:65536")
    assert args.ownership.gids == IdMap.parse(f"0:{gid}:1,1:100000:1000,1001:300000:10")  # ranges in file order


def test_xdg_variables_move_the_defaults(as_user, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")  # the XDG spec ignores relative paths
    args = cli.parse_args([])
    assert args.root == str(tmp_path / "data/stargz-store")
    assert args.config_path == str(as_user / ".config/stargz-store/config.toml")
    assert auth_helper.socket_address(auth_helper.parse_args([], "h")) == str(tmp_path / "data/stargz-store/store.sock")


def test_flags_replace_the_defaults(as_user, tmp_path):
    args = cli.parse_args(["--root", str(tmp_path / "r"), "--uidmap", "0:5000:1,1:600000:10", str(tmp_path)])
    assert (args.root, args.mountpoint) == (str(tmp_path / "r"), str(tmp_path))
    assert str(args.ownership.uids) == "0:5000:1,1:600000:10" and args.ownership.store_uid == 5000
    assert args.ownership.gids.to_host(0) == os.getgid()  # the default gid map stays


@pytest.mark.parametrize("argv, message", [
    (["--uidmap", "0:1000"], "bad --uidmap/--gidmap"),
    (["--uidmap", "1:100000:10"], "must map container uid 0"),
])
def test_bad_maps_are_usage_errors(as_user, argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_root_keeps_its_defaults_and_needs_a_mountpoint(capsys, tmp_path):
    args = cli.parse_args([str(tmp_path)])
    assert (args.rootless, args.root, args.ownership) == (False, cli.DEFAULT_ROOT, None)
    assert args.config_path == cli.DEFAULT_CONFIG_PATH
    for argv, message in (([], "MOUNTPOINT is required"), (["--rootless", str(tmp_path)], "run it as that user")):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert message in capsys.readouterr().err
    mapped = cli.parse_args(["--uidmap", "0:1001:1,1:100000:65536", str(tmp_path)])
    assert not mapped.rootless and mapped.ownership.store_uid == 1001 and mapped.ownership.gids is None


def test_rootless_mode_mounts_without_allow_other_and_warns_when_podman_cannot_see_it(as_user, caplog, tmp_path):
    args = cli.parse_args([])
    cfg = cli.StoreConfig()
    assert cfg.mount.allow_other
    cli.apply_rootless(cfg, args)
    assert not cfg.mount.allow_other and cfg.ownership is args.ownership
    shared = rootless.enclosing_mount_is_shared(Path(args.mountpoint).parent)
    warned = [r.message for r in caplog.records if "shared mount" in r.message]
    assert bool(warned) != shared, (shared, warned)


def test_a_pause_process_without_the_shared_mount_is_named(monkeypatch, tmp_path):
    runtime = tmp_path / "run"
    (runtime / "libpod/tmp").mkdir(parents=True)
    (runtime / "libpod/tmp/pause.pid").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(rootless, "enclosing_mount_is_shared", lambda path: False)
    warning = rootless.visibility_warning(tmp_path / "mnt", {"XDG_RUNTIME_DIR": str(runtime)})
    assert f"pause process (pid {os.getpid()})" in warning and "podman system migrate" in warning
    monkeypatch.setattr(rootless, "enclosing_mount_is_shared", lambda path: True)
    assert rootless.visibility_warning(tmp_path / "mnt", {"XDG_RUNTIME_DIR": str(runtime)}) is None


def test_shared_propagation_is_read_from_mountinfo(tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    assert not rootless.enclosing_mount_is_shared(base) or rootless.enclosing_mount_is_shared(Path("/"))
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(base)], check=True)
        assert not rootless.enclosing_mount_is_shared(base / "x")
        subprocess.run(["mount", "--make-shared", str(base)], check=True)
        assert rootless.enclosing_mount_is_shared(base / "x")
    finally:
        subprocess.run(["umount", "-l", str(base)], check=True)


def test_subordinate_ranges_by_name_or_number(tmp_path):
    path = tmp_path / "subuid"
    path.write_text("alice:100000:65536\n# comment\nbob:x:1\n1001:300000:5\nalice:400000:0\n")
    assert rootless.subordinate_ranges(str(path), "alice", 1001) == [(100000, 65536), (300000, 5)]
    assert rootless.subordinate_ranges(str(tmp_path / "missing"), "alice", 1001) == []
    assert str(rootless.namespace_map(1001, [(100000, 10), (300000, 5)])) == "0:1001:1,1:100000:10,11:300000:5"


@pytest.mark.root
def test_an_unusable_dev_fuse_is_a_clear_error_with_the_fix(rootless_user, rootless_package):
    """`nobody` may not open /dev/fuse on this machine (0600, an ACL for the test user only)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    probe = subprocess.run(["/usr/bin/python3", "-I", "-c", "import os; os.open('/dev/fuse', os.O_RDWR)"],
                           user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/", capture_output=True)
    if probe.returncode == 0:
        pytest.skip("/dev/fuse is usable by everyone here (mode 0666): nothing to report")
    base = Path(tempfile.mkdtemp(prefix="sgz-nobody-"))  # pytest's tmp_path is not reachable by nobody
    work = base / "w"
    work.mkdir()
    os.chmod(base, 0o755)
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    try:
        proc = _run_as(nobody, rootless_user.python, rootless_package, work)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == cli.EXIT_MOUNT_FAILED, proc.stderr
    assert "/dev/fuse is not usable by uid 65534" in proc.stderr and "chmod 0666 /dev/fuse" in proc.stderr
    assert "setfacl -m u:nobody:rw /dev/fuse" in proc.stderr


def _run_as(nobody, python: str, package: Path, work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "stargz_store.cli", "--root", str(work / "root"), "--create-mountpoint", str(work / "mnt")],
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/", capture_output=True, text=True,
        timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(work), "PYTHONPATH": str(package)})
