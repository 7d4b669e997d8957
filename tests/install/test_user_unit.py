"""The rootless user unit (contrib/systemd/user/stargz-store.service): systemd accepts it, and it
starts a rootless store before the user's Podman, with nothing but per-user defaults."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.store import REPO_ROOT

from .test_make_install import unit_values

UNIT = REPO_ROOT / "contrib/systemd/user/stargz-store.service"
INSTALLED_COMMAND = "/usr/local/bin/stargz-store"


def test_the_user_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: `make deps` installs it (Debian package systemd)")
    text = UNIT.read_text()
    assert INSTALLED_COMMAND in text  # where `make install` links the command
    command = Path(sys.executable).parent / "stargz-store"  # this checkout's, for systemd to find
    (tmp_path / UNIT.name).write_text(text.replace(INSTALLED_COMMAND, str(command)))
    verify = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0 and "stargz-store" not in verify.stdout + verify.stderr, verify.stdout + verify.stderr


def test_the_user_unit_runs_a_rootless_store_before_podman():
    text = UNIT.read_text()
    assert unit_values(text, "Type") == ["notify"]
    start = unit_values(text, "ExecStart")[0].split()
    assert start[:2] == [INSTALLED_COMMAND, "--rootless"]
    assert not any(a.startswith(("--root=", "--config=")) or not a.startswith("-") for a in start[1:])
    before = unit_values(text, "Before")[0].split()
    assert {"podman.socket", "podman.service", "default.target"} <= set(before)
    assert unit_values(text, "WantedBy") == ["default.target"]
    assert all("fusermount3 -u" in line for line in unit_values(text, "ExecStopPost") + unit_values(text, "ExecStartPre"))
