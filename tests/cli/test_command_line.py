"""The `stargz-store` command line, run as a user runs it: the console script of the test venv.

What must hold: `--help` lists the daemon mode and every command with one line each; `--version`
is the package's; a MOUNTPOINT that is not an existing directory is a usage error (exit 2) unless
`--create-mountpoint` is given, so a stray word never becomes a mount in the current directory;
none of `--help`, `--version` or a usage error creates the data root (by default /var/lib/stargz-store).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from stargz_store.cli import COMMANDS
from tests.fixtures.sd_notify import notified_daemon
from tests.fixtures.store import is_mounted, private_tmpdir, remove_tmpdir

STARGZ_STORE = Path(sys.executable).with_name("stargz-store")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    assert STARGZ_STORE.exists(), f"{STARGZ_STORE} missing: the tests run from the venv `make deps` makes"
    return subprocess.run([str(STARGZ_STORE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def workdir():
    """The current directory of the runs: private, and anything a failing run mounted in it is
    unmounted before it is removed (the code before `--create-mountpoint` mounted a stray word there)."""
    base = private_tmpdir()
    yield base
    remove_tmpdir(base)


def test_help_lists_the_daemon_mode_and_every_command_with_one_line_each(tmp_path):
    for flag in ("--help", "-h"):
        result = run(flag, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        daemon = [line for line in lines if re.match(r"^\s+stargz-store \[flags\] MOUNTPOINT\s+\S", line)]
        assert len(daemon) == 1, result.stdout
        names = {c.name for c in COMMANDS}
        assert "convert" in names
        for command in COMMANDS:
            rows = [line for line in lines if re.match(rf"^\s+stargz-store {re.escape(command.name)} ", line)]
            assert len(rows) == 1, f"{command.name}: {result.stdout}"
            assert command.summary in rows[0]
        assert "--create-mountpoint" in result.stdout and "--version" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_every_listed_command_runs_with_its_own_help(tmp_path):
    for command in COMMANDS:
        result = run(command.name, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"stargz-store {command.name}" in result.stdout


def test_version_is_the_installed_package_version(tmp_path):
    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stargz-store {version('stargz-store')}"


def test_a_stray_word_is_not_taken_for_a_mountpoint(workdir):
    root = workdir / "root"
    result = run("--root", str(root), "version", cwd=workdir, timeout=20)
    assert result.returncode == 2
    assert "mountpoint 'version' does not exist" in result.stderr
    assert "--create-mountpoint" in result.stderr and "stargz-store --help" in result.stderr
    assert list(workdir.iterdir()) == []  # neither ./version nor the root


def test_a_mountpoint_that_is_a_file_or_under_a_missing_directory_is_refused(workdir):
    a_file = workdir / "file"
    a_file.write_text("")
    root = workdir / "root"
    for mountpoint, message in ((a_file, "is not a directory"), (workdir / "missing" / "mnt", "does not exist")):
        result = run("--root", str(root), str(mountpoint), cwd=workdir, timeout=20)
        assert result.returncode == 2
        assert message in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["file"]


@pytest.mark.root
def test_help_version_and_usage_errors_do_not_create_the_default_root(tmp_path):
    """In a private mount namespace with an empty tmpfs on /var/lib, so the check sees exactly what the
    command created there (the host's /var/lib is never touched)."""
    script = 'mount -t tmpfs stargz-test /var/lib || exit 99; "$@"; echo "rc=$?"; ls -A /var/lib'
    for args in (["--help"], ["--version"], ["version"], [], ["--no-such-flag", "/"], ["--log-level", "loud", "/"]):
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                                 str(STARGZ_STORE), *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stderr
        out = result.stdout.splitlines()
        rc_line = next(line for line in out if line.startswith("rc="))
        assert rc_line == ("rc=0" if args and args[0] in ("--help", "--version") else "rc=2"), (args, result.stderr)
        assert out[out.index(rc_line) + 1:] == [], f"{args}: created {out[out.index(rc_line) + 1:]} in /var/lib"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.root
def test_create_mountpoint_creates_the_missing_directory_and_mounts():
    base = private_tmpdir()
    mountpoint = base / "a" / "b" / "mnt"
    config = base / "config.toml"
    config.write_text("")
    command = [str(STARGZ_STORE), "--root", str(base / "root"), "--config", str(config), "--create-mountpoint",
               str(mountpoint)]
    try:
        with notified_daemon(command, mountpoint, stderr=subprocess.DEVNULL) as (proc, _):
            assert is_mounted(mountpoint)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
            assert not is_mounted(mountpoint)
    finally:
        remove_tmpdir(base)
