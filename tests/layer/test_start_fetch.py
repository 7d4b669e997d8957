"""Start fetch: what an image config's command will read first, fetched once its layers are open.

Real layers (eStargz blobs built here, read through the layer's verified reader from a counting
local source); the program is a real dynamically linked system program, so its interpreter and
libraries are the ones its ELF headers name.
"""
from __future__ import annotations

import json
import random
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from stargz_store.layer import LayerConfig, pieces
from stargz_store.layer.elf import MULTIARCH, dynamic_info
from stargz_store.layer.start_fetch import StartCommand, StartFetch, start_image

from .conftest import lazy_config
from .helpers import BuiltLayer, FaultySource, build_layer, layer_of, tar_member, wait_until

PROGRAM = Path(shutil.which("ls") or "/bin/ls").resolve()  # any dynamically linked system program
PROGRAM_BYTES = PROGRAM.read_bytes()
INFO = dynamic_info(lambda offset, size: PROGRAM_BYTES[offset : offset + size])
LIBDIR = f"usr/lib/{MULTIARCH[INFO.machine]}" if INFO else "usr/lib"
RND = random.Random(5)
LIBC = RND.randbytes(150_000)
LOADER = RND.randbytes(90_000)
MODEL = RND.randbytes(300_000)
UNREAD = RND.randbytes(300_000)
CONF = b"threads = 2\n"
SCRIPT = (b"#!/bin/sh\n# cat /data/unread.bin is only a comment\n"
          b"set -e\nMODEL=/data/model.bin\ntool --config=/etc/app.conf < /data/model.bin > /data/unread.bin\n"
          b"exec prog /data/model.bin\n")


def _config(argv: list[str], **extra) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], **extra, "Cmd": argv}}).encode()


def _image_layers(tmp_path) -> tuple[BuiltLayer, BuiltLayer]:
    """Two layers (upper, lower): the libraries and data below, the programs and a script on
    top (merged /usr)."""
    assert INFO is not None and INFO.interpreter and "libc.so.6" in INFO.needed
    loader = INFO.interpreter.lstrip("/")
    lower_files = {f"{LIBDIR}/libc.so.6": LIBC, loader: LOADER, "data/model.bin": MODEL, "data/unread.bin": UNREAD,
                   "etc/app.conf": CONF, "usr/bin/other": RND.randbytes(100_000)}
    dirs = sorted({"/".join(n.split("/")[: i + 1]) for n in lower_files for i in range(n.count("/"))})
    lower = layer_of(tmp_path / "lower", [tar_member(d, tarfile.DIRTYPE, mode=0o755) for d in dirs] + [
        tar_member(n, size=len(b), mode=0o755 if n.startswith("usr/bin") else 0o644) for n, b in lower_files.items()
    ], lower_files)
    upper_files = {"usr/bin/prog": PROGRAM_BYTES, "usr/bin/sh": PROGRAM_BYTES, "usr/bin/tool": PROGRAM_BYTES,
                   "usr/bin/env": PROGRAM_BYTES, "usr/bin/tini": PROGRAM_BYTES, "app/start.sh": SCRIPT}
    upper = layer_of(tmp_path / "upper", [
        tar_member("bin", tarfile.SYMTYPE, link="usr/bin"), tar_member("usr", tarfile.DIRTYPE, mode=0o755),
        tar_member("usr/bin", tarfile.DIRTYPE, mode=0o755), tar_member("app", tarfile.DIRTYPE, mode=0o755),
        *(tar_member(n, size=len(b), mode=0o755) for n, b in upper_files.items()),
    ], upper_files)
    return upper, lower


@pytest.fixture
def image(tmp_path, open_layer):
    """The two layers open, topmost first, with their sources."""
    upper, lower = _image_layers(tmp_path)
    config = lazy_config()  # every layer policy off: only what the start fetch asks for is fetched
    bottom, bottom_src = open_layer(lower, config=config)
    top, top_src = open_layer(upper, config=config)
    return [top, bottom], [top_src, bottom_src]


def _run(layers, argv, **kw) -> StartFetch:
    plan = StartFetch(layers, StartCommand.from_config(_config(argv)), limit=kw.pop("limit", 64 << 20),
                      file_limit=64 << 20, **kw)
    plan.run()
    for layer in layers:
        assert layer.drain(30)
    return plan


def _cached(layer, name: str) -> bool:
    entry = layer.toc.lookup(name)
    return all(layer.reader.cache.contains(c.digest) for c in entry.chunks)


