"""The benchmark's `docker-registry`: filled on loopback, served from the namespace, counted from its access log.

Filling (pushing and converting) goes through a registry on 127.0.0.1 so it does
not crawl over the shaped link; the measured registry then serves the same
storage directory from inside the namespace. Its access log (combined log
format, body bytes per response) gives the bytes each run fetched.
"""
from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from stargz_store.localenv.procs import free_port
from stargz_store.localenv.registry import LocalRegistry, RegistryStartError

from . import leftovers

__all__ = ["Registry", "RegistryError", "free_port"]

# 10.213.77.1 - - [28/Nov/2026:05:42:44 +0000] "GET /v2/r/blobs/sha256:... HTTP/1.1" 206 100 "" "ua"
_ACCESS_RE = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')

RegistryError = RegistryStartError  # the benchmark's name: the registry did not start or stopped answering


class Registry(LocalRegistry):
    """One `docker-registry` process over `data_dir`, optionally run inside the benchmark's namespace."""

    def __init__(self, data_dir: Path, work_dir: Path, address: str, port: int, netns_prefix: list[str] | None = None):
        super().__init__(
            workdir=work_dir, port=port, address=address, data_dir=data_dir, log_level="error",
            config_name=f"registry-{address}.yml", log_name=f"registry-{address}.log",
            command_prefix=list(netns_prefix or []), preexec_fn=leftovers.die_with_parent(),
        )

    @property
    def work_dir(self) -> Path:
        return self.workdir

    def _spawned(self) -> None:
        assert self.proc is not None
        # its own config path: no other registry has it
        leftovers.record_pid(self.proc.pid, str(self.workdir / self.config_name))

    def garbage_collect(self) -> None:
        """Delete blobs no tag reaches any more (earlier conversions, the old probe); registry stopped."""
        if self.proc is not None:
            raise RegistryError("garbage collection needs the registry stopped")
        if not (self.storage_dir / "docker/registry/v2/repositories").is_dir():
            return  # nothing pushed yet: docker-registry's collector fails on an empty storage
        config = self.write_config()
        result = subprocess.run(["docker-registry", "garbage-collect", "--delete-untagged", str(config)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RegistryError(f"docker-registry garbage-collect failed: {result.stderr.strip()[-1500:]}")

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)

    def has_manifest(self, repo: str, tag: str) -> bool:
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repo}/manifests/{tag}", method="HEAD",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json,"
                               "application/vnd.docker.distribution.manifest.v2+json"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
            return True
        except urllib.error.HTTPError:
            return False

    def manifest(self, repo: str, tag: str) -> dict:
        import json

        request = urllib.request.Request(
            f"http://{self.host}/v2/{repo}/manifests/{tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json,"
                               "application/vnd.docker.distribution.manifest.v2+json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def fetched_between(self, mark: int, end: int | None = None) -> tuple[int, int]:
        """(body bytes of GET responses, number of blob GETs) logged between two `log_mark()`s."""
        text = self.log_since(mark, end)
        total = blob_gets = 0
        for m in _ACCESS_RE.finditer(text):
            method, path, _status, size = m.groups()
            if method != "GET":
                continue
            total += int(size) if size.isdigit() else 0
            if "/blobs/" in path:
                blob_gets += 1
        return total, blob_gets
