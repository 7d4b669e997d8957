"""One fleet run: N stores (each its own root and mount) read the same files at one barrier.

Modes: `direct` (the stores ask the origin), `cold` (a fresh pull-through mirror configured as
`[[resolver.host."ORIGIN".mirrors]]`), `warm` (the same, pre-warmed with the image).
Per node: time from the barrier to the last byte of the workload (time-to-ready), read errors,
and the store's own counters; per run: origin egress (link bytes, relay requests) and mirror
egress. With background fetch on, the run lasts until every node's background fetch has ended.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.procstat import tree_cpu_seconds
from benchmarks.startup.leftovers import die_with_parent
from stargz_store.localenv.counting_proxy import NODE_HEADER
from stargz_store.localenv.procs import is_mounted
from stargz_store.localenv.store import PACKAGE_PARENT, StoreError, StoreProcess

from .images import FleetImage
from .site import Egress, Mirror, OriginSite

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
READ_TIMEOUT = 600.0
BACKGROUND_TIMEOUT = 900.0


@dataclass
class RunResult:
    image: str
    nodes: int
    mode: str
    background: bool
    needed_per_node: int
    image_bytes: int
    origin: Egress
    mirror: Egress | None
    ttr: list[float]
    errors: list[str]
    verify_failures: int
    fetch_errors: int
    background_states: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    # CPU seconds spent from the barrier to the last reader's end, by part of the site: where the
    # time-to-ready went on a machine that runs every node, the mirror and the link at once
    cpu_while_reading: dict[str, float] = field(default_factory=dict)

    @property
    def ttr_p50(self) -> float:
        return statistics.median(self.ttr) if self.ttr else float("nan")

    @property
    def ttr_max(self) -> float:
        return max(self.ttr) if self.ttr else float("nan")

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(ttr_p50=self.ttr_p50, ttr_max=self.ttr_max)
        return out


class FleetStore(StoreProcess):
    """A store process; with `source_tree`, the code of another checkout (to compare versions).
    Started in two steps, so N of them start at once: `spawn()` (on the main thread), then
    `wait_mounted()`."""

    source_tree: Path | None = None

    def command(self) -> list[str]:
        cmd = super().command()
        if self.source_tree is None:
            return cmd
        boot = (f"import sys, runpy; sys.path.insert(0, {str(self.source_tree)!r}); "
                "sys.argv[0] = 'stargz-store'; runpy.run_module('stargz_store.cli', run_name='__main__')")
        return [cmd[0], "-c", boot, *cmd[3:]]

    def spawn(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=logf, cwd=str(PACKAGE_PARENT), env=env,
                                         preexec_fn=self.preexec_fn)

    def wait_mounted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise StoreError(f"stargz-store exited:\n{self.log_tail()}")
            if is_mounted(self.mountpoint):
                try:
                    os.listdir(self.mountpoint)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise StoreError(f"stargz-store did not mount within {timeout} s:\n{self.log_tail()}")


def store_config(origin_host: str, mirror_host: str | None, background: bool, node: str = "") -> str:
    """`node`: sent to the origin in the relay's X-Fleet-Node header, so its log tells the nodes apart."""
    text = (f"no_background_fetch = {'false' if background else 'true'}\n"
            "[blob]\nfetching_timeout_sec = 120\n" + os.environ.get("STARGZ_FLEET_BLOB_CONFIG", "")
            + "[store]\nresolve_timeout_sec = 120\n"
            f'[resolver.host."{origin_host}"]\ninsecure = true\n')
    if node:
        text += f'header = {{ "{NODE_HEADER}" = "{node}" }}\n'
    if mirror_host:
        text += f'[[resolver.host."{origin_host}".mirrors]]\nhost = "{mirror_host}"\ninsecure = true\n'
    return text + os.environ.get("STARGZ_FLEET_EXTRA_CONFIG", "")


def _start_stores(work: Path, n: int, config: Callable[[str], str], source_tree: Path | None) -> list[FleetStore]:
    stores: list[FleetStore] = []
    for i in range(n):
        base = work / f"node{i:02d}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        (base / "config.toml").write_text(config(f"node{i:02d}"))
        store = FleetStore(root=base / "root", mountpoint=base / "mnt", config_path=base / "config.toml",
                           log_path=base / "store.log", log_level="info", preexec_fn=die_with_parent())
        store.source_tree = source_tree
        stores.append(store)
    try:
        for store in stores:  # forked here, on the main thread: PDEATHSIG follows the forking thread
            store.spawn()
        for store in stores:
            store.wait_mounted(timeout=180)
    except BaseException:
        _stop_stores(stores)
        raise
    return stores


