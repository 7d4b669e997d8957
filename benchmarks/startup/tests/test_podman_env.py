"""The benchmark's podman configuration: a short runroot, whatever the run directory's length."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from benchmarks.startup import podman

# Measured on this machine: with a runroot path over about 50 characters podman 4.3.1 stalls
# 20 s in every `podman run` (conmon's socket path gets too long), which would swamp the timings.
MAX_RUNROOT = 50


def _runroot(env: dict[str, str]) -> str:
    text = Path(env["CONTAINERS_STORAGE_CONF"]).read_text()
    match = re.search(r'^runroot = "(.*)"$', text, re.MULTILINE)
    assert match, text
    return match.group(1)


def test_runroot_is_short_and_outside_a_long_run_dir(tmp_path):
    run_dir = tmp_path / ("deep-benchmark-run-directory-" * 3) / "podman-lazy"
    env = podman.podman_env(run_dir, additional_layer_store=run_dir / "mnt")
    runroot = _runroot(env)
    try:
        assert not runroot.startswith(str(run_dir))
        assert len(runroot) <= MAX_RUNROOT < len(str(run_dir))
        assert Path(runroot).is_dir()
        assert f'additionallayerstores = ["{run_dir / "mnt"}:ref"]' in Path(env["CONTAINERS_STORAGE_CONF"]).read_text()
        assert _runroot(podman.podman_env(run_dir)) == runroot  # the same on every call: cleanup finds it
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
