"""Converting from and to a real `docker-registry`: content, push order, auth and reachability errors."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

from stargz_store.formats.layer_toc import ANNOTATION_TOC_DIGEST, ANNOTATION_ZSTD_MANIFEST_CHECKSUM

from tests.convert.layer_compare import assert_layer_matches_source, read_converted_layer, run_convert, uncompressed
from tests.convert.test_cli_errors import assert_clear_failure
from tests.fixtures.images import push_oci_layout, read_oci_image, sha256_digest, write_oci_index, LayerBuilder
from tests.fixtures.registry import Registry, free_port, need_registry_binary

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # bcrypt htpasswd entries without extra packages (glibc/libxcrypt); Python 3.11 only warns

ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def _get(url: str, accept: str | None = None, auth: str | None = None) -> tuple[bytes, str]:
    req = urllib.request.Request(url)
    if accept:
        req.add_header("Accept", accept)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read(), resp.headers.get("Content-Type", "")


class PulledImage:
    """An image read straight over HTTP (not through our client), for independent checks."""

    def __init__(self, registry: Registry, repo: str, ref: str, auth: str | None = None) -> None:
        self.base = f"{registry.url}/v2/{repo}"
        self.auth = auth
        self.raw, self.media_type = _get(f"{self.base}/manifests/{ref}", ACCEPT, auth)
        self.manifest = json.loads(self.raw)

    def blob(self, digest: str) -> bytes:
        data, _ = _get(f"{self.base}/blobs/{digest}", auth=self.auth)
        assert sha256_digest(data) == digest
        return data

    @property
    def config(self) -> dict:
        return json.loads(self.blob(self.manifest["config"]["digest"]))


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """No credentials from this machine: an empty auth file."""
    auth = tmp_path / "empty-auth.json"
    auth.write_text('{"auths": {}}')
    return {**os.environ, "REGISTRY_AUTH_FILE": str(auth)}


@pytest.mark.parametrize("fmt, key", [("estargz", ANNOTATION_TOC_DIGEST), ("zstd-chunked", ANNOTATION_ZSTD_MANIFEST_CHECKSUM)])
def test_oci_to_registry(fmt, key, source_image, source_tars, registry, tmp_path):
    repo = f"convert/oci-to-reg-{fmt}"
    proc = run_convert("--format", fmt, source_image.ref, f"docker://{registry.host}/{repo}:conv", env=_clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    pulled = PulledImage(registry, repo, "conv")
    assert pulled.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert sha256_digest(pulled.raw) == proc.stdout.strip()
    diff_ids = pulled.config["rootfs"]["diff_ids"]
    for desc, source_tar, diff_id in zip(pulled.manifest["layers"], source_tars, diff_ids):
        assert desc["annotations"][key].startswith("sha256:")
        blob = pulled.blob(desc["digest"])
        assert sha256_digest(uncompressed(blob)) == diff_id
        assert_layer_matches_source(read_converted_layer(blob, desc), source_tar)


def test_registry_to_oci(source_image, source_tars, registry, tmp_path):
    push_oci_layout(source_image.layout, source_image.tag, f"{registry.host}/convert/source:v1")
    out = tmp_path / "out"
    proc = run_convert(f"docker://{registry.host}/convert/source:v1", f"oci:{out}:x", env=_clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    image = read_oci_image(out, "x")
    for desc, source_tar in zip(image.layers, source_tars):
        assert_layer_matches_source(read_converted_layer(image.blob(desc["digest"]), desc), source_tar)


def test_registry_to_registry_all_platforms(registry, tmp_path):
    layers = {p: [LayerBuilder().add_file("arch.txt", p.encode()).gzip()] for p in ("linux/amd64", "linux/arm64")}
    write_oci_index(tmp_path / "multi", layers, tag="m")
    push_oci_layout(tmp_path / "multi", "m", f"{registry.host}/convert/multi:m")
    proc = run_convert("--all-platforms", f"docker://{registry.host}/convert/multi:m",
                       f"docker://{registry.host}/convert/multi:esgz", env=_clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    index = PulledImage(registry, "convert/multi", "esgz")
    assert index.manifest["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"]["architecture"] for m in index.manifest["manifests"]] == ["amd64", "arm64"]
    for entry in index.manifest["manifests"]:
        child = PulledImage(registry, "convert/multi", entry["digest"])
        desc = child.manifest["layers"][0]
        tree = read_converted_layer(child.blob(desc["digest"]), desc)
        arch = f"linux/{entry['platform']['architecture']}".encode()
        assert tree["arch.txt"]["sha256"] == sha256_digest(arch).split(":")[1]


def test_blobs_are_pushed_before_the_manifest(source_image, registry, tmp_path):
    """The access log shows every blob upload finished before the manifest PUT."""
    repo = "convert/order"
    proc = run_convert(source_image.ref, f"docker://{registry.host}/{repo}:o", env=_clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in registry.log_path.read_text(errors="replace").splitlines() if f"/v2/{repo}/" in line]
    puts = [i for i, line in enumerate(lines) if '"PUT /v2/' in line]
    manifest_puts = [i for i in puts if "/manifests/" in lines[i]]
    blob_puts = [i for i in puts if "/blobs/uploads/" in lines[i]]
    assert len(manifest_puts) == 1 and len(blob_puts) >= 3  # two layers and the config
    assert max(blob_puts) < manifest_puts[0]


def test_missing_image_in_registry(registry, tmp_path):
    proc = run_convert(f"docker://{registry.host}/convert/absent:v1", f"oci:{tmp_path / 'out'}:x",
                       env=_clean_env(tmp_path))
    assert_clear_failure(proc, 1, "not found", "convert/absent")


def test_unreachable_registry(source_image, tmp_path):
    port = free_port()  # nothing listens there
    proc = run_convert(f"docker://127.0.0.1:{port}/x:v1", f"oci:{tmp_path / 'out'}:x", env=_clean_env(tmp_path))
    assert_clear_failure(proc, 1, "unreachable", f"127.0.0.1:{port}")
    proc = run_convert(source_image.ref, f"docker://127.0.0.1:{port}/x:v1", env=_clean_env(tmp_path))
    assert_clear_failure(proc, 1, "unreachable")


@pytest.fixture
def auth_registry(tmp_path):
    """A registry that wants Basic auth (htpasswd, bcrypt), user `conv` password `s3cret`."""
    need_registry_binary()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"conv:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n")
    reg = Registry(tmp_path / "auth-registry",
                   extra_config=f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n")
    reg.start()
    yield reg
    reg.stop()


def _auth_file(tmp_path: Path, host: str, user: str, password: str) -> Path:
    path = tmp_path / f"auth-{user}.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_credentials_from_auth_file(auth_registry, source_image, source_tars, tmp_path):
    good = _auth_file(tmp_path, auth_registry.host, "conv", "s3cret")
    proc = run_convert("--authfile", str(good), source_image.ref, f"docker://{auth_registry.host}/convert/auth:a",
                       env=_clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    pulled = PulledImage(auth_registry, "convert/auth", "a", auth="conv:s3cret")
    desc = pulled.manifest["layers"][1]
    assert_layer_matches_source(read_converted_layer(pulled.blob(desc["digest"]), desc), source_tars[1])


def test_bad_credentials(auth_registry, source_image, tmp_path):
    bad = _auth_file(tmp_path, auth_registry.host, "conv", "wrong")
    proc = run_convert("--authfile", str(bad), source_image.ref, f"docker://{auth_registry.host}/convert/auth:b",
                       env=_clean_env(tmp_path))
    assert_clear_failure(proc, 1, "authentication failed")
    assert "wrong" not in proc.stderr and "s3cret" not in proc.stderr


def test_no_credentials(auth_registry, tmp_path):
    proc = run_convert(f"docker://{auth_registry.host}/convert/auth:a", f"oci:{tmp_path / 'out'}:x",
                       env=_clean_env(tmp_path))
    assert_clear_failure(proc, 1, "authentication failed")
    with pytest.raises(urllib.error.HTTPError):  # the registry really does want credentials
        _get(f"{auth_registry.url}/v2/convert/auth/manifests/a", ACCEPT)