def _stop_stores(stores: list[FleetStore]) -> None:
    threads = [threading.Thread(target=s.stop, kwargs={"timeout": 30, "unmount_leftover": True}) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _spawn_readers(work: Path, stores: list[FleetStore], ref: str, image: FleetImage) -> list[subprocess.Popen]:
    files = [[layer.result["digest"], path] for layer in image.layers for path in layer.read]
    readers = []
    for i, store in enumerate(stores):
        plan = work / f"node{i:02d}" / "plan.json"
        plan.write_text(json.dumps({"mount": str(store.mountpoint), "ref": ref, "files": files}))
        readers.append(subprocess.Popen([sys.executable, "-m", "benchmarks.fleet.reader", str(plan)], cwd=REPO_ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        preexec_fn=die_with_parent()))
    for r in readers:
        assert r.stdout is not None
        if r.stdout.readline().strip() != "ready":
            raise RuntimeError("a reader did not start")
    return readers


def _background_done(stores: list[FleetStore], timeout: float) -> dict[str, int]:
    """Wait until every open layer's background fetch has ended; the count of end states."""
    deadline = time.monotonic() + timeout
    while True:
        states: dict[str, int] = {}
        for store in stores:
            try:
                layers = store.stats(timeout=30).get("layers", {})
            except StoreError:
                states["no stats"] = states.get("no stats", 0) + 1
                continue
            for layer in layers.values():
                state = layer.get("background_state", "?")
                states[state] = states.get(state, 0) + 1
        if not any(s in ("running", "not started") for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def run_once(work: Path, site: OriginSite, image: FleetImage, ref: str, nodes: int, mode: str, background: bool,
             warm_mirror: Mirror | None, source_tree: Path | None = None) -> RunResult:
    began = time.monotonic()
    mirror: Mirror | None = None
    if mode == "cold":
        mirror = Mirror(work, "mirror-cold", site.host)
        shutil.rmtree(mirror.work, ignore_errors=True)
        mirror.start()
    elif mode == "warm":
        mirror = warm_mirror
    stores: list[FleetStore] = []
    readers: list[subprocess.Popen] = []
    try:
        stores = _start_stores(work, nodes, functools.partial(store_config, site.host, mirror.host if mirror else None,
                                                              background), source_tree)
        readers = _spawn_readers(work, stores, ref, image)
        site.wait_quiet(quiet=1.0, timeout=30)
        origin_mark = site.mark()
        mirror_mark = mirror.mark() if mirror else 0
        cpu_mark = _site_cpu(stores, site, mirror)
        for r in readers:  # the barrier
            assert r.stdin is not None
            r.stdin.write("go\n")
            r.stdin.flush()
        results = []
        for r in readers:
            assert r.stdout is not None
            line = r.stdout.readline()
            r.wait(timeout=READ_TIMEOUT)
            results.append(json.loads(line) if line.strip() else {"seconds": float("nan"), "errors": ["no answer"]})
        cpu_end = _site_cpu(stores, site, mirror)
        keep = work / "logs" / _run_name(image, background, nodes, mode)
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "readers.json").write_text(json.dumps(results))
        cpu_while_reading = {k: round(cpu_end.get(k, 0.0) - v, 2) for k, v in cpu_mark.items()}
        states = _background_done(stores, BACKGROUND_TIMEOUT) if background else {}
        site.wait_quiet()
        origin = site.since(origin_mark)
        _keep_origin_log(work, site, origin_mark, _run_name(image, background, nodes, mode))
        mirror_egress = mirror.since(mirror_mark) if mirror else None
        verify = fetch = 0
        for store in stores:
            try:
                for layer in store.stats(timeout=30).get("layers", {}).values():
                    verify += layer.get("verify_failures", 0)
                    fetch += layer.get("fetch_errors", 0)
            except StoreError:
                pass
        return RunResult(
            image=image.name, nodes=nodes, mode=mode, background=background, needed_per_node=image.needed,
            image_bytes=image.size, origin=origin, mirror=mirror_egress, ttr=[r["seconds"] for r in results],
            errors=[e for r in results for e in r["errors"]], verify_failures=verify, fetch_errors=fetch,
            background_states=states, wall_seconds=time.monotonic() - began, cpu_while_reading=cpu_while_reading)
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait()
        _stop_stores(stores)
        _keep_logs(work, stores, _run_name(image, background, nodes, mode))
        if mode == "cold" and mirror is not None:
            mirror.stop()


def _site_cpu(stores: list[FleetStore], site: OriginSite, mirror: Mirror | None) -> dict[str, float]:
    """CPU seconds so far of the stores (holders and servers), the mirror and the origin's side
    (link emulator, relay, registry)."""
    def tree(procs) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in procs if p is not None and p.poll() is None)

    out = {"stores": tree([s.proc for s in stores]),
           "origin side": tree([site.link.emulator, site.registry.proc, site.relay.proc if site.relay else None])}
    if mirror is not None:
        out["mirror"] = tree([mirror.registry.proc])
    return out


def _run_name(image: FleetImage, background: bool, nodes: int, mode: str) -> str:
    return f"{image.name}-bg{'on' if background else 'off'}-n{nodes}-{mode}"


def _keep_origin_log(work: Path, site: OriginSite, mark, name: str) -> None:
    """The origin relay's records of this run (one JSON line per answer, with the node that asked:
    see `benchmarks.fleet.origin_log`), under work/logs/<run>/origin.jsonl."""
    keep = work / "logs" / name
    keep.mkdir(parents=True, exist_ok=True)
    assert site.relay is not None
    with open(keep / "origin.jsonl", "w") as f:
        for record in site.relay.records_since(mark.log_offset):
            f.write(json.dumps(record) + "\n")


def _keep_logs(work: Path, stores: list[FleetStore], name: str) -> None:
    """Each node's store log, kept under work/logs/<run> (the next run's nodes start afresh)."""
    keep = work / "logs" / name
    keep.mkdir(parents=True, exist_ok=True)
    for i, store in enumerate(stores):
        if store.log_path.exists():
            shutil.copy(store.log_path, keep / f"node{i:02d}.log")
