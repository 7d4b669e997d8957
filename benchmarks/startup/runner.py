"""One measured start of one image in one mode, HelloBench style: pull, create, run to first output.

Before every run the state is cold: no containers or images in podman, the
store stopped with its root wiped (restarted for lazy modes), page cache
dropped. `warm` keeps (or pulls, untimed) the legacy image and so measures
create + run only, still after the page cache is dropped.
"""
from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import leftovers, podman
from .link import Link
from .registry import Registry
from .store import Store
from .variants import StoreVariant, store_config

log = logging.getLogger(__name__)

# `estargz`: optimized by `stargz-store optimize` (the workload recorded through our store, issue 17);
# `estargz-strace`: optimized with the record `strace` made in a chroot (how the benchmark did it before).
MODES = ("legacy", "estargz-noopt", "estargz", "estargz-strace", "warm")
LAZY_MODES = ("estargz-noopt", "estargz", "estargz-strace")
RUN_TIMEOUT = 600.0


def repo_tag(image: str, mode: str) -> tuple[str, str]:
    """Where each variant lives in the registry; `warm` runs the legacy image."""
    return f"bench/{image}", "legacy" if mode == "warm" else mode


@dataclass
class RunResult:
    image: str
    mode: str
    link: str
    run: int
    config: str = ""  # the store variant of a lazy run ("" when no store runs)
    ok: bool = False
    error: str = ""
    pull_s: float = 0.0
    create_s: float = 0.0
    run_s: float = 0.0  # start to first output line
    total_s: float = 0.0
    exit_s: float = 0.0  # start to workload exit
    link_bytes_first_output: int = 0  # IP bytes from the registry side until first output
    link_bytes_exit: int = 0
    registry_bytes_first_output: int = 0  # HTTP body bytes of requests completed before first output
    registry_bytes: int = 0  # HTTP body bytes the registry logged during the run (pull..exit)
    registry_blob_gets: int = 0
    registry_blob_gets_first_output: int = 0
    daemon_cpu_s: float | None = None
    daemon_peak_rss_bytes: int | None = None  # VmHWM of the store (fresh each run) at workload exit
    store_requests: int | None = None  # the store's own counters at exit, summed over the layers
    store_fetched_bytes: int | None = None
    # of those, what background fetch brought (blob bytes, as fetched_bytes): it runs
    # whenever the container has made no request for a quiet period, so a workload that computes
    # for seconds without touching a file (a compiler generating code) sees it before its first
    # output, more the slower the machine; what is left came from reads, prefetch and policies
    store_background_bytes: int | None = None
    first_line: str = ""
    prepare_s: float = 0.0  # harness time before the pull: resets, store restart, dropping caches (not measured)
    store_stats: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return asdict(self)


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:  # not fatal: the figures are then warmer than they should be
        log.warning("cannot drop the page cache: %s", e)


@dataclass
class Environment:
    """The long-lived parts a run uses."""

    link: Link
    registry: Registry
    plain_env: dict[str, str]
    lazy_env: dict[str, str]
    store: Store
    link_name: str


