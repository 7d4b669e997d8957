"""`stargz-store optimize` and `stargz-store record` with every part real (issue 17).

`optimize` is run as a user runs it (its command line): it starts its own registry, store and the
host's Podman 4.3.1, so these tests run in the `[podman4]` lane only. What is checked is the
result a user relies on: the new blobs (read here with gzip/tarfile/json only) put the workload's
files before `.prefetch.landmark`, in first-read order, in the layer they were read from; a store
serving the optimized image answers the workload from its prefetch (no cache miss in those
layers) while the unoptimized image's reads miss; the exit, timeout and wait-line endings each
still give a record. `record` is asked of a running store while Podman (either lane) runs a workload.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator

import pytest

from tests.fixtures.images import LayerBuilder, random_bytes
from tests.fixtures.podman import PODMAN4, PodmanLane, need_podman, podman, podman_cleanup
from tests.fixtures.store import REPO_ROOT

from .app_images import APP_MESSAGE, build_source, convert_and_push, fetch_blob, fetch_image

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.slow]

FIRST, SECOND = "first read second\n", "second read first\n"
RUN_SCRIPT = "#!/bin/sh\ncat /app/second.txt\ncat /app/first.txt\n"
EXPECTED_OUTPUT = SECOND + FIRST
COMMAND_TIMEOUT = 900
PREFETCH_CONFIG = "no_background_fetch = true\n\n[store]\nwait_for_prefetch = true\n"


def opt_layers() -> list[bytes]:
    """busybox and a never-read file below; above, the app (its tar order is not its read order) and filler."""
    lower = LayerBuilder().add_busybox()
    lower.add_file("data/unread-lower.bin", random_bytes(1 << 20, seed=31))
    upper = LayerBuilder().add_dir("app")
    upper.add_file("app/first.txt", FIRST.encode()).add_file("app/second.txt", SECOND.encode())
    upper.add_file("app/run.sh", RUN_SCRIPT.encode(), mode=0o755)
    upper.add_file("filler/unread-upper.bin", random_bytes(2 << 20, seed=32))
    return [lower.gzip(), upper.gzip()]


def stargz(*args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`stargz-store ARGS` as a user runs it (no credentials of the machine)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REGISTRY_AUTH_FILE": os.devnull}
    return subprocess.run([sys.executable, "-m", "stargz_store.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)


def toc_names(blob: bytes) -> list[str]:
    """Entry names of an eStargz blob's TOC in blob order (chunks of a file are one name)."""
    footer = blob[-51:]
    toc_offset = int(footer[16:32].decode("ascii"), 16)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[toc_offset:])), mode="r:") as tf:
        member = tf.extractfile("stargz.index.json")
        assert member is not None
        toc = json.load(member)
    return [e["name"] for e in toc["entries"] if e["type"] != "chunk"]


def prioritized_files(blob: bytes) -> list[str] | None:
    """The regular files and symlinks before `.prefetch.landmark` (None: the layer has none)."""
    names = toc_names(blob)
    if ".prefetch.landmark" not in names:
        assert ".no.prefetch.landmark" in names
        return None
    return [n for n in names[:names.index(".prefetch.landmark")] if not n.endswith("/")]


