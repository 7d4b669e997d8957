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
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.startup.link import EmulatedLinkEnds

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


class FleetLink(EmulatedLinkEnds):
    """`up()` then `down()` (safe twice). Only this benchmark's names are ever touched."""

    NETNS = NETNS
    HOST_IF = HOST_IF
    NS_IF = NS_IF
    HOST_ADDRESS = HOST_ADDRESS
    FAR_ADDRESS = ORIGIN_ADDRESS
    PREFIX_LEN = PREFIX_LEN
    EMULATOR_QUEUE_BYTES = 8 << 20
    EMULATOR_NICE = -10

    def __init__(self, spec: LinkSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.emulator: subprocess.Popen | None = None

    def emulator_args(self) -> list[str]:
        return ["--rate-mbit", str(self.spec.rate_mbit), "--rtt-ms", f"{self.spec.rtt_ms:.3f}"]