def test_a_shell_command_line_brings_its_programs_their_libraries_and_the_files_it_names(image):
    layers, sources = image
    top, bottom = layers
    plan = _run(layers, ["/bin/sh", "-c", "MODEL=/data/model.bin; prog --in=/data/model.bin | tool /etc/app.conf > /data/unread.bin"])
    loader = "/" + INFO.interpreter.lstrip("/")
    assert plan.report.programs[:3] == ["/usr/bin/sh", "/usr/bin/prog", "/usr/bin/tool"]  # the commands, then
    assert plan.report.programs[3:] == [loader, f"/{LIBDIR}/libc.so.6"]  # what they load (once: the same files)
    assert set(plan.report.programs) == {"/usr/bin/sh", "/usr/bin/prog", "/usr/bin/tool", loader, f"/{LIBDIR}/libc.so.6"}
    assert set(plan.report.files) == {"/data/model.bin", "/etc/app.conf"}  # not what `>` writes to
    for name in ("usr/bin/sh", "usr/bin/prog", "usr/bin/tool"):
        assert _cached(top, name)
    for name in (f"{LIBDIR}/libc.so.6", INFO.interpreter.lstrip("/"), "data/model.bin", "etc/app.conf"):
        assert _cached(bottom, name)
    assert not _cached(bottom, "data/unread.bin") and not _cached(bottom, "usr/bin/other")
    assert bottom.stats()["start_chunks"] > 0 and top.stats()["start_chunks"] > 0
    # what was fetched verifies and reads back without another request
    calls = sum(s.calls for s in sources)
    model = bottom.toc.lookup("data/model.bin")
    assert bottom.read(model, 0, model.size) == MODEL
    assert sum(s.calls for s in sources) == calls


def _file_at(layer, offset: int, names: tuple[str, ...]) -> str | None:
    """Which of the files `names` of `layer` has a chunk stored at blob `offset`."""
    for name in names:
        if any(c.blob_offset <= offset < c.blob_end for c in layer.toc.lookup(name).chunks):
            return name
    return None


def test_the_files_a_command_line_names_are_asked_for_before_its_programs_are_in(tmp_path, open_layer):
    """A program is read for the libraries it loads, which waits for its first chunk; the files
    the command names do not wait for that (on a real link the program's bytes take a round trip
    and more to come, and the link would be idle for the files meanwhile)."""
    upper, lower = _image_layers(tmp_path)
    config = lazy_config(prefetch_piece_size=64 << 10)
    top_src = FaultySource(upper.path)
    top, _ = open_layer(upper, source=top_src, config=config)
    bottom, bottom_src = open_layer(lower, config=config)
    top_src.stall = True  # the programs' layer answers nothing yet
    plan = StartFetch([top, bottom], StartCommand.from_config(_config(["/bin/sh", "-c", "prog /data/model.bin"])),
                      limit=64 << 20, file_limit=64 << 20)
    runner = threading.Thread(target=plan.run)
    runner.start()
    try:
        wait_until(lambda: any(_file_at(bottom, o, ("data/model.bin",)) for o, _ in list(bottom_src.log)), timeout=8)
        assert top_src.entered.is_set() and not _cached(top, "usr/bin/prog")  # asked for, not in
    finally:
        top_src.release.set()
    runner.join(30)
    assert not runner.is_alive()
    for layer in (top, bottom):
        assert layer.drain(30)
    # what the programs load was still found and fetched, once they were in
    assert f"/{LIBDIR}/libc.so.6" in plan.report.programs and _cached(bottom, f"{LIBDIR}/libc.so.6")
    assert plan.report.files == ["/data/model.bin"] and _cached(bottom, "data/model.bin")


def test_the_files_a_command_line_names_come_in_the_order_named_one_piece_after_another(tmp_path, open_layer,
                                                                                        monkeypatch):
    """`cat b a` reads b first: b's chunks are asked for first, a piece (here 64 KiB) at a time,
    whatever the order the files are stored in."""
    monkeypatch.setattr(pieces, "HAND_OFF", 0)  # the next piece only once the last is in: an exact order
    upper, lower = _image_layers(tmp_path)
    config = lazy_config(prefetch_piece_size=64 << 10)
    top, _ = open_layer(upper, config=config)
    bottom, bottom_src = open_layer(lower, config=config)
    stored = sorted(("data/model.bin", "data/unread.bin", "etc/app.conf"),
                    key=lambda n: bottom.toc.lookup(n).chunks[0].blob_offset)
    named = (stored[2], stored[0], stored[1])  # not the order they are stored in
    bottom_src.reset_counters()
    plan = _run([top, bottom], ["/bin/sh", "-c", "cat " + " ".join("/" + n for n in named)])
    assert plan.report.files == ["/" + n for n in named]
    order = [_file_at(bottom, o, named) for o, _ in bottom_src.log]  # (logged as asked, before it is read)
    order = [n for n in order if n is not None]  # (the libraries the program loads come beside them)
    assert [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n] == list(named)
    assert order.count(named[1]) > 1  # 300 kB, 64 KiB pieces: several requests, one after another
    sizes = [length for offset, length in bottom_src.log if _file_at(bottom, offset, named)]
    assert max(sizes) <= 2 * (64 << 10)  # a piece (and a chunk that straddles its end)
    for n in named:
        assert _cached(bottom, n)
    assert bottom.stats()["start_chunks"] >= sum(len(bottom.toc.lookup(n).chunks) for n in named)