def read_record(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Optimized:
    result: subprocess.CompletedProcess[str]
    record: list[dict]
    image_ref: str
    plain_ref: str
    host: str


@pytest.fixture(scope="module")
def opt_source(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the optimize tests need root (FUSE mounts, podman's rootful storage)")
    need_podman()
    return build_source(tmp_path_factory.mktemp("opt-src") / "layout", opt_layers(), {"Cmd": ["/bin/sh", "/app/run.sh"]})


@pytest.fixture(scope="module")
def optimized(opt_source, registry, tmp_path_factory) -> Optimized:
    """`optimize` of the image's own command into the session registry, and the unoptimized conversion beside it."""
    record_path = tmp_path_factory.mktemp("opt-record") / "record.jsonl"
    image_ref = f"{registry.host}/e2e-opt/app:opt"
    result = stargz("optimize", "--record-out", str(record_path), f"oci:{opt_source}:src", f"docker://{image_ref}")
    assert result.returncode == 0, result.stderr
    plain_ref = f"{registry.host}/e2e-opt/app:plain"
    convert_and_push(opt_source, "src", plain_ref)
    return Optimized(result, read_record(record_path), image_ref, plain_ref, registry.host)


@pytest.mark.podman4
def test_optimize_puts_the_workload_files_first_in_first_read_order(optimized):
    image = fetch_image(optimized.host, "e2e-opt/app", "opt")
    lower, upper = (fetch_blob(optimized.host, "e2e-opt/app", layer["digest"]) for layer in image.layers)

    assert prioritized_files(upper) == ["app/run.sh", "app/second.txt", "app/first.txt"]
    lower_first = prioritized_files(lower)
    assert lower_first is not None and "bin/busybox" in lower_first and "data/unread-lower.bin" not in lower_first
    assert "filler/unread-upper.bin" not in prioritized_files(upper)

    paths = [e["path"] for e in optimized.record]
    assert paths.index("bin/busybox") < paths.index("app/run.sh") < paths.index("app/second.txt") \
        < paths.index("app/first.txt")
    by_path = {e["path"]: e for e in optimized.record}
    assert by_path["app/second.txt"]["layerIndex"] == 1 and by_path["bin/busybox"]["layerIndex"] == 0
    assert by_path["app/first.txt"]["size"] == len(FIRST)
    assert "exited with 0" in optimized.result.stderr
    assert f"prioritized {sum(1 for e in optimized.record if e['kind'] == 'reg')} files" in optimized.result.stderr
    assert optimized.result.stdout.strip().startswith("sha256:")


@contextmanager
def host_podman_with_store(factory) -> Iterator[tuple]:
    """A fresh store (its own cache: chunks are cached by digest, so images must not share one) and the host's Podman."""
    store = factory(PREFETCH_CONFIG)
    lane = PodmanLane(PODMAN4, "4")
    with lane.private_dir("e2e-opt-pod-") as pod_dir:
        env = lane.env(pod_dir, additional_layer_store=store.mountpoint)
        try:
            yield store, env
        finally:
            podman_cleanup(env)


@pytest.mark.podman4
def test_the_optimized_image_is_served_from_its_prefetch(optimized, store_daemon_factory):
    results = {}
    for ref, tag in ((optimized.image_ref, "opt"), (optimized.plain_ref, "plain")):
        with host_podman_with_store(store_daemon_factory) as (store, env):
            podman("pull", "--tls-verify=false", ref, env=env)
            out = podman("run", "--rm", "--net=none", "--pull=never", ref, env=env).stdout
            assert out == EXPECTED_OUTPUT
            image = fetch_image(optimized.host, "e2e-opt/app", tag)
            layers = store.stats()["layers"]
            results[tag] = [layers[f"{ref}@{layer['digest']}"] for layer in image.layers]

    for layer in results["opt"]:  # every file the workload read was prefetched: no read missed the cache
        assert layer["prefetch_bytes"] > 0, results
        assert layer["cache_misses"] == 0, results
    for layer in results["plain"]:  # the same workload on the unoptimized image fetches on demand
        assert layer["prefetch_bytes"] == 0, results
        assert layer["cache_misses"] > 0, results


@pytest.mark.podman4
def test_a_zstd_chunked_optimized_image_is_served_from_its_prefetch(opt_source, registry, store_daemon_factory):
    ref = f"{registry.host}/e2e-opt/app:zstd-opt"
    result = stargz("optimize", "--format", "zstd-chunked", f"oci:{opt_source}:src", f"docker://{ref}")
    assert result.returncode == 0, result.stderr
    image = fetch_image(registry.host, "e2e-opt/app", "zstd-opt")
    assert all("zstd" in layer["mediaType"] for layer in image.layers)
    with host_podman_with_store(store_daemon_factory) as (store, env):
        podman("pull", "--tls-verify=false", ref, env=env)
        assert podman("run", "--rm", "--net=none", "--pull=never", ref, env=env).stdout == EXPECTED_OUTPUT
        layers = store.stats()["layers"]
        stats = [layers[f"{ref}@{layer['digest']}"] for layer in image.layers]
    for layer in stats:
        assert layer["prefetch_bytes"] > 0 and layer["cache_misses"] == 0, stats


def _optimize_to_layout(opt_source: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    record = out / "record.jsonl"
    result = stargz("optimize", "--record-out", str(record), "--entrypoint", '["/bin/sh", "-c"]', *args,
                    f"oci:{opt_source}:src", f"oci:{out / 'layout'}:opt")
    assert result.returncode == 0, result.stderr
    return result, read_record(record)


def _layout_layers(layout: Path) -> list[bytes]:
    index = json.loads((layout / "index.json").read_text())
    blob = lambda digest: (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    return [blob(layer["digest"]) for layer in manifest["layers"]]


@pytest.mark.podman4
def test_optimize_stops_a_workload_that_never_exits_at_the_timeout(opt_source, tmp_path):
    result, record = _optimize_to_layout(opt_source, tmp_path, "--args", '["cat /app/first.txt; sleep 3600"]',
                                         "--timeout", "5")
    assert "stopped at the 5 s timeout" in result.stderr
    assert "app/first.txt" in [e["path"] for e in record]
    lower, upper = _layout_layers(tmp_path / "layout")
    assert prioritized_files(upper) == ["app/first.txt"]


@pytest.mark.podman4
def test_optimize_stops_at_the_wait_line(opt_source, tmp_path):
    result, record = _optimize_to_layout(opt_source, tmp_path, "--args",
                                         '["cat /app/second.txt; echo service is ready; sleep 3600"]',
                                         "--wait-line", "is ready$", "--timeout", "600")
    assert "stopped at its --wait-line" in result.stderr
    assert "app/second.txt" in [e["path"] for e in record]


@pytest.mark.podman4
def test_a_failing_workload_still_gives_its_record(opt_source, tmp_path):
    result, record = _optimize_to_layout(opt_source, tmp_path, "--args", '["cat /app/second.txt; exit 3"]')
    assert "the workload exited with 3" in result.stderr
    assert [e["path"] for e in record if e["path"].startswith("app/")] == ["app/second.txt"]
    lower, upper = _layout_layers(tmp_path / "layout")
    assert prioritized_files(upper) == ["app/second.txt"]


@pytest.mark.podman4
def test_optimize_takes_a_prefetch_list_with_patterns(opt_source, tmp_path):
    patterns = tmp_path / "prefetch.txt"
    patterns.write_text("# by hand\nfiller/*.bin\n")
    result, record = _optimize_to_layout(opt_source, tmp_path, "--args", '["cat /app/first.txt"]',
                                         "--prefetch-list", str(patterns))
    lower, upper = _layout_layers(tmp_path / "layout")
    assert prioritized_files(upper) == ["app/first.txt", "filler/unread-upper.bin"]
    assert record[-1]["path"] == "filler/unread-upper.bin" and record[-1]["source"] == "prefetch-list"


# -- `stargz-store record` of a running store (either Podman lane) --------------------------------

RECORD_ALL = "no_background_fetch = true\n\n[record]\nimages = [\"*\"]\n"


@pytest.fixture
def recording_podman(e2e_images, proxy, store_daemon_factory, podman_lane):
    from .conftest import _lazy_podman

    yield from _lazy_podman(store_daemon_factory, proxy, RECORD_ALL, podman_lane)


def store_record(store, ref: str, *flags: str) -> list[dict]:
    result = stargz("record", "--root", str(store.root), *flags, ref, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_record_of_a_running_store_lists_what_the_workload_read(recording_podman, e2e_images):
    image = e2e_images.app_esgz
    ref = recording_podman.ref(image)
    recording_podman.pull(image)
    assert recording_podman.run(image, "cat", "/app/message.txt") == APP_MESSAGE + "\n"

    record = store_record(recording_podman.store, ref)
    paths = [e["path"] for e in record]
    assert "app/message.txt" in paths and "bin/busybox" in paths
    assert paths.index("bin/busybox") < paths.index("app/message.txt")
    assert not [p for p in paths if p.startswith("filler/")]  # never read: never recorded
    assert len(paths) == len(set(paths))
    digest = image.layers[0]["digest"]
    assert {(e["layerIndex"], e["layerDigest"]) for e in record} == {(0, digest)}
    seconds = [e["seconds"] for e in record]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert recording_podman.store.stats()["fs"]["recorded_reads"] >= len(record)


def test_record_started_at_run_time_sees_only_later_reads(e2e_images, proxy, store_daemon_factory, podman_lane):
    from .conftest import LAZY_CONFIG, _lazy_podman

    with contextmanager(_lazy_podman)(store_daemon_factory, proxy, LAZY_CONFIG, podman_lane) as lazy:
        image = e2e_images.app_esgz
        ref = lazy.ref(image)
        lazy.pull(image)
        assert lazy.run(image, "cat", "/app/message.txt") == APP_MESSAGE + "\n"
        assert store_record(lazy.store, ref) == []  # recording is off by default

        store_record(lazy.store, ref, "--start")
        assert "echo" in lazy.run(image, "cat", "/app/run.sh")
        paths = [e["path"] for e in store_record(lazy.store, ref)]
        assert "app/run.sh" in paths and "app/message.txt" not in paths

        store_record(lazy.store, ref, "--stop")
        assert lazy.run(image, "sh", "-c", "head -c 1 /filler/blob-0.bin | wc -c").strip() == "1"
        assert "filler/blob-0.bin" not in [e["path"] for e in store_record(lazy.store, ref)]
