"""The benchmark's `docker-registry`: filled on loopback, served from the namespace, counted from its access log.

Filling (pushing and converting) goes through a registry on 127.0.0.1 so it does
not crawl over the shaped link; the measured registry then serves the same
storage directory from inside the namespace. Its access log (combined log
format, body bytes per response) gives the bytes each run fetched.
"""
from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import leftovers

# 10.213.77.1 - - [28/Nov/2026:05:42:44 +0000] "GET /v2/r/blobs/sha256:... HTTP/1.1" 206 100 "" "ua"
_ACCESS_RE = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


class RegistryError(RuntimeError):
    """The registry did not start or stopped answering."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One `docker-registry` process over `data_dir`, optionally run inside the benchmark's namespace."""

    def __init__(self, data_dir: Path, work_dir: Path, address: str, port: int, netns_prefix: list[str] | None = None):
        self.data_dir = data_dir
        self.work_dir = work_dir
        self.address = address
        self.port = port
        self.netns_prefix = netns_prefix or []
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"registry-{self.address}.log"

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / f"registry-{self.address}.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.data_dir}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
        )
        return config

    def garbage_collect(self) -> None:
        """Delete blobs no tag reaches any more (earlier conversions, the old probe); registry stopped."""
        if self.proc is not None:
            raise RegistryError("garbage collection needs the registry stopped")
        config = self._write_config()
        result = subprocess.run(["docker-registry", "garbage-collect", "--delete-untagged", str(config)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RegistryError(f"docker-registry garbage-collect failed: {result.stderr.strip()[-1500:]}")

    def start(self, timeout: float = 20.0) -> None:
        config = self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.netns_prefix, "docker-registry", "serve", str(config)],
                                         stdout=log, stderr=log, preexec_fn=leftovers.die_with_parent())
        leftovers.record_pid(self.proc.pid, str(config))  # its own config path: no other registry has it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RegistryError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        self.stop()
        raise RegistryError(f"docker-registry on {self.host} did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # `ip netns exec` execs the registry, so this pid is the registry itself
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

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

    def log_mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def fetched_between(self, mark: int, end: int | None = None) -> tuple[int, int]:
        """(body bytes of GET responses, number of blob GETs) logged between two `log_mark()`s."""
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            data = f.read() if end is None else f.read(max(0, end - mark))
        text = data.decode(errors="replace")
        total = blob_gets = 0
        for m in _ACCESS_RE.finditer(text):
            method, path, _status, size = m.groups()
            if method != "GET":
                continue
            total += int(size) if size.isdigit() else 0
            if "/blobs/" in path:
                blob_gets += 1
        return total, blob_gets
