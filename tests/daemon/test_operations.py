"""Operating a mounted daemon (issue 16): the Prometheus endpoint against the registry's own log,
`stargz-store status` and `prune` over the control socket, and the cache held under its limit
without removing what a layer in use needs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stargz_store.localenv.procs import free_port
from tests.fixtures.podman import podman, podman_cleanup
from tests.fixtures.store import REPO_ROOT
from tests.fixtures.waiting import wait_for

from .conftest import FAST_CONFIG, push_reference

pytestmark = pytest.mark.root

_ACCESS = re.compile(r'"GET (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def scrape(address: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} of every sample at http://address/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(samples: dict[tuple, float], **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in samples.items() if want <= set(k))


def registry_blob_gets(log_text: str, config_digest: str) -> tuple[int, int]:
    """(GET requests, body bytes of the 200/206 answers) of the registry's access log lines for
    blobs other than the image config (which Podman fetches itself). A GET answered 404 counts as
    a request: an early tail asked for under a key that is no blob (a TOC digest) is one."""
    count = size = 0
    for line in log_text.splitlines():
        m = _ACCESS.search(line)
        if m and "/blobs/" in m.group(1) and m.group(1).rsplit("/", 1)[-1] != config_digest:
            count += 1
            if m.group(2) in ("200", "206") and m.group(3) != "-":
                size += int(m.group(3))
    return count, size


def read_tree(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file() and not p.is_symlink()}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "stargz_store.cli", *args], capture_output=True, text=True,
                            timeout=180, env=env, cwd=str(REPO_ROOT))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def status(store) -> dict:
    return json.loads(cli("status", "--root", str(store.root), "--json").stdout)


def test_metrics_agree_with_the_registry_log(store_daemon_factory, private_registry, testdata):
    image = push_reference(testdata, private_registry.host, "multilayer-esgz", repo="ops/metrics")
    address = f"127.0.0.1:{free_port()}"
    mark = private_registry.log_mark()
    # One range per request, so requests and access log lines pair up one to one.
    # No passthrough: every byte read is served (and counted) by the store.
    config = FAST_CONFIG.replace("[blob]\n", "[blob]\nforce_single_range_mode = true\n")
    config = config.replace("[store]\n", "[store]\npassthrough = false\n")
    store = store_daemon_factory(f'metrics_address = "{address}"\n' + config)
    *read_layers, untouched = image.layers
    read_bytes = files = 0
    for layer in read_layers:
        tree = read_tree(store.layer_dir(image.ref, layer["digest"]) / "diff")
        files += len(tree)
        read_bytes += sum(len(b) for b in tree.values())
    assert files and read_bytes

    # A reader gets its bytes as soon as they land, while the rest of that request (neighbours
    # fetched with it) may still be streaming, and a FUSE answer is counted just after it is
    # sent: wait until the store's counts and the registry's log have caught up with the reads.
    def settled() -> bool:
        nonlocal m, gets, got_bytes
        m = scrape(address)
        gets, got_bytes = registry_blob_gets(private_registry.log_since(mark), image.manifest["config"]["digest"])
        return (total(m["stargz_store_fetched_bytes_total"]) == got_bytes
                and total(m["stargz_store_fuse_operation_seconds_count"], operation="read") >= files)

    m: dict = {}
    gets = got_bytes = 0
    wait_for(settled, timeout=30, interval=0.2)
    # Every byte and range the store says it fetched is one the registry says it sent, and back.
    assert total(m["stargz_store_fetched_bytes_total"]) == got_bytes > 0
    assert total(m["stargz_store_fetch_requests_total"]) == gets
    assert 0 < total(m["stargz_store_fetch_seconds_count"]) <= gets  # one per call; a call may send several
    assert total(m["stargz_store_fetched_bytes_total"], kind="toc") > 0  # every layer's TOC at open
    assert total(m["stargz_store_fetched_bytes_total"], kind="background") == 0  # off in FAST_CONFIG
    assert total(m["stargz_store_served_bytes_total"]) >= read_bytes
    assert total(m["stargz_store_fuse_operation_seconds_count"], operation="read") >= files
    assert total(m["stargz_store_fuse_operation_seconds_count"], operation="lookup") > 0
    assert total(m["stargz_store_cache_misses_total"]) > 0
    assert total(m["stargz_store_layer_opens_total"]) == len(image.layers)
    assert total(m["stargz_store_resolve_seconds_count"], what="layer") == len(image.layers)
    assert total(m["stargz_store_resolve_seconds_count"], what="image") == 1
    assert total(m["stargz_store_layers_open"]) == len(image.layers)
    assert total(m["stargz_store_fuse_eio_total"]) == 0
    assert total(m.get("stargz_store_registry_errors_total", {})) == 0
    pinned = {dict(k)["layer"] for k, v in m["stargz_store_layer_references"].items() if dict(k)["kind"] == "pins" and v}
    assert {layer["digest"] for layer in read_layers} <= pinned
    assert {dict(k)["image"] for k in m["stargz_store_layer_references"]} == {image.ref}

    # The registry goes away: a read of the layer never read fails with EIO, counted by kind.
    private_registry.stop()
    diff = store.layer_dir(image.ref, untouched["digest"]) / "diff"
    name = next(p for p in sorted(diff.rglob("*")) if p.is_file() and not p.is_symlink() and p.stat().st_size)
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            name.read_bytes()
        assert failed.value.errno == 5
    m = scrape(address)
    assert total(m["stargz_store_fuse_eio_total"], operation="read") >= 3
    # Each failed read is counted, but explained once (then at debug level, within a minute).
    warned = [line for line in store.log_tail(400000).splitlines() if " WARNING " in line and "read failed" in line]
    assert len(warned) == 1, warned
    assert total(m["stargz_store_registry_errors_total"], kind="unreachable") >= 1


def test_status_lists_images_layers_and_the_cache(store_daemon_factory, registry, testdata):
    image = push_reference(testdata, registry.host, "multilayer-esgz", repo="ops/status")
    big = push_reference(testdata, registry.host, "tricky-esgz", repo="ops/status-big")
    store = store_daemon_factory(FAST_CONFIG)
    first = image.layers[0]["digest"]
    read_tree(store.layer_dir(image.ref, first) / "diff")
    (big_layer,) = big.layers
    assert len((store.layer_dir(big.ref, big_layer["digest"]) / "diff" / "files" / "size-4097").read_bytes()) == 4097

    doc = status(store)
    assert doc["images"] == sorted([image.ref, big.ref])
    layers = {row["layer"]: row for row in doc["layers"]}
    assert set(layers) == {layer["digest"] for layer in image.layers} | {big_layer["digest"]}
    assert layers[first]["local_bytes"] == layers[first]["content_bytes"] > 0
    assert layers[first]["pins"] >= 1 and layers[first]["image"] == image.ref
    partly = layers[big_layer["digest"]]
    assert 4097 <= partly["local_bytes"] < partly["content_bytes"] and partly["image"] == big.ref
    assert partly["blob_size"] == big_layer["size"] and partly["fetched_bytes"] > 0
    assert doc["cache"]["size"] > 0 and doc["cache"]["limit"] is None
    assert doc["cache"]["in_use"] + doc["cache"]["could_free"] == doc["cache"]["size"]

    text = cli("status", "--root", str(store.root)).stdout
    assert image.ref in text and first[:19] in text and "100% of" in text

    store.stop()
    gone = cli("status", "--root", str(store.root), check=False)
    assert gone.returncode == 1 and "no stargz-store daemon" in gone.stderr


def _over_limit_report(store, filler_digest: str) -> str:
    """Why the cache stays over its limit: the status (what holds each open layer) and the
    store's log lines about the filler layer, the janitor, releases and idle closes."""
    words = (filler_digest, "janitor", "limit", "release", "idle", "forget", "inval")
    lines = [line for line in store.log_path.read_text(errors="replace").splitlines()
             if any(w in line for w in words) and "control socket" not in line]
    return f"status: {json.dumps(status(store))}\nlog:\n" + "\n".join(lines[-80:])


