"""What a cold pull-through mirror (Debian's docker-registry in proxy mode) costs the origin for
one client request, by what the client does with the answer (issue 18: can a client keep a cold
mirror below direct?).

    python -m benchmarks.fleet.proxy_probe          # needs root and docker-registry; ~1 min

The origin sits behind the fleet benchmark's delayed link (20 ms RTT) in a namespace of its own
(`sgzprobe`, so it can run beside the benchmark) with the counting relay in front; each case
uses a fresh mirror and a fresh 20 MiB blob, then reports the origin's blob GETs (status, body
bytes relayed, whether the answer ran to its end) and whether the mirror holds the blob after.
Cases: a GET hung up on right after the status line, a HEAD, a GET read for 1 MiB, a GET read
whole, four concurrent GETs hung up on, five GETs 150 ms apart hung up on, and four concurrent
misses hung up on 50 ms after their status line (a busy node slow to react), with the kernel's
receive buffer and with a 64 KiB one (it changes nothing: the mirror's own upstream window is what
the origin sends meanwhile).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import random
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from stargz_store.localenv.counting_proxy import read_log
from stargz_store.localenv.registry import LocalRegistry
from stargz_store.registry import RegistryClient, RegistryConfig, parse_reference

from .link import FleetLink, LinkSpec
from .site import OriginSite

WORK = Path("/var/tmp/stargz-fleet/probe")
BLOB = 20 << 20


class ProbeLink(FleetLink):
    NETNS = "sgzprobe"
    HOST_IF = "sgzp0"
    NS_IF = "sgzp1"
    HOST_ADDRESS = "10.213.79.1"
    FAR_ADDRESS = "10.213.79.2"


def _ask(host: str, path: str, method: str = "GET", read: int = 0, late: float = 0.0, rcvbuf: int = 0) -> int:
    """One request; `late`: seconds between the status line and the hang-up (a client slow to
    react, as a busy node is); `rcvbuf`: the socket's receive buffer (0: the kernel's autotuning)."""
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.connect()
    if rcvbuf:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    conn.request(method, path, headers={"Range": "bytes=100-200"})
    resp = conn.getresponse()
    if late:
        time.sleep(late)
    got = 0
    while got < read and (piece := resp.read(min(1 << 20, read - got))):
        got += len(piece)
    status = resp.status
    conn.sock.close()  # hang up, whatever is left of the body
    conn.close()
    return status


def _concurrent(mirror: str, path: str, late: float, rcvbuf: int) -> None:
    """A first miss (the fill), then 4 concurrent misses that each hang up `late` after the status."""
    _ask(mirror, path)
    threads = [threading.Thread(target=_ask, args=(mirror, path), kwargs={"late": late, "rcvbuf": rcvbuf})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (network namespace)")
        return 1
    shutil.rmtree(WORK, ignore_errors=True)
    site = OriginSite(WORK, WORK / "origin-data", LinkSpec(), link_class=ProbeLink)
    site.up()
    try:
        push_host = site.push_host
        cases = {
            "GET, hung up after the status line": lambda m, p: _ask(m, p),
            "HEAD": lambda m, p: _ask(m, p, "HEAD"),
            "GET, 1 MiB read, then hung up": lambda m, p: _ask(m, p, read=1 << 20),
            "GET, read whole": lambda m, p: _ask(m, p, read=BLOB + 1),
            "4 concurrent GETs, hung up": lambda m, p: [t.join() for t in [
                threading.Thread(target=_ask, args=(m, p)) for _ in range(4)] if not t.start()],
            "5 GETs 150 ms apart, hung up": lambda m, p: [(_ask(m, p), time.sleep(0.15)) for _ in range(5)],
            "1 GET, then 4 concurrent GETs hung up 50 ms after the status line": lambda m, p: _concurrent(m, p, 0.05, 0),
            "1 GET, then 4 concurrent GETs hung up 50 ms after the status line, 64 KiB receive buffer":
                lambda m, p: _concurrent(m, p, 0.05, 64 << 10),
        }
        for i, (name, run) in enumerate(cases.items()):
            data = random.Random(i).randbytes(BLOB)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            with RegistryClient(RegistryConfig(insecure_hosts=(push_host,))) as client:
                client.push_blob(parse_reference(f"{push_host}/probe/r{i}"), digest, data)
            mirror = LocalRegistry(WORK / f"mirror{i}", log_level="warn",
                                   extra_config=f"proxy:\n  remoteurl: http://{site.host}\n")
            mirror.start()
            try:
                mark = site.mark()
                run(mirror.host, f"/v2/probe/r{i}/blobs/{digest}")
                site.wait_quiet(quiet=1.0, timeout=60)
                hexd = digest.split(":", 1)[1]
                held = (mirror.storage_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data").exists()
                gets = [(r["status"], r["sent"], "whole" if r["complete"] else "cut")
                        for r in read_log(site.relay.log_path, mark.log_offset)[0]  # type: ignore[union-attr]
                        if r["method"] == "GET" and digest in r["path"]]
                print(f"{name}: origin link {site.since(mark).link_bytes / 1e6:.1f} MB, blob GETs {gets}, "
                      f"mirror holds it after: {held}", flush=True)
            finally:
                mirror.stop()
    finally:
        site.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
