"""A private podman for demos, benchmarks and tests: its own storage, never the machine's (not used by the daemon).

`podman_env(tmpdir)` writes containers.conf and storage.conf into `tmpdir` and returns the
environment variables that point podman at them (runc, cgroupfs, ulimits within this machine's
hard limit, overlay storage in `tmpdir`, an empty auth file). Pass `additional_layer_store` to
add `additionallayerstores = ["<path>:ref"]` so podman asks our store for layers.

    env = podman_env(workdir / "pod")
    run_podman("pull", "--tls-verify=false", ref, env=env)
    out = run_podman("run", "--rm", "--net=none", ref, "cat", "/hello.txt", env=env).stdout
    podman_cleanup(env)
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import LocalEnvError
from .procs import PreexecFn, unmount_under

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 180.0
RUNROOT_VAR = "STARGZ_LOCALENV_PODMAN_RUNROOT"  # lets podman_cleanup find the short runroot


class PodmanError(LocalEnvError):
    """A podman command failed; the message carries its stderr."""


def _hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else hard


def _runroot(tmpdir: Path) -> str:
    """A short runroot under /tmp, the same one on every call for `tmpdir`.

    conmon's attach socket lives under runroot; past ~108 bytes of socket path (pytest's tmp dirs
    and benchmark run dirs get there) podman 4.3.1 stalls 20 s in every `podman run`.
    """
    runroot_file = tmpdir / "runroot-path"
    if runroot_file.exists():
        return runroot_file.read_text()
    runroot = tempfile.mkdtemp(prefix="podrun-", dir="/tmp")
    runroot_file.write_text(runroot)
    return runroot


def podman_env(tmpdir: Path | str, additional_layer_store: Path | str | None = None) -> dict[str, str]:
    """Write a private podman configuration into `tmpdir`; return os.environ plus the variables that select it."""
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    nofile = _hard_nofile()
    containers_conf = tmpdir / "containers.conf"
    containers_conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=1000:1000"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    runroot = _runroot(tmpdir)
    text = (
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{tmpdir / "graph"}"\n'
        f'runroot = "{runroot}"\n'
    )
    if additional_layer_store is not None:
        text += f'[storage.options]\nadditionallayerstores = ["{additional_layer_store}:ref"]\n'
    storage_conf = tmpdir / "storage.conf"
    storage_conf.write_text(text)
    auth_file = tmpdir / "auth.json"
    if not auth_file.exists():
        auth_file.write_text('{"auths": {}}\n')
    (tmpdir / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update({
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
        "REGISTRY_AUTH_FILE": str(auth_file),
        "TMPDIR": str(tmpdir / "tmp"),
        RUNROOT_VAR: runroot,
    })
    return env


def run_podman(*args: str, env: dict[str, str], timeout: float = DEFAULT_TIMEOUT, check: bool = True,
               input: str | None = None, preexec_fn: PreexecFn | None = None) -> subprocess.CompletedProcess[str]:
    """Run podman with `env` (from `podman_env`); raise `PodmanError` with its stderr when `check` and it fails."""
    if "CONTAINERS_STORAGE_CONF" not in env:
        raise ValueError("run_podman(): env must come from podman_env() so the machine's own storage is never touched")
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, input=input,
                          preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
    return proc


def podman_reset(env: dict[str, str], timeout: float = 60.0, preexec_fn: PreexecFn | None = None) -> None:
    """No containers, no images: the next pull starts from nothing."""
    for args in (("rm", "-af"), ("rmi", "-af")):
        try:
            run_podman(*args, env=env, check=False, timeout=timeout, preexec_fn=preexec_fn)
        except subprocess.TimeoutExpired:
            log.warning("podman %s timed out after %s s", " ".join(args), timeout)


def podman_cleanup(env: dict[str, str], timeout: float = 60.0, preexec_fn: PreexecFn | None = None) -> None:
    """Remove containers and images of this private podman, unmount what it left and delete its runroot."""
    podman_reset(env, timeout=timeout, preexec_fn=preexec_fn)
    runroot = env.get(RUNROOT_VAR)
    roots = [Path(env["CONTAINERS_STORAGE_CONF"]).parent] + ([Path(runroot)] if runroot else [])
    unmount_under(*roots)
    if runroot:
        shutil.rmtree(runroot, ignore_errors=True)
