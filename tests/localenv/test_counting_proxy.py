"""The counting relay of the fleet benchmark: a challenge on /v2/ of its own, the rest relayed and logged."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from stargz_store.localenv.counting_proxy import NODE_HEADER, CountingProxy, read_log
from stargz_store.registry import RegistryClient, parse_reference
from stargz_store.registry.client import sha256_digest
from tests.fixtures.waiting import wait_for


def test_challenge_on_v2_while_blobs_are_relayed(registry, tmp_path):
    """With a challenge, `GET /v2/` is answered 401 with it (a pull-through proxy in front stops
    pinging /v2/ before each miss once it has seen one); everything else reaches the registry,
    which asks for nothing, and is logged."""
    data = b"fleet" * 1000
    with RegistryClient() as direct:
        direct.push_blob(parse_reference(f"{registry.host}/relay/chal"), sha256_digest(data), data)
    log = tmp_path / "relay.log"
    with CountingProxy(registry.host, log, challenge='Basic realm="origin"') as relay:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://{relay.host}/v2/", timeout=30)
        assert answer.value.code == 401
        assert answer.value.headers["WWW-Authenticate"] == 'Basic realm="origin"'
        url = f"http://{relay.host}/v2/relay/chal/blobs/{sha256_digest(data)}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.read() == data
    records, _ = read_log(log)
    assert [(r["path"], r["status"]) for r in records] == [
        ("/v2/", 401), (f"/v2/relay/chal/blobs/{sha256_digest(data)}", 200)]
    assert records[1]["sent"] == len(data) and records[1]["complete"]


def test_the_node_that_asked_and_the_bytes_of_an_answer_cut_short_are_logged(registry, tmp_path):
    """The fleet benchmark's stores name themselves in `X-Fleet-Node`: the log tells each node's
    requests from the mirror's (no header). An answer the client hung up on still logs the bytes
    relayed before the failed write (it logged 0, which hid what cut answers cost)."""
    data = bytes(range(256)) * (64 << 10)  # 16 MiB: more than the sockets hold
    with RegistryClient() as direct:
        direct.push_blob(parse_reference(f"{registry.host}/relay/cut"), sha256_digest(data), data)
    log = tmp_path / "relay.log"
    with CountingProxy(registry.host, log) as relay:
        url = f"http://{relay.host}/v2/relay/cut/blobs/{sha256_digest(data)}"
        request = urllib.request.Request(url, headers={NODE_HEADER: "node07"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.read(1 << 20) == data[:1 << 20]
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.read() == data
        assert wait_for(lambda: len(read_log(log)[0]) == 2, timeout=60)
    records, _ = read_log(log)
    cut = next(r for r in records if not r["complete"])
    whole = next(r for r in records if r["complete"])
    assert cut["node"] == "node07" and "node" not in whole
    assert 1 << 20 <= cut["sent"] < len(data)
    assert whole["sent"] == len(data)
