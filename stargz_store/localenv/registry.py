"""A Debian `docker-registry` on 127.0.0.1 for demos, benchmarks and tests (not used by the daemon).

Plain HTTP, filesystem storage and the access log on: callers count what clients fetched
from the log (`log_mark()` / `log_since()`, `blob_get_count()`).

    reg = LocalRegistry(workdir)
    reg.start()            # returns once /v2/ answers
    ref = f"{reg.host}/repo:tag"
    reg.stop()
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LocalEnvError
from .procs import PreexecFn, free_port, log_tail, terminate, wait_for_http

log = logging.getLogger(__name__)


class RegistryStartError(LocalEnvError):
    """docker-registry exited or did not answer in time."""


@dataclass
class LocalRegistry:
    """One registry process; `host` is what goes into image references (`ADDRESS:PORT`).

    `data_dir` defaults to `workdir/data`; config and log live in `workdir`. `command_prefix`
    runs it elsewhere (e.g. `ip netns exec NS`, which execs, so `proc` stays the registry).
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    address: str = "127.0.0.1"
    data_dir: Path | None = None
    extra_config: str = ""
    log_level: str = "info"
    access_log: bool = True  # off where the log would only cost time (a benchmark that does not count)
    config_name: str = "config.yml"
    log_name: str = "registry.log"
    command_prefix: list[str] = field(default_factory=list)
    preexec_fn: PreexecFn | None = None
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / self.log_name

    @property
    def storage_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.workdir / "data"

    def write_config(self) -> Path:
        """Write the registry's config.yml (also what `docker-registry garbage-collect` reads)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / self.config_name
        config.write_text(
            "version: 0.1\n"
            f"log:\n  level: {self.log_level}\n  accesslog:\n    disabled: {'false' if self.access_log else 'true'}\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage_dir}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            + self.extra_config
        )
        return config

    def start(self, timeout: float = 15.0) -> None:
        """Start the registry and return once it answers; on failure stop it and raise with its log tail."""
        config = self.write_config()
        # docker-registry reads REGISTRY_* variables as config overrides: podman's REGISTRY_AUTH_FILE
        # in the caller's environment would make it refuse its config.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([*self.command_prefix, "docker-registry", "serve", str(config)],
                                         stdout=logf, stderr=logf, preexec_fn=self.preexec_fn, env=env)
        self._spawned()
        if wait_for_http(f"{self.url}/v2/", self.proc, timeout):
            log.debug("docker-registry up at %s (pid %d)", self.host, self.proc.pid)
            return
        exited = self.proc.poll() is not None
        self.stop()
        if exited:
            raise RegistryStartError(f"docker-registry exited: {log_tail(self.log_path, 2000)}")
        raise RegistryStartError(f"docker-registry on {self.host} did not answer within {timeout} s")

    def _spawned(self) -> None:
        """Hook right after the process exists (before it answers): a subclass may record its pid."""

    def stop(self) -> None:
        terminate(self.proc, timeout=10)
        self.proc = None

    def log_mark(self) -> int:
        """A position in the access log; `log_since(mark)` returns what was logged after it."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int, end: int | None = None) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            data = f.read() if end is None else f.read(max(0, end - mark))
        return data.decode(errors="replace")

    def blob_get_count(self, digest: str | None = None) -> int:
        """GET requests for blobs seen in the access log (optionally for one digest)."""
        return sum(1 for line in self.log_since(0).splitlines()
                   if '"GET /v2/' in line and "/blobs/" in line and (digest is None or digest in line))
