"""Source images for the converter tests, built once per session with tests/fixtures/images.py."""
from __future__ import annotations

import pytest

from tests.fixtures.images import LayerBuilder, random_bytes, text_bytes, write_oci_image

LONG_NAME = "deep/" + "d" * 90 + "/" + "f" * 120 + ".txt"


def base_layer() -> LayerBuilder:
    """busybox plus one entry of each kind the converter must carry over."""
    layer = LayerBuilder()
    layer.add_busybox()
    layer.add_file("hello.txt", b"hello from the source image\n")
    layer.add_file("big/random.bin", random_bytes((9 << 20) + 123, seed=7))  # several 4 MiB chunks
    layer.add_file("data/text.txt", text_bytes(300_000, seed=3))
    layer.add_file("data/empty", b"")
    layer.add_hardlink("data/text-link.txt", "data/text.txt")
    layer.add_symlink("data/abs-link", "/hello.txt")
    layer.add_file("etc/suid", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1001)
    layer.add_file("etc/attrs", b"x", xattrs={"user.comment": b"kept"})
    layer.add_file("caf\u00e9/na\u00efve.txt", "non-ASCII name\n".encode())
    layer.add_file(LONG_NAME, b"long name\n")
    layer.add_device("dev/null-copy", char=True, major=1, minor=3)
    layer.add_fifo("data/fifo")
    layer.add_dir("tmp", mode=0o1777)
    return layer


def upper_layer() -> LayerBuilder:
    """Whiteouts on top of the base, plus a re-added file."""
    layer = LayerBuilder(mtime=1_700_000_100)
    layer.add_whiteout("hello.txt")
    layer.add_dir("data")
    layer.add_opaque("data")
    layer.add_file("data/new.txt", b"only file left in data\n", parents=False)
    layer.add_file("etc/motd", b"converted image says hi\n")
    return layer


@pytest.fixture(scope="session")
def source_tars() -> list[bytes]:
    """The uncompressed layer tars of `source_image`, bottom first."""
    return [base_layer().tar(), upper_layer().tar()]


@pytest.fixture(scope="session")
def source_image(tmp_path_factory, source_tars):
    """A two-layer OCI image layout tagged `v1` whose command prints /etc/motd."""
    return write_oci_image(tmp_path_factory.mktemp("source") / "layout", source_tars, tag="v1",
                           config_extra={"Cmd": ["/bin/cat", "/etc/motd"]})
