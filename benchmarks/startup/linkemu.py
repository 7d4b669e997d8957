"""A user-space link emulator between two TUN devices: rate limit, then one-way delay, per direction.

This kernel has no `netem`, so the delay cannot come from a qdisc. Every IP packet
the kernel routes into one TUN device is read here, queued behind the packets
already in flight in that direction (serialisation at `rate`, tail drop once the
queue holds more than `queue_bytes`), held for half the round-trip time and then
written into the other TUN device, where the kernel of the other namespace
receives it. Real TCP runs end to end, so slow start, window growth and loss
recovery behave as they do on a real path with that bandwidth and delay.

Run as a child of the benchmark, which opens both TUN devices and passes them:

    python -m benchmarks.startup.linkemu --fd-a 3 --fd-b 4 --rate-mbit 100 --rtt-ms 20
"""
from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

PR_SET_PDEATHSIG = 1
MAX_PACKET = 65536
MAX_READS_PER_WAKEUP = 64


@dataclass
class Direction:
    """One direction of the link: a FIFO of packets with their delivery times."""

    src_fd: int
    dst_fd: int
    rate_bytes_per_s: float  # 0 means unlimited
    one_way_delay_s: float
    queue_bytes: int
    busy_until: float = 0.0
    in_flight: deque = field(default_factory=deque)  # (deliver_at, packet), deliver_at non-decreasing
    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    dropped_packets: int = 0

    def enqueue(self, packet: bytes, now: float) -> None:
        if self.rate_bytes_per_s:
            backlog = max(0.0, self.busy_until - now) * self.rate_bytes_per_s
            if backlog + len(packet) > self.queue_bytes:
                self.dropped_packets += 1
                return
            departs = max(now, self.busy_until) + len(packet) / self.rate_bytes_per_s
            self.busy_until = departs
        else:
            departs = now
        self.in_flight.append((departs + self.one_way_delay_s, packet))

    def read_available(self, now: float) -> None:
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                packet = os.read(self.src_fd, MAX_PACKET)
            except BlockingIOError:
                return
            if not packet:
                return
            self.enqueue(packet, now)

    def deliver_due(self, now: float) -> None:
        while self.in_flight and self.in_flight[0][0] <= now:
            _, packet = self.in_flight.popleft()
            try:
                os.write(self.dst_fd, packet)
            except OSError:  # the receiving stack refused it (e.g. device going down): a loss
                self.dropped_packets += 1
                continue
            self.forwarded_packets += 1
            self.forwarded_bytes += len(packet)

    def next_due(self) -> float | None:
        return self.in_flight[0][0] if self.in_flight else None


def run(fd_a: int, fd_b: int, rate_mbit: float, rtt_ms: float, queue_bytes: int) -> dict[str, int]:
    """Forward until SIGTERM/SIGINT; returns per-direction counters."""
    rate = rate_mbit * 1e6 / 8
    delay = rtt_ms / 2000.0
    a_to_b = Direction(fd_a, fd_b, rate, delay, queue_bytes)
    b_to_a = Direction(fd_b, fd_a, rate, delay, queue_bytes)
    for fd in (fd_a, fd_b):
        os.set_blocking(fd, False)
    stop = False

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    directions = {fd_a: a_to_b, fd_b: b_to_a}
    while not stop:
        now = time.monotonic()
        dues = [d for d in (a_to_b.next_due(), b_to_a.next_due()) if d is not None]
        # select() takes microseconds; poll/epoll round their timeout up to whole milliseconds,
        # which would add up to 1 ms per hop to the delay
        timeout = None if not dues else max(0.0, min(dues) - now)
        try:
            ready, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            directions[fd].read_available(now)
        a_to_b.deliver_due(now)
        b_to_a.deliver_due(now)
    return {
        "a_to_b_packets": a_to_b.forwarded_packets, "a_to_b_bytes": a_to_b.forwarded_bytes,
        "a_to_b_dropped": a_to_b.dropped_packets, "b_to_a_packets": b_to_a.forwarded_packets,
        "b_to_a_bytes": b_to_a.forwarded_bytes, "b_to_a_dropped": b_to_a.dropped_packets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd-a", type=int, required=True)
    parser.add_argument("--fd-b", type=int, required=True)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="0 = unlimited")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--queue-bytes", type=int, default=0, help="default: one bandwidth-delay product, at least 64 KiB")
    args = parser.parse_args(argv)
    # The devices vanish with their last fd: dying with the benchmark removes the link.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        return 1
    queue = args.queue_bytes or max(65536, int(args.rate_mbit * 1e6 / 8 * args.rtt_ms / 1000))
    counters = run(args.fd_a, args.fd_b, args.rate_mbit, args.rtt_ms, queue)
    print(" ".join(f"{k}={v}" for k, v in counters.items()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