def test_a_script_is_read_for_its_commands_and_paths_one_level_deep(image):
    layers, _ = image
    top, bottom = layers
    plan = _run(layers, ["/bin/sh", "/app/start.sh"])
    assert "/app/start.sh" in plan.report.files
    assert {"/usr/bin/tool", "/usr/bin/prog"} <= set(plan.report.programs)
    assert {"/data/model.bin", "/etc/app.conf"} <= set(plan.report.files)
    assert "/data/unread.bin" not in plan.report.files  # a comment, and a `>` target
    assert not _cached(bottom, "data/unread.bin")
    assert _cached(bottom, "data/model.bin") and _cached(top, "usr/bin/tool")


def test_a_program_found_on_path_with_jar_style_arguments(image):
    layers, _ = image
    plan = _run(layers, ["prog", "-cp", "/etc/app.conf:/data/model.bin:/nowhere.jar", "Main"])
    assert plan.report.programs[0] == "/usr/bin/prog"
    assert set(plan.report.files) == {"/etc/app.conf", "/data/model.bin"}


def test_shell_flags_and_program_text(image):
    layers, _ = image
    plan = _run(layers, ["/bin/sh", "-ec", "tool /etc/app.conf"])  # -c among other flags
    assert plan.report.programs[:2] == ["/usr/bin/sh", "/usr/bin/tool"] and plan.report.files == ["/etc/app.conf"]
    # Another language's `-c CODE`: the paths written in the code
    plan = _run(layers, ["prog", "-c", "import sys\nprint(open('/data/model.bin', 'rb').read(4), '/nowhere')"])
    assert plan.report.files == ["/data/model.bin"]


def test_an_entrypoint_script_is_read_and_its_cmd_is_a_program(image):
    """`ENTRYPOINT ["tini", "--", "/app/start.sh"]`, `CMD ["other"]`: tini, the script (an
    executable `#!/bin/sh` file: its interpreter and its commands), and the program it execs."""
    layers, _ = image
    top, bottom = layers
    plan = _run(layers, ["tini", "--", "/app/start.sh", "other"])
    assert plan.report.programs[:3] == ["/usr/bin/tini", "/app/start.sh", "/usr/bin/other"]
    assert {"/usr/bin/sh", "/usr/bin/tool", "/usr/bin/prog"} <= set(plan.report.programs)
    assert {"/data/model.bin", "/etc/app.conf"} <= set(plan.report.files)
    assert _cached(bottom, "usr/bin/other") and _cached(bottom, "data/model.bin")


def test_wrappers_in_a_shell_line_run_the_command_after_their_options(image):
    layers, _ = image
    plan = _run(layers, ["/bin/sh", "-c", "env A=1 B=2 timeout 10s tool -v /etc/app.conf"])
    assert plan.report.programs[:3] == ["/usr/bin/sh", "/usr/bin/env", "/usr/bin/tool"]
    assert plan.report.files == ["/etc/app.conf"]


def test_the_limit_bounds_what_is_started(image):
    layers, _ = image
    top, bottom = layers
    size_of = lambda layer, name: sum(c.blob_end - c.blob_offset for c in layer.toc.lookup(name).chunks)  # noqa: E731
    limit = size_of(top, "usr/bin/sh") + 1000  # the shell only
    plan = _run(layers, ["/bin/sh", "-c", "cat /data/model.bin"], limit=limit)
    assert plan.report.programs == ["/usr/bin/sh"]
    assert "/data/model.bin" in plan.report.skipped and plan.report.started_bytes <= limit
    assert not _cached(bottom, "data/model.bin")


