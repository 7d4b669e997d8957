"""`--record-in`: the record file format, and prioritized files ending up first in every layer."""
from __future__ import annotations

import io
import tarfile

import pytest

from stargz_store.convert.errors import RecordFileError
from stargz_store.convert.record import parse_record, parse_record_file, read_record_file
from stargz_store.formats.detect import read_layer_toc

from tests.convert.layer_compare import assert_layer_matches_source, read_converted_layer, run_convert, uncompressed
from tests.fixtures.images import read_oci_image


def test_parse_record_keeps_file_order_and_drops_duplicates():
    text = (
        '{"path": "usr/bin/bash", "manifestDigest": "sha256:00", "layerIndex": 0}\n'
        '{"path":"/etc/passwd"} {"path": "./usr/bin/bash"}\n'
        '\n   {"path": "../lib/x.so",\n "layerIndex": 1}\n'
        '{"path": "etc/passwd"}'
    )
    assert parse_record(text) == ["usr/bin/bash", "etc/passwd", "lib/x.so"]


def test_parse_record_empty_file_means_no_prioritized_files():
    assert parse_record("  \n\n") == []


@pytest.mark.parametrize("text, words", [
    ('{"path": "a"}\n{"path": ', "invalid JSON at line 2"),
    ('["a"]', 'line 1: expected an object with a string "path"'),
    ('{"path": "a"}\n{"name": "b"}', 'line 2: expected an object with a string "path"'),
    ('{"path": 3}', 'string "path"'),
])
def test_parse_record_rejects_bad_input_saying_where(text, words):
    with pytest.raises(RecordFileError) as info:
        parse_record(text, "rec.json")
    assert "rec.json" in str(info.value)
    assert words in str(info.value)


def test_read_record_file_missing(tmp_path):
    with pytest.raises(RecordFileError, match="cannot read record file"):
        read_record_file(tmp_path / "nope.json")


def _stream_names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(uncompressed(blob)), mode="r:") as tf:
        return [m.name.rstrip("/").removeprefix("./") for m in tf]


def test_record_in_puts_listed_files_first_in_every_layer(source_image, source_tars, tmp_path):
    record = tmp_path / "record.json"
    record.write_text(
        '{"path": "etc/motd"}\n'
        '{"path": "/data/text.txt"}\n'
        '{"path": "./bin/busybox"} {"path": "data/text.txt"}\n'
        '{"path": "does/not/exist"}\n'
    )
    out = tmp_path / "out"
    proc = run_convert("--record-in", str(record), source_image.ref, f"oci:{out}:r")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(out, "r")
    base, upper = (image.blob(d["digest"]) for d in image.layers)

    # Each layer gets the listed paths it holds (parents first), then the landmark, then the rest.
    base_names = _stream_names(base)
    landmark = base_names.index(".prefetch.landmark")
    assert base_names[:landmark] == ["data", "data/text.txt", "bin", "bin/busybox"]
    upper_names = _stream_names(upper)
    landmark = upper_names.index(".prefetch.landmark")
    assert upper_names[:landmark] == ["etc", "etc/motd"]
    for names in (base_names, upper_names):
        assert ".no.prefetch.landmark" not in names
        assert names[-1] == "stargz.index.json"

    # The TOC agrees: prefetching [0, landmark offset) covers exactly the prioritized payloads.
    desc = image.layers[0]
    parsed = read_layer_toc(lambda o, n: base[o:o + n], len(base), desc)
    landmark_offset = parsed.toc.lookup(".prefetch.landmark").chunks[0].blob_offset
    before = [e.name for e in parsed.toc.files_in_blob_order() if e.chunks[0].blob_offset < landmark_offset]
    assert before == ["data/text.txt", "bin/busybox"]

    # Reordering changes nothing about the content.
    for d, source_tar in zip(image.layers, source_tars):
        assert_layer_matches_source(read_converted_layer(image.blob(d["digest"]), d), source_tar)


def test_record_in_with_only_unknown_paths_still_marks_prefetch(source_image, tmp_path):
    record = tmp_path / "record.json"
    record.write_text('{"path": "nowhere"}\n')
    out = tmp_path / "out"
    assert run_convert("--record-in", str(record), source_image.ref, f"oci:{out}:r").returncode == 0
    image = read_oci_image(out, "r")
    for d in image.layers:
        assert _stream_names(image.blob(d["digest"]))[0] == ".prefetch.landmark"


def test_bad_record_file_is_a_clear_error(source_image, tmp_path):
    record = tmp_path / "record.json"
    record.write_text('{"path": "a"}\n{oops}\n')
    proc = run_convert("--record-in", str(record), source_image.ref, f"oci:{tmp_path / 'out'}:r")
    assert proc.returncode == 1
    assert "record.json" in proc.stderr and "line 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_record_in_with_dot_slash_tar_moves_the_root_entry_too(tmp_path):
    """Tars from `tar -C dir .` name entries `./x` and have a root `./`; record paths match them
    without the prefix, and the root moves first (estargz.md §8.3)."""
    from tests.fixtures.images import write_oci_image

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("./", None), ("./a.txt", b"a"), ("./etc/", None), ("./etc/motd", b"m")]:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data else None)
    src = write_oci_image(tmp_path / "src", [buf.getvalue()], tag="t")
    record = tmp_path / "record.json"
    record.write_text('{"path": "/etc/motd"}')
    proc = run_convert("--record-in", str(record), src.ref, f"oci:{tmp_path / 'out'}:t")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out", "t")
    names = _stream_names(image.blob(image.layers[0]["digest"]))
    assert names == [".", "etc", "etc/motd", ".prefetch.landmark", "a.txt", "stargz.index.json"]


