"""The benchmark's own parts that can be checked without timing: trace parsing, path resolution,
queue arithmetic of the link emulator, access-log counting, summaries, and that the link leaves
nothing behind. Run: .venv/bin/python -m pytest -q benchmarks/startup/tests
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.startup import leftovers, link as link_mod
from benchmarks.startup import record, report, rootfs, runner
from benchmarks.startup.linkemu import Direction
from benchmarks.startup.registry import Registry

STRACE = """\
100 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3
100 chroot("/var/tmp/x/rootfs") = 0
100 execve("/usr/bin/python3", ["python3", "-c", "..."], 0x7ffc /* 1 var */) = 0
100 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)
100 openat(AT_FDCWD, "/lib/libc.so.6", O_RDONLY|O_CLOEXEC) = 3
101 openat(AT_FDCWD, "/usr/lib/a b.py", O_RDONLY <unfinished ...>
100 openat(AT_FDCWD, "/usr/lib/missing", O_RDONLY <unfinished ...>
101 <... openat resumed>) = 4
100 <... openat resumed>) = -1 ENOENT (No such file or directory)
101 open("/proc/self/maps", O_RDONLY) = 5
"""


def test_traced_paths_keeps_successful_opens_after_chroot_in_order():
    assert record.traced_paths(STRACE) == ["/usr/bin/python3", "/lib/libc.so.6", "/usr/lib/a b.py", "/proc/self/maps"]


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/x86_64").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/x86_64/libz.so.1.2").write_text("z")
    (root / "usr/lib/x86_64/libz.so.1").symlink_to("libz.so.1.2")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr/bin/py").symlink_to("/usr/bin/py3")
    (root / "usr/bin/py3").write_text("p")
    return root


def test_resolve_in_root_follows_relative_absolute_and_directory_links(tmp_path):
    root = _tree(tmp_path)
    assert rootfs.resolve_in_root(root, "/lib/x86_64/libz.so.1") == [
        "lib", "usr/lib/x86_64/libz.so.1", "usr/lib/x86_64/libz.so.1.2"]
    assert rootfs.resolve_in_root(root, "/usr/bin/py") == ["usr/bin/py", "usr/bin/py3"]
    assert rootfs.resolve_in_root(root, "/usr/bin/../bin/py3") == ["usr/bin/py3"]
    assert rootfs.resolve_in_root(root, "/nope") == []


def test_resolve_in_root_stops_on_symlink_loops(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    assert len(rootfs.resolve_in_root(root, "/a")) <= 41


def test_build_record_filters_to_image_paths_and_adds_the_interpreter(tmp_path):
    root = _tree(tmp_path)
    host_binary = Path(shutil.which("true") or "/bin/true").resolve()
    interp = rootfs.elf_interpreter(host_binary)
    assert interp and interp.startswith("/")
    (root / "usr/bin/tool").write_bytes(host_binary.read_bytes())
    (root / interp.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / interp.lstrip("/")).write_text("ld")
    trace = ('1 chroot("/r") = 0\n1 execve("/usr/bin/tool", ["tool"], 0x1) = 0\n'
             '1 openat(AT_FDCWD, "/lib/x86_64/libz.so.1", O_RDONLY) = 3\n'
             '1 openat(AT_FDCWD, "/tmp/created-by-workload", O_WRONLY|O_CREAT, 0644) = 4\n'
             '1 openat(AT_FDCWD, "/usr/bin/tool", O_RDONLY) = 5\n')
    image_paths = set(rootfs.snapshot(root)) - {"usr/lib/x86_64/libz.so.1"}
    got = record.build_record(trace, root, image_paths)
    assert got == ["usr/bin/tool", interp.lstrip("/"), "lib", "usr/lib/x86_64/libz.so.1.2"]


def test_changed_paths_lists_new_and_modified_entries_with_their_parents(tmp_path):
    root = _tree(tmp_path)
    before = rootfs.snapshot(root)
    (root / "usr/lib/x86_64/new").mkdir()
    (root / "usr/lib/x86_64/new/f").write_text("f")
    (root / "usr/bin/py3").write_text("changed size")
    changed = rootfs.changed_paths(before, rootfs.snapshot(root))
    assert changed == sorted(changed)
    assert {"usr", "usr/lib", "usr/lib/x86_64", "usr/lib/x86_64/new", "usr/lib/x86_64/new/f",
            "usr/bin", "usr/bin/py3"} <= set(changed)
    assert "usr/lib/x86_64/libz.so.1.2" not in changed


def test_direction_serialises_at_the_rate_then_adds_the_delay():
    d = Direction(0, 1, rate_bytes_per_s=1000.0, one_way_delay_s=0.5, queue_bytes=10_000)
    d.enqueue(b"x" * 100, now=10.0)  # leaves the queue at 10.1, arrives 10.6
    d.enqueue(b"y" * 100, now=10.0)  # waits for the first: leaves 10.2, arrives 10.7
    d.enqueue(b"z" * 100, now=20.0)  # idle link again: leaves 20.1, arrives 20.6
    assert [round(t, 6) for t, _ in d.in_flight] == [10.6, 10.7, 20.6]


def test_direction_drops_beyond_the_queue_limit_and_unlimited_rate_only_delays():
    d = Direction(0, 1, rate_bytes_per_s=1000.0, one_way_delay_s=0.0, queue_bytes=250)
    for _ in range(4):
        d.enqueue(b"x" * 100, now=0.0)
    assert len(d.in_flight) == 2 and d.dropped_packets == 2
    free = Direction(0, 1, rate_bytes_per_s=0.0, one_way_delay_s=0.01, queue_bytes=1)
    for _ in range(5):
        free.enqueue(b"x" * 1500, now=1.0)
    assert [t for t, _ in free.in_flight] == [1.01] * 5 and free.dropped_packets == 0


def test_direction_delivers_due_packets_in_order_through_the_fds():
    r, w = os.pipe()
    try:
        d = Direction(-1, w, rate_bytes_per_s=0.0, one_way_delay_s=1.0, queue_bytes=0)
        d.enqueue(b"first", now=0.0)
        d.enqueue(b"second", now=0.5)
        d.deliver_due(now=1.2)
        assert os.read(r, 100) == b"first" and len(d.in_flight) == 1 and d.next_due() == 1.5
        d.deliver_due(now=1.5)
        assert os.read(r, 100) == b"second" and d.forwarded_packets == 2 and d.forwarded_bytes == 11
    finally:
        os.close(r)
        os.close(w)


def test_registry_counts_get_bytes_between_marks(tmp_path):
    reg = Registry(tmp_path / "data", tmp_path, "127.0.0.1", 1)
    reg.log_path.write_text(
        '10.0.0.1 - - [d] "GET /v2/r/manifests/t HTTP/1.1" 200 500 "" "ua"\n'
        'time="x" level=error msg="noise"\n')
    mark = reg.log_mark()
    with open(reg.log_path, "a") as f:
        f.write('10.0.0.1 - - [d] "GET /v2/r/blobs/sha256:aa HTTP/1.1" 206 1000 "" "ua"\n'
                '10.0.0.1 - - [d] "HEAD /v2/r/blobs/sha256:aa HTTP/1.1" 200 0 "" "ua"\n')
    middle = reg.log_mark()
    with open(reg.log_path, "a") as f:
        f.write('10.0.0.1 - - [d] "GET /v2/r/blobs/sha256:bb HTTP/1.1" 200 42 "" "ua"\n')
    assert reg.fetched_between(0) == (1542, 2)
    assert reg.fetched_between(mark, middle) == (1000, 1)
    assert reg.fetched_between(middle) == (42, 1)


def _run(image: str, mode: str, total: float, ok: bool = True, **extra) -> dict:
    base = {"link": "shaped", "image": image, "mode": mode, "ok": ok, "pull_s": total - 0.3, "create_s": 0.1,
            "run_s": 0.2, "total_s": total, "link_bytes_first_output": 2_000_000, "registry_bytes": 3_000_000,
            "registry_blob_gets": 9, "registry_blob_gets_first_output": 7,
            "daemon_cpu_s": None, "daemon_peak_rss_bytes": None,
            "config": "default" if mode in ("estargz-noopt", "estargz") else ""}
    base.update(extra)
    return base


def test_summary_takes_medians_of_successful_runs_and_the_table_shows_failures():
    runs = [_run("python", "legacy", t) for t in (30.0, 10.0, 20.0)]
    runs += [_run("python", "estargz", t, daemon_cpu_s=1.0, daemon_peak_rss_bytes=80_000_000) for t in (5.0, 4.0)]
    runs += [_run("python", "estargz", 0.0, ok=False), _run("python", "warm", 0.0, ok=False)]
    summaries = {s.mode: s for s in report.summarize(runs, groups={"python": "tuning"})}
    legacy, lazy = summaries["legacy"], summaries["estargz"]
    assert (legacy.total, legacy.total_min, legacy.total_max) == (20.0, 10.0, 30.0)
    assert abs(legacy.pull + legacy.create + legacy.run - legacy.total) < 1e-9
    assert (lazy.total, lazy.failed, lazy.runs, lazy.daemon_rss_mb) == (4.0, 1, 3, 80.0)  # lower middle of 2
    assert (lazy.gets_first_output, lazy.group, lazy.config) == (7, "tuning", "default")
    text = report.table(list(summaries.values()), "shaped")
    assert "5.0x" in text and "5.23" in text and "failed (1/1)" in text and "1 failed" in text
    with_needed = {s.mode: s for s in report.summarize(runs, {"python:estargz": 1_000_000})}
    assert with_needed["estargz"].fetch_ratio == 2.0 and with_needed["legacy"].fetch_ratio is None
    assert "2.00x" in report.table(list(with_needed.values()), "shaped")
    header, rule, *rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(row.count("|") == header.count("|") for row in rows + [rule])


def test_table_puts_held_out_images_apart_and_the_baseline_beside_the_default():
    runs = []
    for image in ("python", "java"):
        runs += [_run(image, "legacy", 20.0)]
        # default: 2 MB fetched against 2 MB needed, 60 MB RSS; baseline: slower, 50 MB RSS
        runs += [_run(image, "estargz-noopt", 3.0, daemon_peak_rss_bytes=60_000_000)]
        runs += [_run(image, "estargz-noopt", 5.0 if image == "python" else 3.2, config="baseline-knobs",
                      daemon_peak_rss_bytes=50_000_000, link_bytes_first_output=9_000_000)]
    needed = {"python:estargz-noopt": 2_000_000, "java:estargz-noopt": 2_000_000}
    summaries = report.summarize(runs, needed, {"python": "tuning", "java": "held-out"})
    text = report.table(summaries, "shaped")
    tuning_at, held_out_at = text.index("Tuning set"), text.index("Held-out")
    assert tuning_at < text.index("| python |") < held_out_at < text.index("| java |")
    header = next(line for line in text.splitlines() if line.startswith("| image"))
    assert "baseline-knobs: total s (min–max)" in header and "default ÷ baseline-knobs" in header
    python_row = next(line for line in text.splitlines() if "estargz-noopt" in line and "**3.00**" in line)
    assert "**5.00**" in python_row and "| 0.60 |" in python_row and "missed: RSS" in python_row
    verdicts = report.group_verdicts(summaries, "shaped", "held-out")
    java = verdicts["estargz-noopt"]
    assert (java["images"], java["time_met"], java["bytes_met"], java["rss_met"]) == (1, 0, 1, 0)
    assert abs(java["time_ratio_geomean"] - 3.0 / 3.2) < 1e-9
    assert "at least 10% faster on 0 of 1" in text


def test_store_config_layers_extra_config_under_the_variant(monkeypatch):
    import tomllib

    from benchmarks.startup import variants

    monkeypatch.setenv(variants.EXTRA_CONFIG_ENV, '[store]\nneighbour_fetch_kb = 128\nmemory_cache_size_mb = 32\n')
    knobs = variants.builtin(variants.BASELINE_KNOBS)
    doc = tomllib.loads(variants.store_config("10.213.77.2:5000", True, knobs))
    assert doc["noprefetch"] is True and doc["max_concurrency"] == 2
    assert doc["resolver"]["host"]["10.213.77.2:5000"]["insecure"] is True
    assert doc["store"]["neighbour_fetch_kb"] == 0  # the baseline's own key wins
    assert doc["store"]["memory_cache_size_mb"] == 32 and doc["store"]["library_readahead"] is False
    default = tomllib.loads(variants.store_config("h:1", False, variants.builtin(variants.DEFAULT)))
    assert default["store"] == {"neighbour_fetch_kb": 128, "memory_cache_size_mb": 32}


def test_baseline_is_the_fetch_policy_once_the_store_documents_it(tmp_path):
    from benchmarks.startup import variants

    documented = tmp_path / "config.toml"
    documented.write_text("max_concurrency = 8\n[store]\nneighbour_fetch_kb = 64\n")
    assert variants.builtin(variants.BASELINE, documented).name == variants.BASELINE_KNOBS
    documented.write_text('max_concurrency = 8\n[store]\nfetch_policy = "default"   # or "baseline"\n')
    policy = variants.builtin(variants.BASELINE, documented)
    assert policy.name == variants.BASELINE
    assert policy.settings == {"max_concurrency": 2, "store": {"fetch_policy": "baseline"}}
    assert variants.store_has_fetch_policy() == ("fetch_policy" in (Path(variants.DOCUMENTED_CONFIG).read_text()))
    custom = tmp_path / "wide.toml"
    custom.write_text("max_concurrency = 16\n")
    assert variants.parse(f"wide={custom}").settings == {"max_concurrency": 16}
    with pytest.raises(variants.VariantError):
        variants.parse("fastest")


def test_traced_paths_take_relative_opens_from_the_descriptor_strace_decorates(tmp_path):
    root = tmp_path / "rootfs"
    trace = (f'7 chroot("{root}") = 0\n'
             f'7 openat(AT_FDCWD</{root}/srv/www>, "page.html", O_RDONLY) = 3<{root}/srv/www/page.html>\n'
             f'7 openat(4<{root}/srv>, "www/a.css", O_RDONLY) = 5<{root}/srv/www/a.css>\n'
             '7 openat(AT_FDCWD, "/etc/hosts", O_RDONLY) = 6</etc/hosts>\n')
    assert record.traced_paths(trace, root) == ["/srv/www/page.html", "/srv/www/a.css", "/etc/hosts"]
    assert record.traced_paths(trace) == ["page.html", "www/a.css", "/etc/hosts"]


def test_corpus_has_the_tuning_set_and_at_least_five_held_out_workloads():
    from benchmarks.startup import corpus, images

    assert corpus.TUNING == ("python", "toolchain", "bigdata")
    assert len(corpus.HELD_OUT) >= 5 and set(corpus.HELD_OUT).isdisjoint(corpus.TUNING)
    for recipe in corpus.RECIPES.values():
        assert recipe.group in images.GROUPS
        for step in recipe.steps:
            assert set(step.hooks) <= set(corpus.HOOKS)
            for source, _ in step.files:
                assert any((images.WORKLOADS_DIR / source).iterdir()), source


def test_a_hook_fingerprint_follows_the_constants_it_uses(monkeypatch):
    from benchmarks.startup import corpus, images

    before = images.hook_fingerprint(corpus.HOOKS["model_files"])
    monkeypatch.setattr(corpus, "MODEL_TEXT_SIZE", corpus.MODEL_TEXT_SIZE + 1)
    assert images.hook_fingerprint(corpus.HOOKS["model_files"]) != before
    assert images.hook_fingerprint(corpus.HOOKS["filler"]) == images.hook_fingerprint(corpus.HOOKS["filler"])


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")


@needs_root
@pytest.mark.parametrize("shaped", [True, False])
def test_link_carries_tcp_into_the_namespace_and_leaves_nothing_behind(tmp_path, shaped):
    try:
        lock = leftovers.exclusive().__enter__()
    except leftovers.BenchmarkBusy:
        pytest.skip("a startup benchmark is running and owns the namespace")
    request_cleanup = lock.__exit__
    link = link_mod.Link(link_mod.LinkSpec(shaped=shaped, rate_mbit=50, rtt_ms=4), tmp_path)
    try:
        link.up()
    except BaseException:
        request_cleanup()
        raise
    server = None
    try:
        server = subprocess.Popen(link_mod.Link.netns_command(
            sys.executable, "-c",
            "import socket; s = socket.create_server(('%s', 8077)); print('listening', flush=True); "
            "c, _ = s.accept(); c.sendall(c.recv(5) * 1000)" % link_mod.REGISTRY_ADDRESS), stdout=subprocess.PIPE)
        rx_before = link.received_bytes()
        # the server says when it listens (a connect before that would be refused)
        assert server.stdout.readline() == b"listening\n", "server in the namespace never listened"
        conn = socket.create_connection((link_mod.REGISTRY_ADDRESS, 8077), timeout=30)
        with conn:
            conn.sendall(b"hello")
            got = b""
            while len(got) < 5000:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert got == b"hello" * 1000
        assert link.received_bytes() - rx_before > 5000  # payload plus headers, counted on our side
        link.check_alive()
    finally:
        if server is not None:
            server.kill()
            server.wait()
            server.stdout.close()
        link.down()
        request_cleanup()
    assert not link_mod.netns_exists()
    assert not Path(f"/sys/class/net/{link_mod.HOST_IF}").exists()


def test_built_layout_converts_and_needed_bytes_count_only_recorded_files(tmp_path):
    """oci.py writes a layout our converter accepts; needed.py counts the recorded file's chunks and the TOC."""
    import json as _json
    from functools import partial

    from benchmarks.startup import oci
    from benchmarks.startup.needed import needed_bytes, oci_blob_path

    root = tmp_path / "rootfs"
    (root / "app").mkdir(parents=True)
    (root / "app/small.txt").write_text("hello\n" * 100)
    (root / "app/big.bin").write_bytes(os.urandom(3 << 20))
    src = tmp_path / "src"
    layer = oci.write_layer(root, ["app", "app/big.bin", "app/small.txt"], src, tmp_path / "work")
    oci.finish_layout(src, "latest", [layer], ["/app/small.txt"], ["PATH=/bin"])
    record_path = tmp_path / "record.jsonl"
    record.write_record(["app/small.txt"], record_path)
    dst = tmp_path / "dst"
    repo_root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-m", "stargz_store.cli", "convert", "--record-in", str(record_path),
         f"oci:{src}:latest", f"oci:{dst}:latest"], capture_output=True, text=True, cwd=repo_root)
    if result.returncode:
        pytest.fail(f"converter rejected the layout: {result.stderr[-1500:]}")
    index = _json.loads((dst / "index.json").read_text())
    manifest = _json.loads(oci_blob_path(dst, index["manifests"][0]["digest"]).read_bytes())
    needed = needed_bytes(partial(oci_blob_path, dst), manifest, record_path)
    blob_size = oci_blob_path(dst, manifest["layers"][0]["digest"]).stat().st_size
    assert needed is not None and 0 < needed < blob_size // 10  # the random 3 MiB file is not counted
    record.write_record(["app/small.txt", "app/big.bin"], record_path)
    assert needed_bytes(partial(oci_blob_path, dst), manifest, record_path) > needed + (3 << 20) * 0.99


