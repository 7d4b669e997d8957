"""`make install` / `make uninstall` into temporary directories, as an operator's node would get them.

What must hold: the program lives in its own venv made from the system's python3 (not the tests'
venv, nothing under a home directory), its link runs (`--version`, `--help`), and the installed
unit passes `systemd-analyze verify`, names installed docs, and starts a daemon that mounts with
the installed example config and says READY=1 as `Type=notify` expects. A second install upgrades
in place and keeps the operator's config; a failed one leaves the installed store working. A
staged install (DESTDIR) writes only the final paths into what it installs. Uninstall leaves
nothing but the config, and PURGE=1 not even that.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.fixtures.sd_notify import notified_daemon
from tests.fixtures.store import REPO_ROOT, is_mounted, private_tmpdir, remove_tmpdir

pytestmark = [pytest.mark.slow]

SYSTEM_PYTHON = Path("/usr/bin/python3")
UNIT = "stargz-store.service"
EXPECTED_VERSION = f"stargz-store {version('stargz-store')}"


@pytest.fixture
def base():
    """A private temp dir (a failing run's mount under it is unmounted before removal)."""
    path = private_tmpdir("stargz-install-test-")
    yield path
    remove_tmpdir(path)


def make(target: str, **variables: str | Path) -> subprocess.CompletedProcess:
    args = [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(["make", "-s", "-C", str(REPO_ROOT), target, *args], capture_output=True, text=True,
                          timeout=900)


def run_installed(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run with an environment free of the tests' venv, from a directory without the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def unit_values(unit_text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_text.splitlines() if line.startswith(f"{key}=")]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def assert_runs(stargz_store: Path, cwd: Path) -> None:
    result = run_installed(stargz_store, "--version", cwd=cwd)
    assert (result.returncode, result.stdout.strip()) == (0, EXPECTED_VERSION), result.stderr
    result = run_installed(stargz_store, "--help", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "stargz-store convert" in result.stdout


def start_and_stop_daemon(stargz_store: Path, unit_text: str) -> None:
    """Run the unit's ExecStart as systemd would (with NOTIFY_SOCKET): READY=1 once mounted, SIGINT unmounts."""
    exec_start = unit_values(unit_text, "ExecStart")[0].split()
    assert exec_start[0] == str(stargz_store.resolve())
    mountpoint = Path(exec_start[-1])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with notified_daemon(exec_start, mountpoint, env=env, cwd="/", stderr=subprocess.PIPE, text=True) as (proc, notify):
        assert is_mounted(mountpoint)
        proc.send_signal(signal.SIGINT)  # the unit's KillSignal
        _, stderr = proc.communicate(timeout=30)
        notify.wait_for("STOPPING=1", proc)
        assert proc.returncode == 0, stderr
        assert not is_mounted(mountpoint)
        assert " WARNING " not in stderr and " ERROR " not in stderr, stderr  # the example config is clean


@pytest.mark.root
def test_install_runs_verifies_upgrades_and_uninstalls(base):
    dirs = {
        "PREFIX": base / "usr/local",
        "OPTDIR": base / "opt/stargz-store",
        "SYSCONFDIR": base / "etc",
        "STATEDIR": base / "var/lib/stargz-store",
    }
    opt = dirs["OPTDIR"]
    link = dirs["PREFIX"] / "bin/stargz-store"
    unit = base / "etc/systemd/system" / UNIT
    config = base / "etc/stargz-store/config.toml"
    docdir = dirs["PREFIX"] / "share/doc/stargz-store"

    result = make("install", **dirs)
    assert result.returncode == 0, result.stdout + result.stderr

    # The program: a venv of the system's interpreter, linked into BINDIR.
    assert link.is_symlink() and os.readlink(link) == str(opt / "bin/stargz-store")
    assert (opt / "bin/python").resolve() == SYSTEM_PYTHON.resolve()
    assert run_installed(opt / "bin/python", "-c", "import stargz_store; print(stargz_store.__file__)",
                         cwd=base).stdout.startswith(str(opt / "lib"))
    assert_runs(link, cwd=base)

    # The unit: verified by systemd, pointing at this install, its docs installed.
    unit_text = unit.read_text()
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "stargz-store" not in verify.stdout + verify.stderr, verify.stdout + verify.stderr
    else:
        pytest.fail("systemd-analyze is missing: `make deps` installs it (Debian package systemd)")
    assert unit_values(unit_text, "Type") == ["notify"]
    assert f"--config={config}" in unit_values(unit_text, "ExecStart")[0]
    docs = [d.removeprefix("file://") for d in unit_values(unit_text, "Documentation")[0].split()]
    assert docs and all(Path(d).is_file() for d in docs), docs
    assert (docdir / "config.toml").read_text() == (REPO_ROOT / "config/config.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o600
    assert str(docdir / "config.toml") in config.read_text()
    start_and_stop_daemon(link, unit_text)

    # An upgrade: the operator's config stays, the program is replaced and runs.
    config.write_text(config.read_text() + "no_background_fetch = true\n")
    operators_config = config.read_text()
    first_python = os.lstat(opt / "bin/python").st_ino
    result = make("install", **dirs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept" in result.stdout and config.read_text() == operators_config
    upgraded_python = os.lstat(opt / "bin/python").st_ino
    assert upgraded_python != first_python  # a new environment, swapped in
    assert not (base / "opt/stargz-store.new").exists() and not (base / "opt/stargz-store.old").exists()
    assert_runs(link, cwd=base)

    # A failed upgrade (no package index): the installed store is left as it was.
    failed = subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "install", *(f"{k}={v}" for k, v in dirs.items()),
         "PIP_INSTALL_FLAGS=--no-index"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""})
    assert failed.returncode != 0
    assert os.lstat(opt / "bin/python").st_ino == upgraded_python
    assert not (base / "opt/stargz-store.new").exists()
    assert_runs(link, cwd=base)

    # The data root the daemon made is the operator's to remove (it may hold a large cache).
    def left_behind() -> list[Path]:
        return [p for p in files_under(base) if dirs["STATEDIR"] not in p.parents]

    result = make("uninstall", **dirs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert left_behind() == [config]
    assert config.read_text() == operators_config
    result = make("uninstall", PURGE="1", **dirs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert left_behind() == []
    assert not config.parent.exists() and not opt.exists() and not docdir.exists()


def test_staged_install_writes_only_final_paths(base):
    destdir = base / "stage"
    config = destdir / "etc/stargz-store/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# the operator's\n")

    result = make("install", DESTDIR=destdir)
    assert result.returncode == 0, result.stdout + result.stderr

    opt = destdir / "opt/stargz-store"
    assert os.readlink(destdir / "usr/local/bin/stargz-store") == "/opt/stargz-store/bin/stargz-store"
    for script in (opt / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.read_bytes().startswith(b"#!"):
            assert script.read_text().startswith("#!/opt/stargz-store/bin/python"), script
    unit_text = (destdir / "etc/systemd/system" / UNIT).read_text()
    assert unit_values(unit_text, "ExecStart")[0].startswith("/opt/stargz-store/bin/stargz-store ")
    assert unit_values(unit_text, "Documentation") == ["file:///usr/local/share/doc/stargz-store/README.md"]
    assert (destdir / "usr/local/share/doc/stargz-store/README.md").is_file()
    assert config.read_text() == "# the operator's\n"
    staged = str(destdir).encode()
    leaks = [p for p in files_under(destdir) if not p.is_symlink() and staged in p.read_bytes()]
    assert leaks == [], f"the staging path is written into {leaks[:5]}"
    # The staged interpreter runs the staged package (a venv's interpreter finds its own site-packages).
    result = run_installed(opt / "bin/python", "-m", "stargz_store.cli", "--version", cwd=base)
    assert (result.returncode, result.stdout.strip()) == (0, EXPECTED_VERSION), result.stderr

    result = make("uninstall", DESTDIR=destdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_under(destdir) == [config]


def test_install_refuses_an_interpreter_without_venv(base):
    result = make("install", DESTDIR=base, SYSTEM_PYTHON="/bin/false")
    assert result.returncode != 0
    assert "needs Python 3.11 or later with venv" in result.stderr
    assert files_under(base) == []