def chunk_files(store) -> set[str]:
    return {p.name for p in (store.root / "cache" / "chunks").glob("*/*") if not p.name.startswith(".")}


def test_cache_limit_evicts_unused_layers_and_keeps_layers_in_use(store_daemon_factory, registry, testdata):
    limit = 4 << 20
    small = push_reference(testdata, registry.host, "multilayer-esgz", repo="ops/in-use")
    big = push_reference(testdata, registry.host, "tricky-esgz", repo="ops/unused")
    store = store_daemon_factory(FAST_CONFIG.replace("[store]\n", f"[store]\ncache_max_size_gb = {limit / (1 << 30)}\n"))

    # In use: one file of `small` held open, which pins its layer's directory in the kernel. (Its
    # other layers were read too, but the kernel may forget their directories at any time.)
    before = {layer["digest"]: read_tree(store.layer_dir(small.ref, layer["digest"]) / "diff") for layer in small.layers}
    held_layer = next(d for d, tree in before.items() if tree)
    held = open(next(p for p in (store.layer_dir(small.ref, held_layer) / "diff").rglob("*") if p.is_file()), "rb")
    # Its files are smaller than a chunk: each is one chunk, named by the sha256 of its bytes.
    in_use = {hashlib.sha256(data).hexdigest() for data in before[held_layer].values() if data}
    assert in_use and in_use <= chunk_files(store)
    try:
        # `big`: 16 MiB read, past the limit while it is itself in use (nothing can go yet).
        (big_layer,) = big.layers
        big_dir = store.layer_dir(big.ref, big_layer["digest"])
        assert len((big_dir / "diff" / "files" / "random.bin").read_bytes()) == 16789561
        assert wait_for(lambda: "stays over its limit" in store.log_tail(200000), timeout=60), store.log_tail()
        # Released (containers/storage's rmdir): the kernel forgets the directory, the layer is unused.
        with pytest.raises(FileNotFoundError):
            os.rmdir(big_dir)
        assert wait_for(lambda: status(store)["cache"]["size"] <= limit, timeout=120, interval=1), store.log_tail()

        assert in_use <= chunk_files(store)  # not one chunk of the layers in use went
        doc = status(store)
        (held_row,) = [row for row in doc["layers"] if row["layer"] == held_layer]
        assert held_row["local_bytes"] == held_row["content_bytes"] > 0 and held_row["pins"] >= 1
        assert doc["cache"]["limit"] == limit
        log = store.log_tail(400000)
        assert log.count("stays over its limit") == 1  # warned once, not at every pass
        assert "cache over its limit" in log

        # On demand: everything not in use goes, what is in use stays, and reads right.
        pruned = json.loads(cli("prune", "--all", "--json", "--root", str(store.root)).stdout)
        assert pruned["size_after"] == pruned["in_use_bytes"] > 0
        assert in_use <= chunk_files(store)
        for digest, tree in before.items():
            assert read_tree(store.layer_dir(small.ref, digest) / "diff") == tree
        assert held.read() == before[held_layer][str(Path(held.name).relative_to(
            store.layer_dir(small.ref, held_layer) / "diff"))]
    finally:
        held.close()