def test_parse_record_with_a_layer_index_on_every_line_lists_paths_per_layer():
    text = ('{"path": "bin/sh", "layerIndex": 0, "manifestDigest": "sha256:00", "size": 5}\n'
            '{"path": "app/run.sh", "layerIndex": 2}\n{"path": "/bin/busybox", "layerIndex": 0}\n'
            '{"path": "bin/sh", "layerIndex": 0}\n')
    record = parse_record_file(text)
    assert record.paths == ("bin/sh", "app/run.sh", "bin/busybox")
    assert record.by_layer == (("bin/sh", "bin/busybox"), (), ("app/run.sh",))


def test_parse_record_refuses_a_layer_index_that_is_not_one():
    with pytest.raises(RecordFileError, match='line 2: "layerIndex" must be an integer'):
        parse_record_file('{"path": "a", "layerIndex": 0}\n{"path": "b", "layerIndex": "1"}\n', "rec.json")


def test_record_in_with_layer_indexes_prioritizes_each_layer_only_with_its_own_files(source_image, tmp_path):
    """ctr-remote optimize's flavour (and `stargz-store record`'s): a path goes first only in the
    layer it was read from; a layer nothing was read from gets `.no.prefetch.landmark`."""
    record = tmp_path / "record.json"
    record.write_text('{"path": "bin/busybox", "layerIndex": 0}\n{"path": "etc/motd", "layerIndex": 1}\n')
    out = tmp_path / "out"
    proc = run_convert("--record-in", str(record), source_image.ref, f"oci:{out}:r")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(out, "r")
    base, upper = (_stream_names(image.blob(d["digest"])) for d in image.layers)
    assert base[:base.index(".prefetch.landmark")] == ["bin", "bin/busybox"]
    assert upper[:upper.index(".prefetch.landmark")] == ["etc", "etc/motd"]

    record.write_text('{"path": "data/text.txt", "layerIndex": 0}\n')
    proc = run_convert("--record-in", str(record), source_image.ref, f"oci:{tmp_path / 'out2'}:r")
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(tmp_path / "out2", "r")
    base, upper = (_stream_names(image.blob(d["digest"])) for d in image.layers)
    assert base[:base.index(".prefetch.landmark")] == ["data", "data/text.txt"]
    assert ".no.prefetch.landmark" in upper and ".prefetch.landmark" not in upper


def test_record_in_warns_naming_the_paths_no_layer_holds(source_image, tmp_path):
    record = tmp_path / "record.json"
    record.write_text('{"path": "etc/motd"}\n{"path": "does/not/exist"}\n{"path": "/also/missing.so"}\n')
    proc = run_convert("--record-in", str(record), source_image.ref, f"oci:{tmp_path / 'out'}:r")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 prioritized paths are not in any layer" in proc.stderr
    assert "does/not/exist" in proc.stderr and "also/missing.so" in proc.stderr
    assert "etc/motd" not in proc.stderr

    record.write_text('{"path": "etc/motd"}\n')
    proc = run_convert("--record-in", str(record), source_image.ref, f"oci:{tmp_path / 'out2'}:r")
    assert proc.returncode == 0 and "prioritized paths" not in proc.stderr


def test_record_in_orders_zstd_chunked_layers_and_marks_the_prefetch(source_image, source_tars, tmp_path):
    """zstd:chunked has no landmark of its own: the tar is rewritten in eStargz's order with a
    `.prefetch.landmark` after the recorded files, which the store prefetches up to in any format;
    the layer still holds exactly the source's files."""
    record = tmp_path / "record.json"
    record.write_text('{"path": "etc/motd"}\n{"path": "bin/busybox"}\n')
    out = tmp_path / "out"
    proc = run_convert("--format", "zstd-chunked", "--record-in", str(record), source_image.ref, f"oci:{out}:z")
    assert proc.returncode == 0, proc.stderr
    assert "does not support" not in proc.stderr
    image = read_oci_image(out, "z")
    base, upper = image.layers
    for desc, first in ((base, ["bin/busybox"]), (upper, ["etc/motd"])):
        blob = image.blob(desc["digest"])
        parsed = read_layer_toc(lambda o, n: blob[o:o + n], len(blob), desc)
        landmark = parsed.toc.prefetch_landmark_offset
        assert landmark is not None
        before = [e.name for e in parsed.toc.files_in_blob_order() if e.chunks[0].blob_offset < landmark]
        assert before == first
    for d, source_tar in zip(image.layers, source_tars):
        assert_layer_matches_source(read_converted_layer(image.blob(d["digest"]), d), source_tar)
