"""The path between the host (podman, the store) and the registry: a network namespace behind a shaped link.

Shaped: two TUN devices, one in our namespace and one in the registry's, joined by
`linkemu` (rate then delay, per direction), because the kernel has no netem.
Unshaped: a plain veth pair. Either way the registry is reachable only at
`REGISTRY_ADDRESS`, a private /30 that exists on this host alone, and the host
side's receive counter is the exact number of bytes that came from the registry.
"""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stargz_store.localenv.procs import terminate

from ..procstat import cpu_seconds
from . import leftovers

log = logging.getLogger(__name__)

NETNS = "sgzbench"
HOST_IF = "sgzb0"
NS_IF = "sgzb1"
HOST_ADDRESS = "10.213.77.1"
REGISTRY_ADDRESS = "10.213.77.2"
PREFIX_LEN = 30
EMULATOR_TOKEN = "benchmarks.startup.linkemu"

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


class LinkError(RuntimeError):
    """The namespace or link could not be set up."""


@dataclass(frozen=True)
class LinkSpec:
    """What the link should look like; `shaped=False` ignores rate and RTT."""

    shaped: bool = True
    rate_mbit: float = 100.0
    rtt_ms: float = 20.0
    mtu: int = 1500

    def describe(self) -> str:
        if not self.shaped:
            return "unshaped (veth)"
        return f"{self.rate_mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT (user-space emulator on TUN, MTU {self.mtu})"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise LinkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_exists() -> bool:
    return Path(f"/run/netns/{NETNS}").exists()


def remove_leftovers() -> None:
    """Undo whatever a crashed run left: its processes, its namespace, its host-side interface."""
    leftovers.sweep_processes()
    if netns_exists():
        _ip("netns", "del", NETNS, check=False)
    if Path(f"/sys/class/net/{HOST_IF}").exists():
        _ip("link", "del", HOST_IF, check=False)


def _open_tun(name: str, netns: str | None) -> int:
    """Create a TUN device; in `netns` when given (setns on a throwaway thread, so our threads keep ours)."""
    result: dict[str, object] = {}

    def create() -> None:
        try:
            if netns:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{netns}") as ns:
                    if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
            result["fd"] = fd
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if "error" in result:
        raise LinkError(f"cannot create TUN device {name}: {result['error']}")
    return int(result["fd"])  # type: ignore[arg-type]


