"""The fleet benchmark's origin site: a network namespace of its own behind a delayed link.

Same construction as the startup benchmark's link (two TUN devices joined by the user-space
emulator `benchmarks.startup.linkemu`), under other names and addresses, so the two benchmarks
(or other users of the machine) never tear down each other's namespace:

    stores, mirror ──► sgzf0 (TUN, 10.213.78.1/30) ═══ linkemu ═══ sgzf1 (TUN, 10.213.78.2/30, netns sgzfleet)
                                                                      └─► counting proxy :5000 ─► origin registry

Everything that crosses the link is origin egress; the counting proxy logs each answer.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.startup.link import EMULATOR_TOKEN, EmulatedLinkEnds, _ip, _open_tun
from stargz_store.localenv.procs import terminate

log = logging.getLogger(__name__)

NETNS = "sgzfleet"
HOST_IF = "sgzf0"
NS_IF = "sgzf1"
HOST_ADDRESS = "10.213.78.1"
ORIGIN_ADDRESS = "10.213.78.2"
PREFIX_LEN = 30


@dataclass(frozen=True)
class LinkSpec:
    rtt_ms: float = 20.0
    rate_mbit: float = 0.0  # 0: delay only (the emulator's own speed is the limit)
    mtu: int = 9000  # fewer packets for the Python emulator to move; TCP behaves the same

    def describe(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "no rate limit"
        return f"{self.rtt_ms:g} ms RTT, {rate}, MTU {self.mtu} (user-space emulator on TUN)"


def netns_exists() -> bool:
    return Path(f"/run/netns/{NETNS}").exists()


class FleetLink(EmulatedLinkEnds):
    """`up()` then `down()` (safe twice). Only this benchmark's names are ever touched."""

    NETNS = NETNS
    HOST_IF = HOST_IF

    def __init__(self, spec: LinkSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.emulator: subprocess.Popen | None = None

    def up(self) -> None:
        self.down()
        _ip("netns", "add", NETNS)
        try:
            _ip("-n", NETNS, "link", "set", "lo", "up")
            fd_host = _open_tun(HOST_IF, None)
            try:
                fd_ns = _open_tun(NS_IF, NETNS)
            except BaseException:
                os.close(fd_host)
                raise
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with open(self.log_dir / "linkemu.log", "ab") as err:
                    self.emulator = subprocess.Popen(
                        [sys.executable, "-m", EMULATOR_TOKEN, "--fd-a", str(fd_host), "--fd-b", str(fd_ns),
                         "--rate-mbit", str(self.spec.rate_mbit), "--rtt-ms", f"{self.spec.rtt_ms:.3f}",
                         "--queue-bytes", str(8 << 20)],
                        pass_fds=(fd_host, fd_ns), stdout=subprocess.DEVNULL, stderr=err,
                        cwd=Path(__file__).resolve().parents[2], preexec_fn=lambda: os.nice(-10))
            finally:
                os.close(fd_host)
                os.close(fd_ns)
            for ns_args, ifname, address in (([], HOST_IF, HOST_ADDRESS), (["-n", NETNS], NS_IF, ORIGIN_ADDRESS)):
                _ip(*ns_args, "link", "set", ifname, "mtu", str(self.spec.mtu))
                _ip(*ns_args, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", ifname)
                _ip(*ns_args, "link", "set", ifname, "up")
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        terminate(self.emulator, timeout=10)
        self.emulator = None
        if netns_exists():
            _ip("netns", "del", NETNS, check=False)
        if Path(f"/sys/class/net/{HOST_IF}").exists():
            _ip("link", "del", HOST_IF, check=False)