def test_the_command_of_an_image_config():
    cmd = StartCommand.from_config(json.dumps({"config": {
        "Entrypoint": ["/entry.sh"], "Cmd": ["--serve", "/srv"], "Env": ["A=1", "PATH=/opt/bin:relative:/bin"],
        "WorkingDir": "/work"}}).encode())
    assert cmd == StartCommand(("/entry.sh", "--serve", "/srv"), ("/opt/bin", "/bin"), "/work")
    assert StartCommand.from_config(b'{"config": {"Env": ["PATH=/bin"]}}') is None  # no command
    assert StartCommand.from_config(b"not json") is None
    assert StartCommand.from_config(b'{"config": {"Cmd": "/bin/sh -c date"}}') is None  # not an array
    assert StartCommand.from_config(b'{"config": {"Cmd": ["/bin/true"]}}').path[-1] == "/bin"  # the default PATH


def test_an_optimized_image_is_left_to_its_prefetch(tmp_path, open_layer):
    """A layer with prioritized files (a `.prefetch.landmark`) carries the record of the start:
    no guess is made on top of its prefetch; the same image unoptimized gets one."""
    files = {"bin/tool": RND.randbytes(50_000), "etc/app.conf": CONF}
    config = LayerConfig(fetch_timeout=10.0, no_background_fetch=True)  # production policies, prefetch on
    optimized, _ = open_layer(build_layer(tmp_path / "opt", files, prioritized=("etc/app.conf",),
                                          executables=("bin/tool",)), config=config)
    plain, _ = open_layer(build_layer(tmp_path / "plain", files, executables=("bin/tool",)), config=config)
    assert optimized.toc.prefetch_landmark_offset is not None and plain.toc.prefetch_landmark_offset is None
    cmd = _config(["/bin/tool", "/etc/app.conf"])
    assert start_image([optimized], cmd) is None
    thread = start_image([plain], cmd)
    assert thread is not None
    thread.join(30)
    assert plain.drain(30) and plain.stats()["start_chunks"] > 0


def test_the_baseline_and_a_zero_limit_start_nothing(image):
    layers, sources = image
    assert LayerConfig().start_fetch_limit > 0 and LayerConfig().baseline().start_fetch_limit == 0
    for s in sources:
        s.reset_counters()
    # the test layers run `lazy_config()`, every policy off, start fetch included
    assert start_image(layers, _config(["/bin/sh", "-c", "cat /data/model.bin"])) is None
    assert sum(s.calls for s in sources) == 0


@pytest.mark.parametrize("argv, started, fetched", [
    (["python3", "-c", "import json, mylib.util\nprint(1)"], 2, {"json/__init__.py", "json/decoder.py", "mylib/util.py"}),
    (["python3", "-u", "-m", "mylib.util"], 1, {"mylib/util.py"}),
    (["python3", "-c", "print(1)"], 0, set()),
])
def test_a_python_command_hands_its_imports_to_import_readahead(tmp_path, open_layer, argv, started, fetched):
    """`python3 -c CODE` / `-m MODULE`: the modules it imports are fetched before Python runs, and
    what those import in turn (json/__init__ imports .decoder); not what it does not import.
    (An empty file has no chunks: nothing to fetch.)"""
    from stargz_store.layer.policies.imports import ImportReadahead

    lib = "usr/lib/python3.11"
    files = {"usr/bin/python3.11": PROGRAM_BYTES, f"{lib}/json/__init__.py": b"from .decoder import JSONDecoder\n",
             f"{lib}/json/decoder.py": b"x = 1\n", f"{lib}/mylib/__init__.py": b"",
             f"{lib}/mylib/util.py": b"y = 2\n" * 10, f"{lib}/unused.py": RND.randbytes(30_000).hex().encode()}
    dirs = sorted({"/".join(n.split("/")[: i + 1]) for n in files for i in range(n.count("/"))})
    built = layer_of(tmp_path / "l", [tar_member(d, tarfile.DIRTYPE, mode=0o755) for d in dirs] + [
        tar_member("usr/bin/python3", tarfile.SYMTYPE, link="python3.11"),
        *(tar_member(n, size=len(b), mode=0o755 if n.startswith("usr/bin") else 0o644) for n, b in files.items())],
        files)
    worker = ImportReadahead()
    layer, _ = open_layer(built, config=lazy_config(import_readahead=True), import_worker=worker)
    try:
        layer.attach_image(lambda: [layer])
        plan = _run([layer], argv)
        worker.close()
        worker._thread.join(10)  # what the command's modules import, looked at
        assert layer.drain(30)
        assert plan.report.modules == started  # json/__init__.py and mylib/util.py (mylib/__init__.py is empty)
        python_files = {name.removeprefix(f"{lib}/") for name in files if name.startswith(lib) and files[name]
                        and _cached(layer, name)}
        assert python_files == fetched
    finally:
        worker.close()
