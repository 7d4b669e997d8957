"""The converter as a library (`convert_image`), its determinism, and progress only on a terminal."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from stargz_store.convert.converter import ConvertOptions, ProgressEvent, convert_image
from stargz_store.convert.location import OciLocation
from stargz_store.convert.oci_layout import OciLayoutDestination, OciLayoutSource

from tests.convert.layer_compare import REPO_ROOT, run_convert
from tests.fixtures.images import read_oci_image


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_same_output_with_threads_or_processes(fmt, source_image, tmp_path):
    digests = []
    for executor in ("thread", "process"):
        out = tmp_path / executor
        events: list[ProgressEvent] = []
        result = convert_image(
            OciLayoutSource(OciLocation(source_image.layout, source_image.tag)),
            OciLayoutDestination(OciLocation(out, "x")),
            ConvertOptions(format=fmt, jobs=2, executor=executor),
            events.append,
        )
        assert result.manifest.digest == read_oci_image(out, "x").manifest_digest
        assert set(result.layers) == set(source_image.layer_digests)
        assert [e.kind for e in events].count("done") == 2
        assert {e.digest for e in events if e.kind == "start"} == set(source_image.layer_digests)
        digests.append(result.manifest.digest)
    assert digests[0] == digests[1]


def test_no_temporary_files_left_in_the_layout(source_image, tmp_path):
    out = tmp_path / "out"
    assert run_convert(source_image.ref, f"oci:{out}:x").returncode == 0
    leftovers = [p.name for p in out.iterdir() if p.name not in ("blobs", "index.json", "oci-layout")]
    assert leftovers == []
    manifest = read_oci_image(out, "x")
    referenced = {manifest.manifest_digest, manifest.manifest["config"]["digest"],
                  *(d["digest"] for d in manifest.layers)}
    stored = {"sha256:" + p.name for p in (out / "blobs" / "sha256").iterdir()}
    assert stored == referenced


def test_quiet_when_stderr_is_not_a_terminal(source_image, tmp_path):
    proc = run_convert(source_image.ref, f"oci:{tmp_path / 'out'}:x")
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_progress_when_stderr_is_a_terminal(source_image, tmp_path):
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "stargz_store.cli", "convert", source_image.ref, f"oci:{tmp_path / 'out'}:x"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=terminal, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO once the terminal side is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert proc.returncode == 0
    text = output.decode()
    assert text.count("converting layer") == 2
    assert "[2/2]" in text
    assert "converted oci:" in text


def test_concurrent_conversions_into_one_layout_keep_every_tag(source_image, tmp_path):
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "stargz_store.cli", "convert", "--jobs", "1",
                               source_image.ref, f"oci:{out}:t{i}"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
             for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for i in range(4):
        assert read_oci_image(out, f"t{i}").manifest_digest == read_oci_image(out, "t0").manifest_digest
