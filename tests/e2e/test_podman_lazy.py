"""Podman pulls and runs eStargz and zstd:chunked images through the store, lazily; everything else still works.

Each test gets a fresh store and a fresh podman storage, so what the proxy records is caused by
that test alone. Every test runs once per podman lane (`[podman4]`: the host's 4.3.1, which asks
the store by blob digest; `[podman5]`: Podman 5 in a Debian 13 chroot, which asks by TOC digest).
"""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.fixtures.images import decompress_layer, sha256_digest
from tests.fixtures.podman import podman, podman_cleanup
from tests.fixtures.podman_made import READ_SEQ

from .app_images import (
    APP_LINE,
    APP_MESSAGE,
    MERGED_EXPECTED,
    MERGED_SCRIPT,
    estargz_chunk_region,
    fetch_blob,
    fetch_image,
)
from .recording_proxy import Request, merge_ranges, overlapping_pairs

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.slow]

APP_OUTPUT = f"{APP_LINE}\n{APP_MESSAGE}\n"
LAZY_FRACTION = 0.25
BACKGROUND_FETCH_DEADLINE_S = 300


def podman_layer_gets(requests: list[Request], digests: set[str]) -> list[Request]:
    """Blob downloads podman itself made for the given layers (a lazy pull makes none)."""
    return [r for r in requests if r.method == "GET" and r.from_podman and r.blob_digest in digests]


def store_ranges(requests: list[Request], digest: str, blob_size: int) -> list[tuple[int, int]]:
    """Byte ranges of one blob that anyone but podman fetched (a whole-blob GET counts as all of it)."""
    out = []
    for r in requests:
        if r.method != "GET" or r.from_podman or r.blob_digest != digest or r.status not in (200, 206):
            continue
        out.extend(r.ranges if r.ranges else [(0, blob_size - 1)])
    return out


def test_pull_takes_every_estargz_layer_from_the_store(lazy_podman, e2e_images):
    image = e2e_images.multi_esgz
    lazy_podman.pull(image)

    digests = {layer["digest"] for layer in image.layers}
    # The key podman asked the store by: the blob digest (4.3.1) or the TOC digest (5.x).
    layer_dirs = {lazy_podman.lane.seen(lazy_podman.layer_dir(image, layer)) for layer in image.layers}
    expected_targets = {f"{d}/diff" for d in layer_dirs}
    links = lazy_podman.store_layer_links()
    assert sorted(links.values()) == sorted(expected_targets), (
        f"every layer's diff must link into the store; got {links}\nstore log:\n{lazy_podman.store.log_tail()}")
    assert podman_layer_gets(lazy_podman.requests(), digests) == []
    for layer_id in links:
        pointer = lazy_podman.graphroot / "overlay" / layer_id / "additionallayer"
        assert pointer.read_text().strip() in layer_dirs


def test_run_starts_after_fetching_a_small_part_of_the_image(lazy_podman, e2e_images):
    image = e2e_images.app_esgz
    lazy_podman.pull(image)
    assert len(lazy_podman.store_layer_links()) == len(image.layers)

    assert lazy_podman.run(image) == APP_OUTPUT

    fetched = sum(r.bytes_sent for r in lazy_podman.requests())
    assert fetched < LAZY_FRACTION * image.compressed_size, (
        f"{fetched} bytes fetched to run the app, image is {image.compressed_size} bytes compressed")
    assert fetched > 0


def test_zstd_chunked_image_runs_lazily(lazy_podman, e2e_images):
    image = e2e_images.app_zstd
    lazy_podman.pull(image)
    digests = {layer["digest"] for layer in image.layers}
    assert len(lazy_podman.store_layer_links()) == len(image.layers)
    assert podman_layer_gets(lazy_podman.requests(), digests) == []

    assert lazy_podman.run(image) == APP_OUTPUT

    fetched = sum(r.bytes_sent for r in lazy_podman.requests())
    assert fetched < LAZY_FRACTION * image.compressed_size, (
        f"{fetched} bytes fetched to run the app, image is {image.compressed_size} bytes compressed")


def test_zstd_chunked_image_made_by_this_podman_runs_lazily(lazy_podman, podman_made_zstd):
    """4.3.1: the image podman 4.3.1 made (old annotation names); 5.x: one this Podman 5 pushed."""
    made = podman_made_zstd
    image = made.image
    lazy_podman.pull(image)
    digests = {layer["digest"] for layer in image.layers}
    assert len(lazy_podman.store_layer_links()) == len(image.layers), lazy_podman.store.log_tail()
    assert podman_layer_gets(lazy_podman.requests(), digests) == []

    out = lazy_podman.run(image, *READ_SEQ)
    assert out.split()[0] == made.seq_sha256

    # busybox and /data/seq are read whole; most of /data/rand (random, never read) must stay in the registry.
    fetched = sum(r.bytes_sent for r in lazy_podman.requests())
    assert fetched < image.compressed_size - made.unread_bytes // 2, (
        f"{fetched} bytes fetched to read /data/seq; the image is {image.compressed_size} bytes with "
        f"{made.unread_bytes} never read ({made.made_by})")


