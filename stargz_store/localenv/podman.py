"""A private podman for demos, benchmarks and tests: its own storage, never the machine's (not used by the daemon).

`podman_env(tmpdir)` writes containers.conf and storage.conf into `tmpdir` and returns the
environment variables that point podman at them (runc, cgroupfs, ulimits within this machine's
hard limit, overlay storage in `tmpdir`, an empty auth file). Pass `additional_layer_store` to
add `additionallayerstores = ["<path>:ref"]` so podman asks our store for layers.

    env = podman_env(workdir / "pod")
    run_podman("pull", "--tls-verify=false", ref, env=env)
    out = run_podman("run", "--rm", "--net=none", ref, "cat", "/hello.txt", env=env).stdout
    podman_cleanup(env)

With `chroot=ROOT` (a mounted `podman5.ChrootSession.root`) the same configuration is written for
the podman inside that chroot: `tmpdir` and the store's mountpoint must then lie under ROOT, the
files name them as the chroot sees them, and `run_podman` runs `chroot ROOT podman ...`.
"""
from __future__ import annotations

import functools
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
RUNROOT_VAR = "STARGZ_LOCALENV_PODMAN_RUNROOT"  # lets podman_cleanup find the short runroot (host path)
CHROOT_VAR = "STARGZ_LOCALENV_PODMAN_CHROOT"  # set when podman runs in a chroot: its root (host path)
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PodmanError(LocalEnvError):
    """A podman command failed; the message carries its stderr."""


def _hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else hard


def _runroot(tmpdir: Path, parent: str = "/tmp") -> str:
    """A short runroot under `parent`, the same one on every call for `tmpdir` (host path).

    conmon's attach socket lives under runroot; past ~108 bytes of socket path (pytest's tmp dirs
    and benchmark run dirs get there) podman 4.3.1 stalls 20 s in every `podman run`.
    """
    runroot_file = tmpdir / "runroot-path"
    if runroot_file.exists():
        return runroot_file.read_text()
    runroot = tempfile.mkdtemp(prefix="podrun-", dir=parent)
    runroot_file.write_text(runroot)
    return runroot


def seen_path(path: Path | str, chroot: Path | str | None) -> str:
    """A host path as podman sees it: itself on the host; under `chroot`, relative to that root."""
    if chroot is None:
        return str(path)
    root = Path(os.path.abspath(chroot))
    try:
        rel = Path(os.path.abspath(path)).relative_to(root)
    except ValueError:
        raise ValueError(f"{path} is not under the chroot {root}: podman there cannot see it") from None
    return "/" + str(rel).removeprefix(".")


def podman_env(tmpdir: Path | str, additional_layer_store: Path | str | None = None,
               chroot: Path | str | None = None) -> dict[str, str]:
    """Write a private podman configuration into `tmpdir`; return os.environ plus the variables that select it.

    `chroot`: the root of a mounted chroot podman runs in (see the module docstring); paths in
    the files and variables are then the ones the chroot sees.
    """
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    chroot = Path(chroot) if chroot is not None else None
    seen = functools.partial(seen_path, chroot=chroot)
    nofile = _hard_nofile()
    containers_conf = tmpdir / "containers.conf"
    engine = (
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    containers = f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=1000:1000"]\n'
    if chroot is not None:
        # Podman 5 in the chroot: no network stack of its own; image copies go to the private tmp, not /var/tmp.
        containers += 'netns = "none"\n'
        engine += f'image_copy_tmp_dir = "{seen(tmpdir / "tmp")}"\n'
    containers_conf.write_text(containers + engine)
    runroot = _runroot(tmpdir, "/tmp" if chroot is None else str(chroot / "run"))
    text = (
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{seen(tmpdir / "graph")}"\n'
        f'runroot = "{seen(runroot)}"\n'
    )
    if additional_layer_store is not None:
        text += f'[storage.options]\nadditionallayerstores = ["{seen(additional_layer_store)}:ref"]\n'
    storage_conf = tmpdir / "storage.conf"
    storage_conf.write_text(text)
    auth_file = tmpdir / "auth.json"
    if not auth_file.exists():
        auth_file.write_text('{"auths": {}}\n')
    (tmpdir / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update({
        "CONTAINERS_CONF": seen(containers_conf),
        "CONTAINERS_STORAGE_CONF": seen(storage_conf),
        "REGISTRY_AUTH_FILE": seen(auth_file),
        "TMPDIR": seen(tmpdir / "tmp"),
        RUNROOT_VAR: runroot,
    })
    if chroot is not None:
        env.update({CHROOT_VAR: str(chroot), "PATH": CHROOT_PATH, "PODMAN_IGNORE_CGROUPSV1_WARNING": "1"})
    return env


def host_path(env: dict[str, str], path: str) -> Path:
    """A path as podman (of `env`) sees it -> the same file on the host."""
    chroot = env.get(CHROOT_VAR)
    return Path(chroot) / path.lstrip("/") if chroot else Path(path)


def podman_command(env: dict[str, str], *args: str) -> list[str]:
    """The argv that runs podman of `env` (from `podman_env`): `podman ARGS` or `chroot ROOT podman ARGS`."""
    if "CONTAINERS_STORAGE_CONF" not in env:
        raise ValueError("env must come from podman_env() so the machine's own storage is never touched")
    chroot = env.get(CHROOT_VAR)
    return (["chroot", chroot] if chroot else []) + ["podman", *args]


def run_podman(*args: str, env: dict[str, str], timeout: float = DEFAULT_TIMEOUT, check: bool = True,
               input: str | None = None, preexec_fn: PreexecFn | None = None) -> subprocess.CompletedProcess[str]:
    """Run podman with `env` (from `podman_env`); raise `PodmanError` with its stderr when `check` and it fails."""
    proc = subprocess.run(podman_command(env, *args), env=env, capture_output=True, text=True, timeout=timeout,
                          input=input, preexec_fn=preexec_fn)
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
    roots = [host_path(env, env["CONTAINERS_STORAGE_CONF"]).parent] + ([Path(runroot)] if runroot else [])
    unmount_under(*roots)
    if runroot:
        shutil.rmtree(runroot, ignore_errors=True)