def test_replay_runs_the_variants_read_path_without_what_needs_time():
    from benchmarks.startup import replay, variants

    default = replay.layer_config(variants.builtin(variants.DEFAULT))
    assert default.enabled_policies() == ("neighbour", "executable", "small_layer", "library_readahead",
                                          "reads_hold_background", "reads_overtake_prefetch")  # (no prefetch to overtake)
    baseline = replay.layer_config(variants.builtin(variants.BASELINE))
    assert baseline.fetch_policy == "baseline" and baseline.max_concurrency == 2
    assert baseline.enabled_policies() == () and baseline.fetch_block_size == 50_000


def test_replay_counts_a_steps_parallel_calls_as_one_round_trip_per_wave_of_connections():
    """A read's requests go out together over `max_concurrency` connections: 8 calls at 8
    connections are one round trip, at 2 connections four; link time adds bytes at the rate."""
    from benchmarks.startup.replay import Link, _Steps

    class Source:
        calls = 0
        bytes_read = 0

    link = Link(rtt_s=0.02, rate_bytes_per_s=1e6)
    for concurrency, trips in ((8, 1), (2, 4)):
        a, b = Source(), Source()
        steps = _Steps([a, b], concurrency, link)
        a.calls, a.bytes_read = 8, 500_000
        b.calls = 1
        steps.end_step()
        steps.end_step()  # nothing fetched: free
        assert steps.round_trips == trips
        assert abs(steps.seconds - (trips * 0.02 + 0.5)) < 1e-9