class EmulatedLinkEnds:
    """What every benchmark link built here shares: a network namespace reached over two TUN
    devices joined by the user-space emulator (`linkemu`), `up()` then `down()` (safe twice).
    Its names and addresses are class attributes, so two benchmarks (or other users of the
    machine) never tear down each other's namespace; a subclass sets them, its `spec` (with `mtu`)
    and the emulator's shaping arguments (`emulator_args`)."""

    NETNS = NETNS
    HOST_IF = HOST_IF
    NS_IF = NS_IF
    HOST_ADDRESS = HOST_ADDRESS
    FAR_ADDRESS = REGISTRY_ADDRESS  # the namespace's end
    PREFIX_LEN = PREFIX_LEN
    EMULATOR_QUEUE_BYTES: int | None = None  # None: the emulator's default
    EMULATOR_NICE = 0  # added to the emulator's niceness (< 0: ahead of what is measured)
    emulator: subprocess.Popen | None
    log_dir: Path

    def emulator_args(self) -> list[str]:
        """The emulator's shaping arguments (`--rate-mbit`, `--rtt-ms`)."""
        raise NotImplementedError

    def up(self) -> None:
        self.clear()
        _ip("netns", "add", self.NETNS)
        try:
            _ip("-n", self.NETNS, "link", "set", "lo", "up")
            self._up_ends()
            for ns_args, ifname, address in (([], self.HOST_IF, self.HOST_ADDRESS),
                                             (["-n", self.NETNS], self.NS_IF, self.FAR_ADDRESS)):
                _ip(*ns_args, "link", "set", ifname, "mtu", str(self.spec.mtu))  # type: ignore[attr-defined]
                _ip(*ns_args, "addr", "add", f"{address}/{self.PREFIX_LEN}", "dev", ifname)
                _ip(*ns_args, "link", "set", ifname, "up")
        except BaseException:
            self.down()
            raise

    def clear(self) -> None:
        """Undo what an earlier run with these names left behind."""
        self.down()

    def _up_ends(self) -> None:
        self._up_shaped()

    def _up_shaped(self) -> None:
        fd_host = _open_tun(self.HOST_IF, None)
        try:
            fd_ns = _open_tun(self.NS_IF, self.NETNS)
        except BaseException:
            os.close(fd_host)
            raise
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            queue = ["--queue-bytes", str(self.EMULATOR_QUEUE_BYTES)] if self.EMULATOR_QUEUE_BYTES else []
            nice = self.EMULATOR_NICE
            with open(self.log_dir / "linkemu.log", "ab") as err:
                self.emulator = subprocess.Popen(
                    [sys.executable, "-m", EMULATOR_TOKEN, "--fd-a", str(fd_host), "--fd-b", str(fd_ns),
                     *self.emulator_args(), *queue],
                    pass_fds=(fd_host, fd_ns), stdout=subprocess.DEVNULL, stderr=err,
                    cwd=Path(__file__).resolve().parents[2], preexec_fn=(lambda: os.nice(nice)) if nice else None,
                )
            self._emulator_started(self.emulator.pid)
        finally:
            os.close(fd_host)  # the emulator holds the only references now: the devices die with it
            os.close(fd_ns)

    def _emulator_started(self, pid: int) -> None:
        """Hook: the emulator runs as `pid`."""

    def down(self) -> None:
        terminate(self.emulator, timeout=10)
        self.emulator = None
        if Path(f"/run/netns/{self.NETNS}").exists():
            _ip("netns", "del", self.NETNS, check=False)
        if Path(f"/sys/class/net/{self.HOST_IF}").exists():
            _ip("link", "del", self.HOST_IF, check=False)

    def check_alive(self) -> None:
        if self.emulator is not None and self.emulator.poll() is not None:
            raise LinkError(f"link emulator exited with {self.emulator.returncode}; see {self.log_dir / 'linkemu.log'}")

    @classmethod
    def received_bytes(cls) -> int:
        """IP bytes that came from the far side (the namespace) since the link was created."""
        return int(Path(f"/sys/class/net/{cls.HOST_IF}/statistics/rx_bytes").read_text())

    @classmethod
    def netns_command(cls, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", cls.NETNS, *argv]


class Link(EmulatedLinkEnds):
    """The namespace and the path to it: shaped (the emulator) or a plain veth pair."""

    def __init__(self, spec: LinkSpec, log_dir: Path, emulated_rtt_ms: float | None = None):
        """`emulated_rtt_ms`: the delay the emulator adds, when it must differ from the target
        (calibration takes the emulator's own latency off it)."""
        self.spec = spec
        self.log_dir = log_dir
        self.emulated_rtt_ms = spec.rtt_ms if emulated_rtt_ms is None else emulated_rtt_ms
        self.emulator: subprocess.Popen | None = None

    def emulator_args(self) -> list[str]:
        return ["--rate-mbit", str(self.spec.rate_mbit), "--rtt-ms", f"{self.emulated_rtt_ms:.3f}"]

    def clear(self) -> None:
        remove_leftovers()

    def _up_ends(self) -> None:
        if self.spec.shaped:
            self._up_shaped()
        else:
            _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NETNS)

    def _emulator_started(self, pid: int) -> None:
        leftovers.record_pid(pid, EMULATOR_TOKEN)

    def emulator_cpu_seconds(self) -> float | None:
        """CPU the user-space link has used so far (it competes with what is measured on a small machine)."""
        if self.emulator is None or self.emulator.poll() is not None:
            return None
        return cpu_seconds(self.emulator.pid)



@dataclass(frozen=True)
class LinkMeasurement:
    rtt_ms_median: float
    rtt_ms_min: float
    throughput_mbit: float
    probe_bytes: int

    def describe(self) -> str:
        return (f"measured: RTT {self.rtt_ms_median:.1f} ms (min {self.rtt_ms_min:.1f}), "
                f"throughput {self.throughput_mbit:.1f} Mbit/s over {self.probe_bytes / 1e6:.0f} MB")


def measure_rtt(host: str, port: int, samples: int = 10, warmup: int = 3) -> list[float]:
    """TCP handshake times in ms: one round trip each, no payload (the first `warmup` are discarded)."""
    rtts = []
    for _ in range(warmup):
        socket.create_connection((host, port), timeout=5).close()
    for _ in range(samples):
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=5):
            rtts.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)
    return rtts


def measure_throughput(url: str) -> tuple[float, int]:
    """Mbit/s of one HTTP GET, timed from the first body byte so one request's RTT does not count."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=120) as response:
        first = response.read(65536)
        start = time.perf_counter()
        total = 0
        while chunk := response.read(1 << 20):
            total += len(chunk)
        elapsed = time.perf_counter() - start
    return total * 8 / elapsed / 1e6, total + len(first)


def measure(host: str, port: int, probe_url: str) -> LinkMeasurement:
    rtts = measure_rtt(host, port)
    mbit, size = measure_throughput(probe_url)
    return LinkMeasurement(statistics.median(rtts), min(rtts), mbit, size)
