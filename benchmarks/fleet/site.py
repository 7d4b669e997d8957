"""The origin behind its delayed link, and pull-through mirrors in front of it, each with a meter.

    origin registry (netns, :5001) ◄─ counting relay (netns, :5000) ◄═ delayed link ═ mirror relay ◄─ stores
                                                                      ◄═════════════════════════════ stores (direct)
    mirror: docker-registry `proxy: remoteurl: http://<origin relay>` on 127.0.0.1.

Origin egress is the link's receive counter on the host side (every byte that left the origin's
site, headers and TCP/IP included) plus the relay's log (requests, statuses, body bytes); mirror
egress is the mirror's access log.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.startup.leftovers import die_with_parent
from benchmarks.startup.registry import _ACCESS_RE
from stargz_store.localenv.counting_proxy import read_log
from stargz_store.localenv.procs import terminate, wait_for_http
from stargz_store.localenv.registry import LocalRegistry

from .link import FleetLink, LinkSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
# The origin's site and the mirror stand for machines of their own: they run ahead of the N stores
# (and of whatever else loads this machine), so that how fast a registry notices a client hanging
# up is not set by this machine's load (under load it took tens of ms, and megabytes of origin
# bytes per abandoned answer, against ~150 kB unloaded).
INFRA_NICE = -10
ORIGIN_PORT = 5000  # the relay: what stores and the mirror are configured with
REGISTRY_PORT = 5001
# The origin's /v2/ answers 401 with a challenge, as every public registry's does (the relay
# answers it; blobs and manifests need no credentials, to keep the site small). Without one,
# distribution's pull-through proxy pings the origin's /v2/ under a process-wide lock before each
# miss (`tryEstablishChallenges`): misses queued behind each other for seconds at N=16, and each
# one let out after a fill had ended started another whole fill (measured: 5-6 fills per blob at
# N=16 with background fetch on), which no registry a fleet pulls from would cause. The proxy
# has no Basic handler: this challenge is recorded and never answered.
ORIGIN_CHALLENGE = 'Basic realm="fleet-origin"'


@dataclass
class Egress:
    """What one meter saw between two marks."""

    link_bytes: int = 0  # IP bytes over the link (origin only)
    body_bytes: int = 0  # response body bytes relayed
    requests: int = 0
    blob_gets: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "GET 206" -> count, blob GETs only
    incomplete: int = 0  # answers the client hung up on


@dataclass(frozen=True)
class Mark:
    log_offset: int
    link_rx: int


def _egress(records: list[dict], link_bytes: int = 0) -> Egress:
    out = Egress(link_bytes=link_bytes)
    for r in records:
        out.requests += 1
        out.body_bytes += r.get("sent", 0)
        if "/blobs/" in r["path"] and r["method"] == "GET":
            out.blob_gets += 1
            key = f"{r['status']}" + (" multi" if r.get("range") and "," in r["range"] else "")
            out.statuses[key] = out.statuses.get(key, 0) + 1
            out.incomplete += 0 if r.get("complete") else 1
    return out


def infra_preexec() -> None:
    """preexec_fn of the site's processes: dies with the benchmark, and runs at INFRA_NICE."""
    die_with_parent()()
    os.nice(INFRA_NICE)


class Relay:
    """A counting relay process (stargz_store.localenv.counting_proxy), optionally in the netns."""

    def __init__(self, listen: str, upstream: str, log_path: Path, prefix: list[str] | None = None,
                 challenge: str | None = None) -> None:
        self.listen, self.log_path = listen, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "stargz_store.localenv.counting_proxy",
             "--listen", listen, "--upstream", upstream, "--log", str(log_path),
             *(["--challenge", challenge] if challenge else [])],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(log_path.with_suffix(".err"), "ab"),
            preexec_fn=infra_preexec)
        if not wait_for_http(f"http://{listen}/v2/", self.proc, 30):
            raise RuntimeError(f"counting relay on {listen} did not start")

    def offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def records_since(self, offset: int) -> list[dict]:
        return read_log(self.log_path, offset)[0]

    def stop(self) -> None:
        terminate(self.proc, timeout=10)


