"""A private podman for the benchmark (same settings as tests/fixtures/podman.py, copied: benchmarks stand alone).

runc, cgroupfs, ulimits within this machine's hard limit, overlay storage under
the benchmark's run directory, an empty auth file; with `additional_layer_store`
podman asks our store for layers before downloading them.
"""
from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

from . import leftovers

DEFAULT_TIMEOUT = 900.0


class PodmanError(RuntimeError):
    """A podman command failed; the message carries its stderr."""


def _hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else hard


def podman_env(tmpdir: Path, additional_layer_store: Path | None = None) -> dict[str, str]:
    tmpdir.mkdir(parents=True, exist_ok=True)
    nofile = _hard_nofile()
    (tmpdir / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=1000:1000"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    text = f'[storage]\ndriver = "overlay"\ngraphroot = "{tmpdir / "graph"}"\nrunroot = "{tmpdir / "run"}"\n'
    if additional_layer_store is not None:
        text += f'[storage.options]\nadditionallayerstores = ["{additional_layer_store}:ref"]\n'
    (tmpdir / "storage.conf").write_text(text)
    (tmpdir / "auth.json").write_text('{"auths": {}}\n')
    (tmpdir / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update({
        "CONTAINERS_CONF": str(tmpdir / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(tmpdir / "storage.conf"),
        "REGISTRY_AUTH_FILE": str(tmpdir / "auth.json"),
        "TMPDIR": str(tmpdir / "tmp"),
    })
    return env


def podman(*args: str, env: dict[str, str], timeout: float = DEFAULT_TIMEOUT,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    if "CONTAINERS_STORAGE_CONF" not in env:
        raise ValueError("env must come from podman_env(): the machine's own podman storage is never touched")
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=leftovers.die_with_parent())
    if check and proc.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
    return proc


def reset(env: dict[str, str]) -> None:
    """No containers, no images: the next pull starts from nothing."""
    for args in (("rm", "-af"), ("rmi", "-af")):
        try:
            podman(*args, env=env, check=False, timeout=120)
        except subprocess.TimeoutExpired:
            pass


def cleanup(env: dict[str, str]) -> None:
    reset(env)
    leftovers.unmount_all_under(Path(env["CONTAINERS_STORAGE_CONF"]).parent)
