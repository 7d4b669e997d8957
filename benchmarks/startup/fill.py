"""Putting each image's variants into the registry: the plain gzip image and the two conversions.

`legacy` is the built OCI layout copied as is (skopeo keeps the gzip blobs);
`estargz-noopt` is our converter with no record; `estargz` is `stargz-store optimize`
(the workload run once through a private recording store and Podman, then converted with
what it read first); `estargz-strace` is our converter with the record strace made at build
time. A variant is pushed again only when its image or the converter's source changed, so
reruns skip the slow part.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import leftovers
from .images import TAG, BuiltImage
from .registry import Registry
from .rootfs import NICE
from .runner import repo_tag

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PUSHED_MODES = ("legacy", "estargz-noopt", "estargz", "estargz-strace")
OPTIMIZE_TIMEOUT_S = 300  # the workloads exit by themselves within seconds; a hang is stopped here
PROBE_REPO = "bench/probe"
PROBE_SIZE = 32 * 1024 * 1024


class FillError(RuntimeError):
    """An image variant could not be pushed or converted."""


def converter_fingerprint() -> str:
    """Changes whenever the converter or the format code it uses changes."""
    h = hashlib.sha256()
    for sub in ("convert", "formats", "optimize"):
        for path in sorted((REPO_ROOT / "stargz_store" / sub).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str, token: str, log_path: Path) -> float:
    """Run a push niced, in its own process group, output to `log_path` (a pipe could be held open by
    helper processes of the pusher). Recorded under `token` (its destination) for a crashed run's sweep."""
    start = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([*NICE, *cmd], stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True, preexec_fn=leftovers.die_with_parent())
    leftovers.record_pid(proc.pid, token)  # nice execs the command: the pid is the pusher itself
    try:
        proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # the pusher and any helpers it forked
        proc.wait()
        raise
    if proc.returncode:
        output = log_path.read_text(errors="replace")
        raise FillError(f"{what} failed ({proc.returncode}): {output.strip()[-2000:]}")
    return time.monotonic() - start


def push_variant(image: BuiltImage, mode: str, registry: Registry, log_dir: Path) -> float:
    """Push one variant; returns the seconds it took (conversion time for the eStargz ones)."""
    repo, tag = repo_tag(image.name, mode)
    src, dst = f"oci:{image.layout}:{TAG}", f"docker://{registry.host}/{repo}:{tag}"
    if mode == "legacy":
        return _run(["skopeo", "copy", "--insecure-policy", "-q", "--dest-tls-verify=false", src, dst],
                    f"skopeo copy {image.name}", dst, log_dir / f"push-{image.name}-{mode}.log")
    if mode == "estargz":
        cmd = [sys.executable, "-m", "stargz_store.cli", "optimize", "--timeout", str(OPTIMIZE_TIMEOUT_S),
               "--record-out", str(log_dir / f"record-{image.name}-optimize.jsonl")]
        return _run([*cmd, src, dst], f"optimize {image.name}", dst, log_dir / f"push-{image.name}-{mode}.log")
    cmd = [sys.executable, "-m", "stargz_store.cli", "convert", "--format", "estargz"]
    if mode == "estargz-strace":
        cmd += ["--record-in", str(image.record)]
    return _run([*cmd, src, dst], f"convert {image.name} ({mode})", dst, log_dir / f"push-{image.name}-{mode}.log")


def push_probe(registry: Registry) -> str:
    """A random blob for the throughput probe; returns its digest."""
    data = os.urandom(PROBE_SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"http://{registry.host}/v2/{PROBE_REPO}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start, timeout=30) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry.host}{location}"
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(put, timeout=120).close()
    return digest


def fill(images: list[BuiltImage], registry: Registry, state_path: Path) -> dict:
    """Make sure every variant is in the registry; returns {"conversions": ..., "sizes": ..., "probe": digest}."""
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    fingerprint = converter_fingerprint()
    timings: dict[str, float] = state.get("timings", {})
    for image in images:
        for mode in PUSHED_MODES:
            repo, tag = repo_tag(image.name, mode)
            name = f"{repo}:{tag}"
            want = {"image": image.key, "converter": None if mode == "legacy" else fingerprint}
            if state.get("pushed", {}).get(name) == want and registry.has_manifest(repo, tag):
                continue
            log.warning("pushing %s", name)
            timings[name] = push_variant(image, mode, registry, registry.work_dir)
            state.setdefault("pushed", {})[name] = want
            state["timings"] = timings
            state_path.write_text(json.dumps(state, indent=1))
    probe = state.get("probe")
    if not probe or not _blob_exists(registry, probe):
        state["probe"] = probe = push_probe(registry)
        state_path.write_text(json.dumps(state, indent=1))
    sizes = {}
    for image in images:
        for mode in PUSHED_MODES:
            repo, tag = repo_tag(image.name, mode)
            manifest = registry.manifest(repo, tag)
            sizes[f"{image.name}:{mode}"] = sum(layer["size"] for layer in manifest["layers"])
    return {"push_seconds": timings, "compressed_bytes": sizes, "probe": probe}


def _blob_exists(registry: Registry, digest: str) -> bool:
    request = urllib.request.Request(f"http://{registry.host}/v2/{PROBE_REPO}/blobs/{digest}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=10).close()
        return True
    except OSError:
        return False