def test_background_fetch_brings_in_the_whole_layer(background_podman, e2e_images):
    image = e2e_images.app_esgz
    background_podman.pull(image)
    assert background_podman.run(image) == APP_OUTPUT

    regions = {}
    for layer in image.layers:
        blob = fetch_blob(background_podman.proxy.upstream_host, image.repo, layer["digest"])
        regions[layer["digest"]] = (estargz_chunk_region(blob), layer["size"])

    def missing() -> dict[str, list[tuple[int, int]]]:
        requests = background_podman.requests()
        gaps = {}
        for digest, ((start, end), size) in regions.items():
            covered = merge_ranges(store_ranges(requests, digest, size))
            if not any(a <= start and b >= end - 1 for a, b in covered):
                gaps[digest] = covered
        return gaps

    deadline = time.monotonic() + BACKGROUND_FETCH_DEADLINE_S
    while (gaps := missing()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not gaps, f"background fetch did not cover the layer data: {gaps}\n{background_podman.store.log_tail()}"


def test_multilayer_image_shows_the_merged_view(lazy_podman, e2e_images):
    image = e2e_images.multi_esgz
    lazy_podman.pull(image)
    assert len(lazy_podman.store_layer_links()) == 2

    assert lazy_podman.run(image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED


def test_two_containers_at_once_fetch_no_chunk_twice(lazy_podman, e2e_images):
    image = e2e_images.app_esgz
    lazy_podman.pull(image)
    mark = len(lazy_podman.requests())

    cmd = lazy_podman.command("run", "--rm", "--net=none", "--pull=never", lazy_podman.ref(image))
    procs = [subprocess.Popen(cmd, env=lazy_podman.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert out == APP_OUTPUT

    during_runs = lazy_podman.requests()[mark:]
    fetched_any = False
    for layer in image.layers:
        ranges = store_ranges(during_runs, layer["digest"], layer["size"])
        fetched_any = fetched_any or bool(ranges)
        assert overlapping_pairs(ranges) == [], f"bytes of {layer['digest']} fetched twice: {sorted(ranges)}"
    if not fetched_any:  # the start fetch, during the pull, may have brought all the app reads first
        started = [line for line in lazy_podman.store.log_tail(200000).splitlines() if "start fetch of" in line]
        assert started and " 0 program(s) and 0 file(s)" not in started[-1], (
            "the containers read files, so the store must have fetched some chunks, during the runs or before")


def test_pulled_image_still_runs_after_the_store_restarts(lazy_podman, e2e_images):
    """containers/storage keeps its symlinks into the store; a new daemon must re-resolve them from scratch."""
    image = e2e_images.multi_esgz
    lazy_podman.pull(image)
    assert lazy_podman.run(image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED

    assert lazy_podman.store.stop() == 0
    lazy_podman.store.start()

    assert lazy_podman.run(image, "/bin/sh", "-c", MERGED_SCRIPT) == MERGED_EXPECTED


def test_plain_gzip_image_falls_back_to_a_normal_pull(lazy_podman, e2e_images):
    image = e2e_images.app_plain
    lazy_podman.pull(image)

    assert lazy_podman.store_layer_links() == {}
    digests = {layer["digest"] for layer in image.layers}
    downloaded = {r.blob_digest for r in podman_layer_gets(lazy_podman.requests(), digests) if r.status == 200}
    assert downloaded == digests
    assert lazy_podman.run(image) == APP_OUTPUT


def _layer_refs(stats: dict, image_ref: str, digest: str) -> int:
    """The store's reference count of one layer (`use` minus `rmdir`) under its lookup key (SIGUSR1 counters)."""
    return int(stats["refcounts"].get(f"{image_ref} {digest}", 0))


def test_rmi_releases_the_layers_in_the_store(lazy_podman, e2e_images):
    image = e2e_images.app_esgz
    ref = lazy_podman.ref(image)
    lazy_podman.pull(image)
    digest = lazy_podman.lane.layer_key(image.layers[0])
    before = lazy_podman.store.stats()
    held = _layer_refs(before, ref, digest)
    assert held >= 1, f"a pulled layer must be held by the store: {before['refcounts']}"

    lazy_podman.podman("rmi", ref)

    after = lazy_podman.store.stats()
    assert lazy_podman.store_layer_links() == {}
    assert after["pool"]["releases"] > before["pool"]["releases"]
    assert _layer_refs(after, ref, digest) < held


def test_push_of_a_lazily_pulled_image(lazy_podman, e2e_images, registry):
    image = e2e_images.app_esgz
    lazy_podman.pull(image)
    target = f"{registry.host}/e2e/pushed:copy"

    lazy_podman.podman("push", "--tls-verify=false", lazy_podman.ref(image), f"docker://{target}")

    pushed = fetch_image(registry.host, "e2e/pushed", "copy")
    assert pushed.diff_ids == image.diff_ids
    for layer, diff_id in zip(pushed.layers, pushed.diff_ids):
        blob = fetch_blob(registry.host, "e2e/pushed", layer["digest"])
        assert sha256_digest(decompress_layer(blob)) == diff_id, "the pushed layer is not the image's content"
    with lazy_podman.lane.private_dir("plain-pod-") as pod_dir:
        plain_env = lazy_podman.lane.env(pod_dir)
        try:
            podman("pull", "--tls-verify=false", target, env=plain_env)
            out = podman("run", "--rm", "--net=none", "--pull=never", target, env=plain_env).stdout
            assert out == APP_OUTPUT
        finally:
            podman_cleanup(plain_env)


def test_first_pull_gets_no_error_answer(lazy_podman, e2e_images):
    """A first pull through the store makes no registry request that fails (issue 15, point 3):
    under Podman 5 the lookup key is a TOC digest, which must never be asked for as a blob."""
    image = e2e_images.app_esgz
    lazy_podman.pull(image)
    assert lazy_podman.run(image) == APP_OUTPUT

    requests = lazy_podman.requests()
    print(f"registry requests of a first pull under {lazy_podman.lane.name}:")  # for the record (-s)
    for r in requests:
        print(f"  {r.method} {r.path} -> {r.status}")
    failed = [(r.method, r.path, r.status) for r in requests if r.status >= 400]
    assert failed == []