class OriginSite:
    """The origin registry and its relay in the netns, behind the delayed link."""

    def __init__(self, work: Path, data_dir: Path, spec: LinkSpec, link_class: type[FleetLink] = FleetLink) -> None:
        """`link_class`: another namespace and addresses (a FleetLink subclass), to run beside the benchmark."""
        self.work = work
        self.link = link_class(spec, work)
        self.address = link_class.FAR_ADDRESS
        self.registry = LocalRegistry(work / "origin", port=REGISTRY_PORT, address=self.address, data_dir=data_dir,
                                      log_level="error", access_log=False, command_prefix=self.link.netns_command(),
                                      preexec_fn=infra_preexec)
        self.relay: Relay | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{ORIGIN_PORT}"

    @property
    def push_host(self) -> str:
        return self.registry.host

    def up(self) -> None:
        self.link.up()
        self.registry.start(timeout=30)
        self.relay = Relay(self.host, self.registry.host, self.work / "origin-relay.log", self.link.netns_command(),
                           challenge=ORIGIN_CHALLENGE)

    def down(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.registry.stop()
        self.link.down()

    def mark(self) -> Mark:
        assert self.relay is not None
        return Mark(self.relay.offset(), self.link.received_bytes())

    def since(self, mark: Mark) -> Egress:
        assert self.relay is not None
        return _egress(self.relay.records_since(mark.log_offset), self.link.received_bytes() - mark.link_rx)

    def wait_quiet(self, quiet: float = 2.0, timeout: float = 120.0) -> None:
        """Until nothing crossed the link for `quiet` seconds (a mirror's fill may outlast the readers)."""
        deadline = time.monotonic() + timeout
        last, since = self.link.received_bytes(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now_rx = self.link.received_bytes()
            if now_rx != last:
                last, since = now_rx, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return


class Mirror:
    """A pull-through docker-registry of the origin on loopback. The stores talk to it directly (a
    relay in between would buffer megabytes of every answer they hang up on, which the mirror
    would pull from the origin); its egress comes from its access log (bytes written per answer)."""

    def __init__(self, work: Path, name: str, origin_host: str) -> None:
        self.work = work / name
        self.registry = LocalRegistry(self.work, log_level=os.environ.get("STARGZ_FLEET_MIRROR_LOG", "warn"),
                                      extra_config=f"proxy:\n  remoteurl: http://{origin_host}\n",
                                      preexec_fn=infra_preexec)

    @property
    def host(self) -> str:
        return self.registry.host

    def start(self) -> None:
        self.registry.start(timeout=30)

    def stop(self) -> None:
        self.registry.stop()

    def holds(self, digest: str) -> bool:
        hexd = digest.split(":", 1)[1]
        return (self.registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data").exists()

    def warm(self, ref: str, digests: list[str], timeout: float = 300.0) -> None:
        """Pull every blob whole through the mirror (as a pre-warming node or `skopeo copy` would)
        and wait until its own cache holds them."""
        import urllib.request

        repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
        origin = ref.split("/", 1)[0]
        for digest in digests:
            if self.holds(digest):
                continue
            url = f"http://{self.registry.host}/v2/{repo}/blobs/{digest}?ns={origin}"
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                while resp.read(1 << 20):
                    pass
        deadline = time.monotonic() + timeout
        while not all(self.holds(d) for d in digests):
            if time.monotonic() > deadline:
                raise RuntimeError("the mirror did not finish filling")
            time.sleep(0.2)

    def mark(self) -> int:
        return self.registry.log_mark()

    def since(self, mark: int) -> Egress:
        out = Egress()
        for m in _ACCESS_RE.finditer(self.registry.log_since(mark)):
            method, path, status, size = m.groups()
            out.requests += 1
            out.body_bytes += int(size) if size.isdigit() else 0
            if method == "GET" and "/blobs/" in path:
                out.blob_gets += 1
                out.statuses[status] = out.statuses.get(status, 0) + 1
        return out