def _estargz_layer(path: Path, files: dict[str, bytes], modes: dict[str, int], links: dict[str, str] = {}) -> tuple[Path, dict]:
    """An eStargz blob of `files` (with their directories and `links`) and its descriptor."""
    import io
    import tarfile

    from stargz_store.formats.estargz import build_estargz

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name, target in links.items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), modes.get(name, 0o644)
            tf.addfile(ti, io.BytesIO(data))
    with open(path, "wb") as dst:
        result = build_estargz(io.BytesIO(buf.getvalue()), dst, chunk_size=64 << 10)
    return path, {"mediaType": result.media_type, "digest": result.digest, "size": result.size,
                  "annotations": dict(result.annotations)}


def test_replay_fetches_the_libraries_a_program_loads_in_one_step_as_the_store_does(tmp_path):
    """Library readahead is on in the store: the libraries an ELF program loads come in one
    dependent round trip after the program's, all at once, and without the neighbours a miss
    on each would bring. (Replayed with library readahead off, as before, each library was a
    miss of its own and a large one brought the small files stored beside it.)"""
    import random

    from benchmarks.startup import replay, variants
    from stargz_store.layer.elf import MULTIARCH, dynamic_info

    program = Path(shutil.which("ls") or "/bin/ls").resolve().read_bytes()
    info = dynamic_info(lambda offset, size: program[offset : offset + size])
    assert info is not None and len(info.needed) >= 2  # Debian's ls: libselinux and libc
    libdir = f"usr/lib/{MULTIARCH[info.machine]}"
    rng = random.Random(5)
    libs = {f"{libdir}/{name}": rng.randbytes(100_000) for name in info.needed}  # each larger than the neighbour window
    lower = {**libs, f"{libdir}/libunused.so.1": rng.randbytes(4_000)}  # stored beside them, never loaded
    blobs = [
        _estargz_layer(tmp_path / "lower", lower, {}),
        _estargz_layer(tmp_path / "upper", {"usr/bin/prog": program}, {"usr/bin/prog": 0o755}, {"lib": "usr/lib"}),
    ]
    paths = ["usr/bin/prog", *libs]  # the loader opens the program, then each library
    config = replay.layer_config(variants.builtin(variants.DEFAULT))
    assert config.library_readahead
    result = replay.replay_blobs(blobs, paths, config)
    assert result["round_trips"] == 2  # the program's open, then every library at once
    # the program and its libraries, no neighbour (libunused is 4,000 random bytes); the few bytes
    # over are the upper layer's landmark entry, which the small-layer fetch brings with the program
    assert result["needed"] <= result["fetched"] < result["needed"] + 1_000


def test_a_run_and_its_summary_say_what_background_fetch_brought():
    """Background fetch runs in any quiet second (a compiler generating code reads nothing), so
    the bytes before first output are told apart: the store's totals carry its background share."""
    stats = {"layers": {"a": {"requests": 3, "fetched_bytes": 5_000_000, "background_bytes": 2_000_000},
                        "b": {"requests": 1, "fetched_bytes": 700_000, "background_bytes": 0},
                        "c": "closed"}}
    assert runner._store_totals(stats) == (4, 5_700_000, 2_000_000)
    assert runner._store_totals({"layers": {}}) == (None, None, None)
    runs = [_run("cxx", "estargz", t, store_background_bytes=b)
            for t, b in ((9.0, 18_000_000), (6.0, 0), (7.0, 2_000_000))]
    (lazy,) = report.summarize(runs)
    assert lazy.mb_background == 2.0 and lazy.to_json()["mb_background"] == 2.0