def test_podman_run_scraped_and_kept_under_the_cache_limit(store_daemon_factory, registry, testdata, podman_lane,
                                                          podman_made_zstd):
    """The e2e figures against the registry's log, then the cache past its limit while a container
    runs: the container's chunks all stay, it reads right bytes, the rest goes."""
    limit = 4 << 20  # above what the container reads (busybox, /data/seq), far below the 16 MiB filler
    made = podman_made_zstd
    ref = made.ref(registry.host)
    digests = {layer["digest"] for layer in made.image.layers}
    address = f"127.0.0.1:{free_port()}"
    # No passthrough: every byte read is served (and counted) by the store.
    config = FAST_CONFIG.replace("[blob]\n", "[blob]\nforce_single_range_mode = true\n")
    config = config.replace("[store]\n", "[store]\npassthrough = false\n").replace(
        "[store]\n", f"[store]\ncache_max_size_gb = {limit / (1 << 30)}\n")
    store = store_daemon_factory(f'metrics_address = "{address}"\n' + config, mountpoint=podman_lane.store_mountpoint())
    filler = push_reference(testdata, registry.host, "tricky-esgz", repo="ops/filler")
    mark = registry.log_mark()
    with podman_lane.private_dir("ops-") as pod_dir:
        env = podman_lane.env(pod_dir, additional_layer_store=store.mountpoint)
        try:
            podman("pull", "-q", "--tls-verify=false", ref, env=env)
            # The container reads, waits for /t/go (the test's signal, through a volume: `podman exec`
            # does not enter the container's root in the Podman 5 chroot lane), reads again, stays up.
            (pod_dir / "t").mkdir()
            bb = "/bin/busybox"
            script = (f"{bb} sha256sum /data/seq; until [ -e /t/go ]; do {bb} sleep 0.1; done; "
                      f"{bb} sha256sum /data/seq /data/rand; {bb} sleep 600")
            podman("run", "-d", "--name", "keep", "--net=none", "-v", f"{podman_lane.seen(pod_dir / 't')}:/t",
                   ref, bb, "sh", "-c", script, env=env)

            def output() -> list[str]:
                return podman("logs", "keep", env=env).stdout.split()

            assert wait_for(lambda: len(output()) >= 2, timeout=120, interval=0.2)
            assert output()[0] == made.seq_sha256

            m = scrape(address)
            gets, got_bytes = registry_blob_gets(registry.log_since(mark), made.image.manifest["config"]["digest"])
            assert total(m["stargz_store_fetched_bytes_total"]) == got_bytes > 0
            assert total(m["stargz_store_fetch_requests_total"]) == gets
            assert total(m["stargz_store_fuse_operation_seconds_count"], operation="read") > 0
            assert total(m["stargz_store_fuse_eio_total"]) == 0
            refs = {(dict(k)["layer"], dict(k)["kind"]): v for k, v in m["stargz_store_layer_references"].items()}
            assert all(refs[(d, "pins")] >= 1 for d in digests if (d, "pins") in refs) and refs
            in_use = chunk_files(store)

            # 16 MiB more, read and then released: the cache goes past its limit, then back under it.
            (layer,) = filler.layers
            filler_dir = store.layer_dir(filler.ref, layer["digest"])
            assert len((filler_dir / "diff" / "files" / "random.bin").read_bytes()) == 16789561
            with pytest.raises(FileNotFoundError):
                os.rmdir(filler_dir)
            assert wait_for(lambda: status(store)["cache"]["size"] <= limit, timeout=120, interval=1), \
                _over_limit_report(store, layer["digest"])
            assert in_use <= chunk_files(store)
            m = scrape(address)
            assert total(m["stargz_store_cache_evicted_bytes_total"]) >= 16 << 20
            assert total(m["stargz_store_cache_size_bytes"]) <= limit
            (pod_dir / "t" / "go").touch()
            assert wait_for(lambda: len(output()) >= 6, timeout=120, interval=0.2)
            assert output()[2] == made.seq_sha256  # the same bytes; then /data/rand, read only now, is read whole
        finally:
            podman("rm", "-f", "keep", env=env, check=False)
            podman_cleanup(env)
