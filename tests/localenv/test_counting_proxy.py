"""The counting relay of the fleet benchmark: a challenge on /v2/ of its own, the rest relayed."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from stargz_store.localenv.counting_proxy import CountingProxy, read_log
from stargz_store.registry import RegistryClient, parse_reference
from stargz_store.registry.client import sha256_digest


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