def _first_output(cid: str, env: dict[str, str], marker: str, stderr_path: Path,
                  at_first: Callable[[], None]) -> tuple[float, float, str]:
    """Start the container attached; (seconds to first stdout line, seconds to exit, that line).

    `at_first` runs the moment the first line arrives (to read the byte counters then).
    """
    with open(stderr_path, "ab") as err:
        start = time.monotonic()
        proc = subprocess.Popen(["podman", "start", "--attach", cid], env=env, stdout=subprocess.PIPE, stderr=err,
                                preexec_fn=leftovers.die_with_parent())
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            first = time.monotonic() - start
            at_first()
            proc.stdout.read()
            rc = proc.wait(RUN_TIMEOUT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finished = time.monotonic() - start
    text = line.decode(errors="replace").strip()
    if rc != 0:
        raise RuntimeError(f"workload exited with {rc}; first line {text!r}; see {stderr_path}")
    if marker not in text:
        raise RuntimeError(f"first output line {text!r} lacks {marker!r}; see {stderr_path}")
    return first, finished, text


def _layer_sum(stats: dict | None, counter: str) -> int | None:
    """`counter` summed over the layers of the store's stats, None where no layer has it."""
    layers = (stats or {}).get("layers") or {}
    values = [v[counter] for v in layers.values() if isinstance(v, dict) and counter in v]
    return sum(values) if values else None


def _store_totals(stats: dict | None) -> tuple[int | None, int | None, int | None]:
    """(requests, fetched bytes, background-fetched bytes) summed over the layers of the store's stats."""
    return (_layer_sum(stats, "requests"), _layer_sum(stats, "fetched_bytes"),
            _layer_sum(stats, "background_bytes"))


def measure(envs: Environment, image: str, mode: str, run: int, marker: str, log_dir: Path,
            variant: StoreVariant | None = None) -> RunResult:
    """One cold start; `variant` is the store configuration of a lazy mode (ignored for the others)."""
    lazy = mode in LAZY_MODES
    if lazy and variant is None:
        raise ValueError(f"a lazy mode ({mode}) needs a store variant")
    result = RunResult(image, mode, envs.link_name, run, config=variant.name if lazy and variant else "")
    env = envs.lazy_env if lazy else envs.plain_env
    repo, tag = repo_tag(image, mode)
    ref = f"{envs.registry.host}/{repo}:{tag}"
    prepare_start = time.monotonic()
    try:
        podman.reset(envs.lazy_env)
        envs.store.wipe()
        if mode == "warm":
            # the legacy run left the image behind (lazy runs never touch the plain storage): reuse it
            # instead of a second, untimed full pull
            podman.podman("rm", "-af", env=env, check=False)
            if podman.podman("image", "exists", ref, env=env, check=False).returncode != 0:
                podman.podman("pull", "-q", "--tls-verify=false", ref, env=env)
        elif mode == "legacy":
            podman.reset(envs.plain_env)
        drop_caches()
        if lazy:
            assert variant is not None
            envs.store.start(store_config(envs.registry.host, noprefetch=(mode == "estargz-noopt"), variant=variant))
        envs.link.check_alive()
        rx0 = envs.link.received_bytes()
        mark = envs.registry.log_mark()

        t0 = time.monotonic()
        result.prepare_s = t0 - prepare_start
        if mode != "warm":
            podman.podman("pull", "-q", "--tls-verify=false", ref, env=env)
        t1 = time.monotonic()
        cid = podman.podman("create", "--network=none", ref, env=env).stdout.strip().splitlines()[-1]
        t2 = time.monotonic()
        at_first: dict[str, int] = {}

        def read_counters() -> None:
            at_first["rx"] = envs.link.received_bytes()
            at_first["log"] = envs.registry.log_mark()

        first, finished, line = _first_output(cid, env, marker, log_dir / "workload.stderr", read_counters)
        result.link_bytes_exit = envs.link.received_bytes() - rx0
        result.link_bytes_first_output = at_first["rx"] - rx0
        result.registry_bytes_first_output, result.registry_blob_gets_first_output = \
            envs.registry.fetched_between(mark, at_first["log"])
        result.pull_s, result.create_s, result.run_s = t1 - t0, t2 - t1, first
        result.total_s = result.pull_s + result.create_s + result.run_s
        result.exit_s = finished
        result.first_line = line
        result.registry_bytes, result.registry_blob_gets = envs.registry.fetched_between(mark)
        if lazy:
            usage = envs.store.usage()
            result.daemon_cpu_s, result.daemon_peak_rss_bytes = usage.cpu_seconds, usage.peak_rss_bytes
            result.store_stats = envs.store.stats()
            result.store_requests, result.store_fetched_bytes, result.store_background_bytes = \
                _store_totals(result.store_stats)
            if result.store_stats is not None and not result.store_stats.get("layers"):
                raise RuntimeError("the store served no layer: podman fell back to a full pull")
        result.ok = True
    except Exception as e:  # one failed run must not lose the others' figures
        log.error("%s/%s%s run %d failed: %s", image, mode, f" [{result.config}]" if result.config else "", run, e)
        result.error = str(e)[-2000:]
    return result
